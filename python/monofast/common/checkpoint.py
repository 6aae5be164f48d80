"""Resume checkpoints: one atomically written torch file per stage, and one way to read
it back that refuses a damaged file or one made with other options."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Collection

from monofast.common import files
from monofast.common.errors import DataError, UserError

CHECKPOINT_FILE = "checkpoint.pt"
"""The resume file of the stages that have one (GPT, SAE), in the stage's folder."""


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` (tensors, optimizer states, plain values) to `path` atomically, with
    the digest of its content inside, so that `load` notices a damaged file (torch.load
    itself reads a flipped byte in a tensor without complaint)."""
    import torch

    with files.atomic_open(path, "wb") as fh:
        torch.save({**payload, DIGEST_KEY: content_digest(payload)}, fh)


DIGEST_KEY = "content_xxh3"
"""The payload key holding `content_digest` of the rest."""


def content_digest(obj: Any) -> str:
    """XXH3-128 of a payload's content: every tensor's dtype, shape and bytes and every
    plain value, walked in order (dicts in their order, which torch.load keeps)."""
    parts: list[bytes] = []
    _walk(obj, parts)
    return files.hash_bytes(b"".join(parts))


def _walk(obj: Any, parts: list[bytes]) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        flat = obj.detach().to("cpu").contiguous().reshape(-1)
        parts.append(f"T{obj.dtype}{tuple(obj.shape)}".encode())
        parts.append(files.hash_bytes(flat.view(torch.uint8).numpy().tobytes()).encode())
    elif isinstance(obj, dict):
        parts.append(f"D{len(obj)}".encode())
        for key, value in obj.items():
            parts.append(repr(key).encode())
            _walk(value, parts)
    elif isinstance(obj, (list, tuple)):
        parts.append(f"L{len(obj)}".encode())
        for value in obj:
            _walk(value, parts)
    else:
        parts.append(repr(obj).encode())


def load(path: Path, fmt: int, identity_key: str, now: dict[str, Any],
         runtime: Collection[str] = ()) -> dict[str, Any]:
    """Read a checkpoint of format `fmt` whose `payload[identity_key]` must equal `now`,
    leaving out of the saved record the `runtime` fields (the config's `RUNTIME`: a
    checkpoint written before a field became runtime still resumes).

    A damaged file or another format is a `DataError`; a checkpoint made with other
    options (or other data) is a `UserError` listing each difference.
    """
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many classes for a damaged file
        raise DataError(f"{path} is unreadable ({err}); drop --resume to start over") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise DataError(f"{path} is not a monofast checkpoint of format {fmt}; drop --resume to start over")
    recorded = payload.pop(DIGEST_KEY, None)
    if recorded is not None and recorded != content_digest(payload):
        raise DataError(f"{path} is damaged (its content does not match the XXH3 digest saved in it); "
                        f"drop --resume (or use --force) to start the stage over")
    saved = {k: v for k, v in (payload.get(identity_key) or {}).items() if k not in runtime}
    changed = [f"{k}={saved.get(k)!r} (now {now.get(k)!r})" for k in sorted(set(saved) | set(now))
               if saved.get(k) != now.get(k)]
    if changed:
        raise UserError(f"{path} was made with other options or data: {', '.join(changed)}; resume "
                        f"with the same options, or drop --resume to start over")
    return payload
