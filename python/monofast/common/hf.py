"""Loading Hugging Face models and tokenizers (`--model`): only from a local folder or the
local Hugging Face cache unless downloads are allowed, a model that cannot fit refused
before it loads, and `transformers` optional (`monofast[hf]`): without it, one line says
how to install it. The model behind the GPT's interface is `monofast.gpt.hf`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from monofast.common.errors import DataError, UserError

INSTALL_HINT = "install the extra: pip install 'monofast[hf]'"
SITES = ("mlp.hook_post", "hook_resid_post", "hook_attn_out")
HOOK_PATTERN = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(s) for s in SITES) + r")$")


def parse_hook(name: str) -> tuple[int, str]:
    """(layer, site) of a hook name such as `blocks.3.mlp.hook_post`."""
    match = HOOK_PATTERN.match(name.strip())
    if match is None:
        raise UserError(f"hook {name!r}: expected blocks.L.SITE with SITE one of {', '.join(SITES)} "
                        f"(e.g. blocks.3.mlp.hook_post); `monofast hooks --model ...` lists a model's hooks")
    return int(match.group(1)), match.group(2)


def transformers_module() -> Any:
    try:
        import transformers
    except ImportError:
        raise UserError(f"Hugging Face models need the transformers package: {INSTALL_HINT}") from None
    transformers.logging.set_verbosity_error()  # monofast's own log says what loads
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _not_found(model: str, allow_download: bool, err: BaseException) -> UserError:
    if allow_download:
        return UserError(f"cannot load the Hugging Face model {model!r}: {str(err).splitlines()[0]}")
    return UserError(f"Hugging Face model {model!r} is neither a local folder nor in the local Hugging Face "
                     f"cache; download it first (`hf download {model}`) or allow downloads "
                     f"(--allow-download)")


def available_memory(device: Any) -> Optional[int]:
    """Bytes free for the weights on `device`; None where it cannot be told."""
    if device.type == "cuda":
        import torch

        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # earlier stages' blocks
        return int(torch.cuda.mem_get_info(device)[0]) + cached
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_config(model: str, allow_download: bool = False) -> Any:
    """The model's `transformers` config (local only unless downloads are allowed)."""
    try:
        return transformers_module().AutoConfig.from_pretrained(model, local_files_only=not allow_download)
    except (OSError, ValueError) as err:
        raise _not_found(model, allow_download, err) from None


def meta_model(config: Any) -> Any:
    """A causal LM of `config` on the meta device: its modules and shapes, no memory for weights."""
    import torch

    with torch.device("meta"):
        return transformers_module().AutoModelForCausalLM.from_config(config)


def parameter_bytes(config: Any, dtype: Any) -> int:
    """Bytes the weights of a model of `config` take at `dtype`, counted without allocating them."""
    import torch

    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in meta_model(config).parameters()) * itemsize


def load_lm(model: str, device: Any, dtype: Any, allow_download: bool = False) -> Any:
    """The causal LM `model` (a local folder or a hub id in the local cache) in eval mode on
    `device` at `dtype`, refused with its size when it cannot fit in the memory free there."""
    transformers = transformers_module()
    local_only = not allow_download
    config = load_config(model, allow_download)
    need = parameter_bytes(config, dtype)
    free = available_memory(device)
    if free is not None and need > free:
        raise UserError(f"the model {model!r} needs {need / 2**30:.1f} GiB for its weights in {dtype_label(dtype)} "
                        f"but {device} has {free / 2**30:.1f} GiB free; use a smaller model, another device, or "
                        f"half precision (--set gpt.dtype=bfloat16)")
    try:
        lm = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError) as err:
        raise _not_found(model, allow_download, err) from None
    return lm.to(device).eval()


def dtype_label(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def load_tokenizer(model: str, allow_download: bool = False) -> Any:
    """The model's fast tokenizer (its `tokenizers.Tokenizer` is `.backend_tokenizer`)."""
    transformers = transformers_module()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(model, local_files_only=not allow_download)
    except (OSError, ValueError) as err:
        raise _not_found(model, allow_download, err) from None
    if not getattr(tok, "is_fast", False):
        raise DataError(f"the tokenizer of {model!r} has no fast (tokenizer.json) form, which monofast reads; "
                        f"save it with transformers' fast tokenizer first")
    return tok


def model_name(model: str) -> str:
    """How a run names the model: a hub id as given, a folder by its absolute path."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model
