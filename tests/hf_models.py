"""Tiny, randomly initialised Hugging Face causal LMs saved to local folders (no hub, no
download): GPT-2, GPT-NeoX (Pythia) and Llama layouts, each with a small byte-level BPE
tokenizer in the fast (tokenizer.json) form."""

from __future__ import annotations

from pathlib import Path

KINDS = ("gpt2", "neox", "llama")
EOT = "<|endoftext|>"


def tokenizer(texts: list[str], vocab_size: int = 320):
    """A fast tokenizer for `transformers`: byte-level BPE trained on `texts`."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT)


def config(kind: str, vocab_size: int, eot_id: int = 0, layers: int = 2, width: int = 32, context: int = 128):
    import transformers

    ids = {"bos_token_id": eot_id, "eos_token_id": eot_id}
    if kind == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=width, n_layer=layers,
                                       n_head=2, **ids)
    if kind == "neox":
        return transformers.GPTNeoXConfig(vocab_size=vocab_size, max_position_embeddings=context, hidden_size=width,
                                          num_hidden_layers=layers, num_attention_heads=2,
                                          intermediate_size=2 * width, **ids)
    if kind == "llama":
        return transformers.LlamaConfig(vocab_size=vocab_size, max_position_embeddings=context, hidden_size=width,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                        intermediate_size=3 * width // 2, **ids)
    raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")


def save(kind: str, folder: Path, texts: list[str], seed: int = 0) -> Path:
    """A tiny `kind` model and its tokenizer saved in `folder`."""
    import torch
    import transformers

    tok = tokenizer(texts)
    torch.manual_seed(seed)
    lm = transformers.AutoModelForCausalLM.from_config(config(kind, len(tok), tok.eos_token_id))
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
