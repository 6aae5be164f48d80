"""The lab's tokenizer: `lab/tokenizer.js` (the data) and `assets/lab/tokenizer.js` (the
code) encode and decode exactly as `tokenizers` does, checked in a real headless Chromium
from file:// (one browser start runs every case)."""

from __future__ import annotations

import functools
import html
import json
import random
import re
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import monofast
import pytest
from monofast.data import tokenizer
from monofast.run import report
from monofast.site.lab_tokenizer import _kind, byte_alphabet, character_classes, tokenizer_script

ENGLISH = """First Citizen:
Before we proceed any further, hear me speak. We'll speak; we've said it's the King's.
You are all resolved rather to die than to famish? Resolved. resolved. 1,200 men, 3.14 pence!
"""
MULTIBYTE = """Le café déjà vu, naïve façade — «très» bien. Straße, Mädchen, Øre.
日本語のテキストです。漢字とかな。中文字符串。Привет, как дела? Γειά σου κόσμε.
emoji 😀🎉👍🏽 and flags 🇫🇷, combining é ñ ẽ̃, Hangul 한국어 텍스트.
"""
SAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog. It's 12:30, isn't it?",
    "python-indent-tabs-crlf": "def f(x):\r\n    if x:\r\n\treturn x  # tab\r\n        pass\n\n\n    y = [1, 2]\t\n",
    "spaces": "  leading and trailing  ",
    "many-spaces": "a     b \t  c   \n   \n  d          ",
    "only-spaces": "     ",
    "digits": "0 1 12 123 1234567890 3.14159 1e-9 ٣٤٥ ①②",
    "contractions": "it's we've they'LL I'm you'd he'll she's 'S 'Ve 'd's ''s",
    "punctuation": "!!! ?!?! ... --- ==> <<< >>> {[()]} @#$%^&*_+~` \"quoted\" 'single'",
    "emoji": "smile 😀 party 🎉 thumbs 👍🏽 family 👨‍👩‍👧 flag 🇯🇵",
    "cjk": "日本語のテキスト 中文 한국어 繁體字",
    "combining": "e\u0301 n\u0303 a\u0308\u0304 Z\u0351\u0368\u035b̴̡",
    "unseen": "ʬʭ ꙮ 𓀀𓀁 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🂡 \U0010fffd \ue000",
    "whitespace-kinds": "a\x0bb\x0cc\x85d\xa0e\u1680f\u2000g\u2028h\u2029i\u202fj\u205fk\u3000l\ufeffm\u200bn\u180eo",
    "bom-first": "\ufeffhello",
    "eot-inside": "one<|endoftext|>two",
    "eot-ends": "<|endoftext|>middle<|endoftext|>",
    "eot-spaced": " <|endoftext|> \n<|endoftext|>\n",
    "eot-twice": "<|endoftext|><|endoftext|>",
    "eot-partial": "<|endoftext| <|endof <|endoftext|>|>",
    "empty": "",
    "newer-unicode": "x\u088fy \ua7ce \U00010940\U00010941 \U00011de0\U00011de1 \U00016ff4 \u0cdc",
    "long-run": "a" * 3000 + " " * 3000 + "\n" * 500,
}
EXTRA_ADDED = ("<é x>", "héllo")
"""Added tokens of the second tokenizer: one with a character outside the byte alphabet, one
the decoder turns into bad UTF-8 (é is byte 0xe9 in the alphabet)."""


@functools.lru_cache(maxsize=1)
def trained() -> str:
    """tokenizer.json of a 600-token BPE trained on English, this package's data code and
    multi-byte text."""
    code = sorted((Path(monofast.__file__).parent / "data").glob("*.py"))
    texts = [ENGLISH * 3, MULTIBYTE * 2, *(p.read_text(encoding="utf-8") for p in code)]
    return tokenizer.train(texts, vocab_size=600).to_str()


def variant(spec: dict[str, Any]) -> dict[str, Any]:
    """The same BPE with every id shuffled, a vocabulary entry no merge makes, ignore_merges
    on and two more added tokens: the script's every less common path."""
    from tokenizers import AddedToken, Tokenizer

    spec = json.loads(json.dumps(spec))
    model = spec["model"]
    rng = random.Random(5)
    size = len(model["vocab"])
    new_ids = list(range(size))
    rng.shuffle(new_ids)
    model["vocab"] = {s: new_ids[i] for s, i in model["vocab"].items()}
    model["vocab"]["Ġzzzq"] = size
    model["ignore_merges"] = True
    for token in spec["added_tokens"]:
        token["id"] = model["vocab"][token["content"]]
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens([AddedToken(EXTRA_ADDED[0], special=True, normalized=False)])
    tok.add_tokens([AddedToken(EXTRA_ADDED[1], special=False, normalized=True)])
    return json.loads(tok.to_str())


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Strings mixing words, whitespace of every kind, special tokens and code points from
    the whole range (astral included, surrogates excluded)."""
    rng = random.Random(seed)
    words = re.findall(r"\S+", ENGLISH + MULTIBYTE) + ["<|endoftext|>", "<|endof", "'s", "'LL", "\r\n", "\t"]
    spaces = [" ", "  ", "\n", "\t", "\r\n", "\x0b", "\x85", "\xa0", "\u3000", "\ufeff"]

    def code_point() -> str:
        while True:
            c = rng.choice([rng.randrange(0x80), rng.randrange(0x800), rng.randrange(0x10000),
                            rng.randrange(0x10000, 0x110000)])
            if not 0xD800 <= c < 0xE000:
                return chr(c)

    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randrange(0, 24)):
            kind = rng.random()
            parts.append(rng.choice(words) if kind < 0.4 else rng.choice(spaces) if kind < 0.6 else code_point())
        out.append("".join(parts))
    return out


def class_probes() -> list[str]:
    """Every 37th code point between letters, digits and spaces: the shipped classes against
    the library's wherever the browser's own Unicode might differ."""
    points = [c for c in range(0, 0x110000, 37) if not 0xD800 <= c < 0xE000]
    return ["".join(f"a{chr(c)}1{chr(c)} {chr(c)}." for c in points[i:i + 400]) for i in range(0, len(points), 400)]


PAGE = """<!doctype html><meta charset="utf-8"><title>tokenizer</title>
<pre id="out"></pre>
{scripts}
<script src="cases.js"></script>
<script>
(function () {{
  var results = [];
  window.TOKENIZERS.forEach(function (data) {{
    var t0 = performance.now();
    var tok = MonofastTokenizer.load(data);
    var loadMs = performance.now() - t0;
    var r = {{eot: tok.eot, vocabSize: tok.vocabSize, loadMs: loadMs, encoded: [], decoded: [], raw: [],
             idDecoded: [], idRaw: [], pieces: []}};
    CASES.texts.forEach(function (text) {{
      r.pieces.push(tok.pieces(text));
      var ids = tok.encode(text);
      r.encoded.push(Array.from(ids));
      r.decoded.push(tok.decode(ids));
      r.raw.push(tok.decode(Array.from(ids), false));
    }});
    CASES.idLists.forEach(function (ids) {{
      r.idDecoded.push(tok.decode(ids));
      r.idRaw.push(tok.decode(ids, false));
    }});
    var all = [];
    for (var i = 0; i < tok.vocabSize; i++) {{ all.push(i); }}
    r.strings = tok.tokenStrings(all);
    var fresh = MonofastTokenizer.load(data);
    t0 = performance.now();
    r.speedTokens = fresh.encode(CASES.speed).length;
    r.coldMs = performance.now() - t0;
    t0 = performance.now();
    for (i = 0; i < 20; i++) {{ fresh.encode(CASES.speed); }}
    r.warmMs = (performance.now() - t0) / 20;
    results.push(r);
  }});
  var text = JSON.stringify(results).replace(/[\\u007f-\\uffff]/g, function (c) {{
    return "\\\\u" + ("000" + c.charCodeAt(0).toString(16)).slice(-4);
  }});
  document.getElementById("out").textContent = text;
}})();
</script>
"""


@pytest.fixture(scope="module")
def chromium() -> list[str]:
    """The command line of a headless Chromium, or a skip where none is installed."""
    browser = report.find_browser()
    if browser is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    return [browser, "--headless", "--no-sandbox", "--disable-gpu"]


def run_page(chromium: list[str], folder: Path, specs: list[dict[str, Any]], cases: dict[str, Any]) -> list[Any]:
    """Encode and decode `cases` with each tokenizer in one headless Chromium from file://."""
    code = resources.files("monofast.site") / "assets" / "lab" / "tokenizer.js"
    (folder / "code.js").write_bytes(code.read_bytes())
    scripts = ['<script>window.TOKENIZERS = [];</script>']
    for i, spec in enumerate(specs):
        (folder / f"data{i}.js").write_text(tokenizer_script(json.dumps(spec)), encoding="utf-8")
        scripts += [f'<script src="data{i}.js"></script>',
                    "<script>window.TOKENIZERS.push(window.MONOFAST_TOKENIZER);</script>"]
    scripts.append('<script src="code.js"></script>')
    (folder / "cases.js").write_text("window.CASES = " + json.dumps(cases) + ";", encoding="utf-8")
    page = folder / "page.html"
    page.write_text(PAGE.format(scripts="\n".join(scripts)), encoding="utf-8")
    run = subprocess.run(chromium + ["--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=180, check=False)
    found = re.search(r'<pre id="out">(.*?)</pre>', run.stdout, re.DOTALL)
    assert found and found.group(1), f"the page wrote nothing: {run.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


@pytest.fixture(scope="module")
def browser_results(chromium, tmp_path_factory):
    from tokenizers import Tokenizer

    base = json.loads(trained())
    specs = [base, variant(base)]
    texts = list(SAMPLES.values()) + random_texts(400) + class_probes()
    texts += [f"{EXTRA_ADDED[0]}a {EXTRA_ADDED[1]}{EXTRA_ADDED[0]} zzzq zzzqq héllo!<|endoftext|>"]
    rng = random.Random(1)
    size = len(base["model"]["vocab"])
    id_lists = [[rng.randrange(-2, size + 5) for _ in range(rng.randrange(0, 12))] for _ in range(400)]
    speed = (ENGLISH + MULTIBYTE + SAMPLES["python-indent-tabs-crlf"]) * 8
    cases = {"texts": texts, "idLists": id_lists, "speed": speed[:2000]}
    results = run_page(chromium, tmp_path_factory.mktemp("lab-tokenizer"), specs, cases)
    return [Tokenizer.from_str(json.dumps(s)) for s in specs], cases, results


@pytest.mark.parametrize("which", [0, 1], ids=["trained", "shuffled-ids-added-tokens-ignore-merges"])
def test_encode_equals_the_library(browser_results, which):
    toks, cases, results = browser_results
    tok, got = toks[which], results[which]
    names = list(SAMPLES) + [f"text{i}" for i in range(len(cases["texts"]) - len(SAMPLES))]
    for name, text, ids in zip(names, cases["texts"], got["encoded"]):
        assert ids == tok.encode(text, add_special_tokens=False).ids, (name, text)
    assert got["eot"] == tok.token_to_id(tokenizer.EOT)
    assert got["vocabSize"] == tok.get_vocab_size(with_added_tokens=True)


@pytest.mark.parametrize("which", [0, 1], ids=["trained", "shuffled-ids-added-tokens-ignore-merges"])
def test_decode_equals_the_library(browser_results, which):
    toks, cases, results = browser_results
    tok, got = toks[which], results[which]
    for text, ids, decoded, raw in zip(cases["texts"], got["encoded"], got["decoded"], got["raw"]):
        assert decoded == tok.decode(ids), text
        assert raw == tok.decode(ids, skip_special_tokens=False), text
    for ids, decoded, raw in zip(cases["idLists"], got["idDecoded"], got["idRaw"]):
        known = [i for i in ids if i >= 0]  # the library refuses negative ids; the page drops them
        assert decoded == tok.decode(known), ids  # bad UTF-8 and unknown ids as the library has them
        assert raw == tok.decode(known, skip_special_tokens=False), ids


def test_pieces_are_the_pre_tokenizers(browser_results):
    """The split alone, whatever the merges: the shipped letters, numbers and whitespace are
    the library's, not the browser's own \\p{L} and \\s."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str
    _, cases, results = browser_results
    for text, pieces in zip(cases["texts"], results[0]["pieces"]):
        assert pieces == [text[a:b] for _, (a, b) in split(text)], text


def test_encoded_text_round_trips_and_shows_each_token(browser_results):
    toks, cases, results = browser_results
    tok, got = toks[0], results[0]
    for text, raw in zip(cases["texts"], got["raw"]):
        assert raw == text
    assert got["strings"] == [tok.decode([i], skip_special_tokens=False) for i in range(tok.get_vocab_size())]
    assert got["speedTokens"] == len(tok.encode(cases["speed"], add_special_tokens=False).ids)
    assert got["coldMs"] >= 0 and got["warmMs"] >= 0  # timed in the page; how fast is a benchmark's business


def test_character_classes_are_the_librarys():
    """The ranges read off one pass of the pre-tokenizer agree with asking it about each
    character alone."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str
    classes = character_classes()
    rng = random.Random(2)
    points = [0x20, 0x85, 0xA0, 0xFEFF, 0x3000, 0x88F, 0xA7CE, 0x10940, 0x11DE0, 0x16FF4, 0x10FFFF]
    points += [c for c in (rng.randrange(0x110000) for _ in range(3000)) if not 0xD800 <= c < 0xE000]
    for c in points:
        shipped = next((k for k, ranges in classes.items() if any(lo <= c <= hi for lo, hi in ranges)), "O")
        assert shipped == _kind(split, chr(c)), hex(c)


def test_script_is_small_ascii_and_complete():
    spec = json.loads(trained())
    script = tokenizer_script(spec)
    assert script == tokenizer_script(json.dumps(spec))
    assert script.startswith("window.MONOFAST_TOKENIZER = {") and script.endswith("};\n")
    assert script.isascii()  # the page's charset does not matter
    data = json.loads(script[len("window.MONOFAST_TOKENIZER = "):-2])
    merges = len(spec["model"]["merges"])
    assert len(data["merges"]) == 2 * merges * data["width"] and data["width"] == 2
    assert data["bytes"] == 1 and data["mergeIds"] == 257 and data["tokens"] == []  # the trainer's numbering
    assert len(script) < 3_000 + 4 * merges + 4_500  # fields, merges, character classes
    assert byte_alphabet()[ord(" ")] == "Ġ" and len(set(byte_alphabet())) == 256


def _without_eot(spec):
    spec["added_tokens"] = []


REFUSED = {
    "wordpiece": (lambda s: s["model"].update(type="WordPiece"), "model is 'WordPiece'"),
    "whitespace-pre-tokenizer": (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "pre-tokenizer"),
    "prefix-space": (lambda s: s["pre_tokenizer"].update(add_prefix_space=True), "add_prefix_space"),
    "no-regex": (lambda s: s["pre_tokenizer"].update(use_regex=False), "split pattern"),
    "normalizer": (lambda s: s.update(normalizer={"type": "NFC"}), "normalizer"),
    "decoder": (lambda s: s.update(decoder={"type": "WordPiece"}), "decoder"),
    "dropout": (lambda s: s["model"].update(dropout=0.1), "dropout"),
    "no-eot": (_without_eot, "<|endoftext|>"),
    "missing-byte": (lambda s: s["model"]["vocab"].pop("Ā"), "byte tokens"),
    "lstrip": (lambda s: s["added_tokens"][0].update(lstrip=True), "lstrip"),
    "no-model": (lambda s: s.pop("model"), "no model"),
    "empty-added-token": (lambda s: s["added_tokens"][0].update(content=""), "is empty"),
    "merges-out-of-order": (lambda s: s["model"]["merges"].reverse(), "only a later merge makes"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_other_tokenizers_are_refused(name):
    spec = json.loads(trained())
    change, message = REFUSED[name]
    change(spec)
    with pytest.raises(ValueError, match=re.escape(message)):
        tokenizer_script(spec)
