/* The run's tokenizer in plain JavaScript, encoding exactly as the `tokenizers` library
 * does with add_special_tokens=False (checked token for token in tests/site/test_lab_tokenizer.py).
 *
 *   var tok = MonofastTokenizer.load(window.MONOFAST_TOKENIZER);  // data: lab/tokenizer.js
 *   tok.encode(text)            -> Int32Array of token ids
 *   tok.decode(ids, skipSpecial) -> text, as tokenizer.decode (special tokens left out
 *                                  unless skipSpecial === false; bad UTF-8 as U+FFFD)
 *   tok.tokenStrings(ids)       -> each token's own text, for display
 *   tok.tokenBytes(id)          -> a token's bytes (Uint8Array)
 *   tok.pieces(text)            -> the pre-tokenizer's split of text (added tokens not cut out)
 *   tok.eot, tok.vocabSize
 *
 * The library's pipeline, step by step: added tokens (<|endoftext|>) are cut out of the
 * text first, leftmost-longest; each piece between them is split by GPT-2's pattern
 * 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * with the library's own letters, numbers and whitespace (shipped as code point ranges:
 * the browser's \p{L} follows a newer Unicode, and its \s differs); each split's UTF-8
 * bytes become byte tokens, merged by rank exactly as the library's BPE merges them.
 */
(function () {
  "use strict";

  var FORMAT = 1; // monofast.site.lab_tokenizer.FORMAT
  var CACHE_LIMIT = 20000; // split pieces remembered; the cache is dropped when full

  /** GPT-2's byte-to-unicode map: byte b's character in token strings. */
  function byteAlphabet() {
    var chars = [];
    var extra = 256;
    for (var b = 0; b < 256; b++) {
      var printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
      chars.push(String.fromCharCode(printable ? b : extra++));
    }
    return chars;
  }

  /** "gap,length-1,gap,length-1,..." in base 36 -> a regex class body "\u{41}-\u{5a}...". */
  function classBody(text) {
    var numbers = text ? text.split(",") : [];
    var body = "";
    var after = 0;
    for (var i = 0; i < numbers.length; i += 2) {
      var lo = after + parseInt(numbers[i], 36);
      var hi = lo + parseInt(numbers[i + 1], 36);
      body += "\\u{" + lo.toString(16) + "}" + (hi > lo ? "-\\u{" + hi.toString(16) + "}" : "");
      after = hi + 1;
    }
    return body;
  }

  /** GPT-2's split pattern over the library's character classes. */
  function splitPattern(classes) {
    var L = classBody(classes.L);
    var N = classBody(classes.N);
    var S = classBody(classes.S);
    return new RegExp("'s|'t|'re|'ve|'m|'ll|'d| ?[" + L + "]+| ?[" + N + "]+| ?[^" + S + L + N + "]+" +
                      "|[" + S + "]+(?![^" + S + "])|[" + S + "]+", "gu");
  }

  function escapeRegExp(text) {
    return text.replace(/[\\^$.*+?()[\]{}|\/]/g, "\\$&");
  }

  /** A function cutting `added` tokens ([id, content]) out of a list of strings and ids:
   * leftmost match first, the longest of those starting there (the library's Aho-Corasick). */
  function cutter(added) {
    if (!added.length) {
      return function (parts) { return parts; };
    }
    var ids = new Map();
    added.forEach(function (t) { ids.set(t[1], t[0]); });
    var contents = added.map(function (t) { return t[1]; }).sort(function (a, b) { return b.length - a.length; });
    var pattern = new RegExp(contents.map(escapeRegExp).join("|"), "g");
    return function (parts) {
      var out = [];
      parts.forEach(function (part) {
        if (typeof part !== "string") {
          out.push(part);
          return;
        }
        var last = 0;
        var m;
        pattern.lastIndex = 0;
        while ((m = pattern.exec(part)) !== null) {
          if (m.index > last) { out.push(part.slice(last, m.index)); }
          out.push(ids.get(m[0]));
          last = pattern.lastIndex;
        }
        if (last < part.length) { out.push(last ? part.slice(last) : part); }
      });
      return out;
    };
  }

  /** UTF-8 bytes of `text` as byte-token ids; a lone surrogate counts as U+FFFD (as
   * TextEncoder does; the library cannot be given one). */
  function byteTokens(text, byteIds) {
    var out = [];
    for (var i = 0; i < text.length; i++) {
      var c = text.codePointAt(i);
      if (c > 0xffff) { i++; }
      if (c >= 0xd800 && c < 0xe000) { c = 0xfffd; }
      if (c < 0x80) {
        out.push(byteIds[c]);
      } else if (c < 0x800) {
        out.push(byteIds[0xc0 | (c >> 6)], byteIds[0x80 | (c & 63)]);
      } else if (c < 0x10000) {
        out.push(byteIds[0xe0 | (c >> 12)], byteIds[0x80 | ((c >> 6) & 63)], byteIds[0x80 | (c & 63)]);
      } else {
        out.push(byteIds[0xf0 | (c >> 18)], byteIds[0x80 | ((c >> 12) & 63)], byteIds[0x80 | ((c >> 6) & 63)],
                 byteIds[0x80 | (c & 63)]);
      }
    }
    return out;
  }

  /** A binary min-heap of numbers (rank * length + position: lowest rank first, then leftmost). */
  function heapPush(heap, key) {
    var i = heap.length;
    heap.push(key);
    while (i > 0) {
      var up = (i - 1) >> 1;
      if (heap[up] <= key) { break; }
      heap[i] = heap[up];
      i = up;
    }
    heap[i] = key;
  }

  function heapPop(heap) {
    var top = heap[0];
    var last = heap.pop();
    if (heap.length) {
      var i = 0;
      var n = heap.length;
      for (;;) {
        var child = 2 * i + 1;
        if (child >= n) { break; }
        if (child + 1 < n && heap[child + 1] < heap[child]) { child++; }
        if (heap[child] >= last) { break; }
        heap[i] = heap[child];
        i = child;
      }
      heap[i] = last;
    }
    return top;
  }

  /** The library's BPE (models/bpe/word.rs merge_all, without dropout): merge the pair of
   * lowest rank, leftmost first, until none is left; a queued pair is skipped when the
   * symbols at its place no longer make its token. */
  function mergeAll(symbols, rankOf, mergeIds) {
    var n = symbols.length;
    if (n < 2) { return symbols; }
    var c = Int32Array.from(symbols);
    var prev = new Int32Array(n);
    var next = new Int32Array(n);
    var alive = new Uint8Array(n).fill(1);
    var heap = [];
    var rank;
    for (var i = 0; i < n; i++) {
      prev[i] = i - 1;
      next[i] = i + 1 < n ? i + 1 : -1;
      if (i + 1 < n && (rank = rankOf(c[i], c[i + 1])) >= 0) { heapPush(heap, rank * n + i); }
    }
    while (heap.length) {
      var key = heapPop(heap);
      var pos = key % n;
      var made = mergeIds[(key - pos) / n];
      var right = next[pos];
      if (!alive[pos] || right < 0) { continue; }
      rank = rankOf(c[pos], c[right]);
      if (rank < 0 || mergeIds[rank] !== made) { continue; }
      c[pos] = made;
      alive[right] = 0;
      next[pos] = next[right];
      if (next[pos] >= 0) { prev[next[pos]] = pos; }
      if (prev[pos] >= 0 && (rank = rankOf(c[prev[pos]], made)) >= 0) { heapPush(heap, rank * n + prev[pos]); }
      if (next[pos] >= 0 && (rank = rankOf(made, c[next[pos]])) >= 0) { heapPush(heap, rank * n + pos); }
    }
    var out = [];
    for (var j = 0; j >= 0; j = next[j]) { out.push(c[j]); }
    return out;
  }

  function load(data) {
    if (!data || data.format !== FORMAT) {
      throw new Error("lab/tokenizer.js has format " + (data && data.format) + " where this page reads format " +
                      FORMAT + ": rebuild the site with `monofast site --force`");
    }
    var alphabet = byteAlphabet();
    var byteIds = new Int32Array(256);
    if (typeof data.bytes === "number") { // consecutive ids over the alphabet in code point order
      var order = alphabet.map(function (_, b) { return b; });
      order.sort(function (x, y) { return alphabet[x].charCodeAt(0) - alphabet[y].charCodeAt(0); });
      order.forEach(function (b, k) { byteIds[b] = data.bytes + k; });
    } else {
      byteIds.set(data.bytes);
    }
    var width = data.width;
    var count = data.merges.length / (2 * width);
    var left = new Int32Array(count);
    var right = new Int32Array(count);
    var mergeIds = new Int32Array(count);
    for (var k = 0; k < count; k++) {
      left[k] = parseInt(data.merges.substr(2 * k * width, width), 36);
      right[k] = parseInt(data.merges.substr((2 * k + 1) * width, width), 36);
      mergeIds[k] = typeof data.mergeIds === "number" ? data.mergeIds + k : data.mergeIds[k];
    }

    // Every token's string: bytes, then merges in rank order (each is its parts joined).
    var strings = [];
    var special = new Set();
    alphabet.forEach(function (ch, b) { strings[byteIds[b]] = ch; });
    data.tokens.forEach(function (t) { strings[t[0]] = t[1]; });
    for (k = 0; k < count; k++) { strings[mergeIds[k]] = strings[left[k]] + strings[right[k]]; }
    var vocabSize = strings.length;
    var modelVocab = null; // string -> id, for ignore_merges only
    if (data.ignoreMerges) {
      modelVocab = new Map();
      strings.forEach(function (s, id) { if (s !== undefined) { modelVocab.set(s, id); } });
    }
    data.added.forEach(function (t) {
      strings[t[0]] = t[1];
      if (t[2]) { special.add(t[0]); }
    });
    vocabSize = strings.length;

    var ranks = new Map(); // left * vocabSize + right -> rank (a later duplicate wins, as in the library)
    for (k = 0; k < count; k++) { ranks.set(left[k] * vocabSize + right[k], k); }
    function rankOf(a, b) {
      var r = ranks.get(a * vocabSize + b);
      return r === undefined ? -1 : r;
    }

    // Tokens without normalization are cut out first, then the others, as the library does.
    var cutRaw = cutter(data.added.filter(function (t) { return !t[3]; }));
    var cutNormalized = cutter(data.added.filter(function (t) { return t[3]; }));
    var pattern = splitPattern(data.classes);
    var cache = new Map();

    function word(piece, out) {
      var ids = cache.get(piece);
      if (ids === undefined) {
        var symbols = byteTokens(piece, byteIds);
        var whole = modelVocab && modelVocab.get(symbols.map(function (id) { return strings[id]; }).join(""));
        ids = whole !== undefined && whole !== null ? [whole] : mergeAll(symbols, rankOf, mergeIds);
        if (cache.size >= CACHE_LIMIT) { cache.clear(); }
        cache.set(piece, ids);
      }
      for (var i = 0; i < ids.length; i++) { out.push(ids[i]); }
    }

    /** Calls each(piece) for the pre-tokenizer's pieces of `text`, in order. */
    function split(text, each) {
      var last = 0;
      var m;
      pattern.lastIndex = 0;
      while ((m = pattern.exec(text)) !== null) {
        if (m.index > last) { each(text.slice(last, m.index)); } // never: the pattern covers all text
        each(m[0]);
        last = pattern.lastIndex;
      }
      if (last < text.length) { each(text.slice(last)); }
    }

    function encode(text) {
      var parts = cutNormalized(cutRaw([String(text)]));
      var out = [];
      function add(piece) { word(piece, out); }
      for (var p = 0; p < parts.length; p++) {
        if (typeof parts[p] === "number") {
          out.push(parts[p]);
        } else {
          split(parts[p], add);
        }
      }
      return Int32Array.from(out);
    }

    function pieces(text) {
      var out = [];
      split(String(text), function (piece) { out.push(piece); });
      return out;
    }

    // Decoding: the ByteLevel decoder maps each token's characters back to bytes (a token
    // with a character outside the byte alphabet, like an added "<|end of text|>", gives
    // its own UTF-8), and the bytes are read as UTF-8 with U+FFFD for each bad sequence.
    var charByte = new Map();
    alphabet.forEach(function (ch, b) { charByte.set(ch, b); });
    var utf8 = new TextEncoder();
    var lenient = new TextDecoder("utf-8", { ignoreBOM: true }); // keep a leading U+FEFF, as the library does
    var bytesCache = [];

    function tokenBytes(id) {
      var s = strings[id];
      if (s === undefined) { return new Uint8Array(0); }
      var bytes = bytesCache[id];
      if (bytes === undefined) {
        bytes = new Uint8Array(s.length);
        for (var i = 0; i < s.length; i++) {
          var b = charByte.get(s[i]);
          if (b === undefined) {
            bytes = utf8.encode(s);
            break;
          }
          bytes[i] = b;
        }
        bytesCache[id] = bytes;
      }
      return bytes;
    }

    function known(id) {
      return Number.isInteger(id) && id >= 0 && strings[id] !== undefined;
    }

    function decode(ids, skipSpecial) {
      var skip = skipSpecial !== false;
      var chunks = [];
      var total = 0;
      for (var i = 0; i < ids.length; i++) {
        var id = ids[i];
        if (!known(id) || (skip && special.has(id))) { continue; } // unknown ids are dropped, as by the library
        var bytes = tokenBytes(id);
        chunks.push(bytes);
        total += bytes.length;
      }
      var all = new Uint8Array(total);
      var at = 0;
      chunks.forEach(function (b) { all.set(b, at); at += b.length; });
      return lenient.decode(all);
    }

    function tokenStrings(ids) {
      var out = [];
      for (var i = 0; i < ids.length; i++) {
        var id = ids[i];
        out.push(!known(id) ? "" : special.has(id) ? strings[id] : lenient.decode(tokenBytes(id)));
      }
      return out;
    }

    return {
      encode: encode,
      decode: decode,
      tokenStrings: tokenStrings,
      tokenBytes: tokenBytes,
      pieces: pieces,
      eot: data.eot,
      vocabSize: vocabSize
    };
  }

  window.MonofastTokenizer = { load: load };
})();
