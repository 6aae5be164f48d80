"""Test-wide isolation: no network, and a private download cache per test."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path_factory):
    """Every test gets an empty cache and a network that refuses; tests that exercise
    downloads replace `http_get` / `pip_download` themselves."""
    from monofast import corpus

    monkeypatch.setenv("MONOFAST_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("MONOFAST_PROGRESS", "0")

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(corpus, "http_get", refuse)
    monkeypatch.setattr(corpus, "pip_download", refuse)


def write_text_source(folder: Path, name: str, chars: int, seed: int = 0) -> Path:
    """A small deterministic English-like text file of about `chars` characters."""
    import random

    rng = random.Random(seed)
    words = ["thou", "art", "the", "king", "of", "my", "heart", "and", "love", "sweet",
             "night", "death", "crown", "lord", "ñame", "café", "—", "honour", "fair"]
    lines = []
    total = 0
    while total < chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 10))).capitalize() + "."
        lines.append(line)
        total += len(line) + 1
    path = folder / f"{name}.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_code_source(folder: Path, files: int = 6, lines: int = 60) -> Path:
    """A folder of small Python files."""
    code = folder / "code"
    code.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        body = [f"def function_{i}_{j}(x, y={j}):\n    return x * y + {i} < {j} and 'ok'\n"
                for j in range(lines // 2)]
        (code / f"mod{i}.py").write_text("".join(body), encoding="utf-8")
    return code


@pytest.fixture
def two_sources(tmp_path) -> tuple[str, ...]:
    """Source specs of a small text and a small code corpus, both local."""
    text = write_text_source(tmp_path, "verse", 30_000)
    code = write_code_source(tmp_path)
    return (f"verse={text}", f"code={code}")


def build_small_data(root: Path, chars_per_source: int = 12_000, vocab_size: int = 300) -> Path:
    """`root/data/` built from a small verse file and a few code files, both local."""
    from monofast import data

    text = write_text_source(root, "verse", 16_000)
    code = write_code_source(root, files=4, lines=40)
    cfg = data.DataConfig(sources=(f"verse={text}", f"code={code}"), chars_per_source=chars_per_source,
                          vocab_size=vocab_size)
    data.build(cfg, root / "data")
    return root / "data"
