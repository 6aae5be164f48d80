/* monofast lab engine: the run's GPT and SAE encoder in the page, from lab/model.js.

   MonofastLab.load(window.MONOFAST_MODEL, {backend}) decodes the fp16 weights once and
   returns a lab:

     lab.config                        the model's shape (n_layer ... d_sae, sae_variant, k)
     lab.backend                       "wasm-fma", "wasm" or "js": who multiplies the matrices
     lab.loadMs                        what decoding and laying out the weights took
     lab.forward(ids, opts)            {T, acts, feats, logits}: acts (T * d_mlp) the post-GELU
                                       activation at the hooked layer after any clamps, feats
                                       (T * d_sae) the SAE's features of the unclamped
                                       activation, logits (T * vocab_size) with opts.logits
     lab.generate(ids, n, opts)        Int32Array of n new tokens (temperature 0: greedy)
     lab.window(ids)                   {ids, cut, dropped}: the last block_size ids
     lab.topFeatures(feats, t, n)      [{id, value}]: token t's strongest firing features
     lab.reset()                       forget the cached prefix

   opts of forward: clamps {feature: value}, logits (bool), cache (default true).
   opts of generate: temperature (0.8), topK (50; 0 or null: off), seed (0), clamps, cache.

   Read top to bottom: decoding the weights, the WebAssembly matrix product (assembled
   here from its opcodes: no build step, no file to fetch, so it works from file://), its
   plain JavaScript twin, the heap layout, then the lab itself.

   Everything is computed in fp32 from the fp16 weights, as the PyTorch model computes
   with the same rounded weights (tests/site/test_lab_engine.py holds every backend to it
   within 1e-3; they agree to ~1e-6). The clamp is monofast.sae.steer.clamp_hook's: act + (v - f_c) W_dec[c] for
   each clamped feature c, so what the SAE does not explain stays in the activation.

   Positions are causal, so the lab keeps what it computed for the last ids it saw (the
   keys and values of every layer, the hooked activation, the features, the logits) and
   on the next call computes only the positions after the common prefix: typing one more
   token costs one token, and generating uses the same cache as a KV cache. */
(function () {
  "use strict";

  // ------------------------------------------------------------------ decoding the weights

  /** Float32Array(65536): the value of every fp16 bit pattern. */
  function halfTable() {
    const table = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) {
      const sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
      table[h] = exp === 0 ? sign * man * 2 ** -24
        : exp === 31 ? (man ? NaN : sign * Infinity)
        : sign * (1024 + man) * 2 ** (exp - 25);
    }
    return table;
  }

  /** The fp16 words of `data`: a little-endian bit stream of 16-bit words cut into 13-bit
      groups, each written as two characters of the 91-character alphabet (low digit
      first), 16/13 characters per byte (base64 takes 4/3). 60-100 ms for 14 MB in Chromium
      on 2 busy cores. */
  function decodeWords(data, alphabet, count) {
    const digit = new Uint8Array(65536).fill(255);  // every UTF-16 code unit: a stray one is caught
    for (let i = 0; i < alphabet.length; i++) digit[alphabet.charCodeAt(i)] = i;
    const chars = 2 * Math.ceil(16 * count / 13);
    if (data.length !== chars) {
      throw new Error(`lab/model.js is damaged: ${data.length} characters of data where ${count} ` +
                      `weights take ${chars}; rebuild the site`);
    }
    const out = new Uint16Array(count);
    let acc = 0, bits = 0, o = 0, bad = 0;
    for (let i = 0; i < chars; i += 2) {
      const lo = digit[data.charCodeAt(i)], hi = digit[data.charCodeAt(i + 1)];
      bad |= lo | hi;
      acc |= (lo + 91 * hi) << bits;
      bits += 13;
      if (bits >= 16) { out[o++] = acc & 0xffff; acc >>>= 16; bits -= 16; }
    }
    if (bad & 128) throw new Error("lab/model.js is damaged: its data has characters outside the alphabet; rebuild the site");
    return out;
  }

  // ------------------------------------------------------------------ the WebAssembly matrix product

  /* mm(x, ldx, T, K, w, ws, np, b, y, ldy, relu), every pointer a byte address in the heap:
       y[t, 8p + l] = b[8p + l] + sum_k x[t, k] * w[p][k][l]   for t < T, p < np, l < 8
     then max(y, 0) where relu is 1 (NaN becomes 0, as the JavaScript twin's !(y > 0)).
     x rows of K floats at stride ldx; w in panels of 8 output columns, w[p] = ws floats of
     K rows of 8 (zero-padded past the last column); y rows at stride ldy, written 8
     columns at a time (row strides are padded to 8).
     Loop order: panel, then 4 rows at a time, then k. A panel (K x 8, 24 KB at K = 768)
     stays in L1 for all T rows; the 4 x 8 accumulators stay in 8 registers and each k costs
     2 vector loads, 4 scalar splats and 8 multiply-adds. Measured in Chromium on 2 Zen cores
     for 256 x 768 x 3072: 400 ms in plain JS (the i-k-j twin below), 32-44 ms with mul + add,
     25-31 ms with relaxed-SIMD fma; 1, 2 and 6 rows per block were slower or no faster. */

  function uleb(n) { const out = []; do { let b = n & 0x7f; n >>>= 7; if (n) b |= 0x80; out.push(b); } while (n); return out; }
  function sleb(n) {
    const out = [];
    for (;;) {
      const b = n & 0x7f; n >>= 7;
      if ((n === 0 && !(b & 0x40)) || (n === -1 && (b & 0x40))) { out.push(b); return out; }
      out.push(b | 0x80);
    }
  }
  function name(s) { return [...uleb(s.length), ...Array.from(s, (c) => c.charCodeAt(0))]; }
  function section(id, body) { return [id, ...uleb(body.length), ...body]; }

  const I32 = 0x7f, V128 = 0x7b;
  const op = {
    get: (i) => [0x20, i], set: (i) => [0x21, i], tee: (i) => [0x22, i], i32: (n) => [0x41, ...sleb(n)],
    add: [0x6a], sub: [0x6b], shl: [0x74], lt_s: [0x48], ge_s: [0x4e],
    block: [0x02, 0x40], loop: [0x03, 0x40], end: [0x0b], br: (d) => [0x0c, d], br_if: (d) => [0x0d, d],
    load: (offset) => [0xfd, 0x00, 4, ...uleb(offset)],       // v128.load
    store: (offset) => [0xfd, 0x0b, 4, ...uleb(offset)],      // v128.store
    splat: (offset) => [0xfd, 0x09, 2, ...uleb(offset)],      // v128.load32_splat
    fadd: [0xfd, 0xe4, 0x01], fmul: [0xfd, 0xe6, 0x01],       // f32x4.add, f32x4.mul
    fma: [0xfd, 0x85, 0x02],                                  // f32x4.relaxed_madd(a, b, c) = a b + c
    pmax: [0xfd, 0xeb, 0x01],                                 // f32x4.pmax(a, b) = a < b ? b : a
    zero: [0xfd, 0x0c, ...Array(16).fill(0)],                 // v128.const 0
    if_: [0x04, 0x40],
  };

  const ROWS = 4;

  /** The bytes of a module exporting mm, importing its memory as e.m; `fma` uses relaxed SIMD. */
  function assemble(fma) {
    const [x, ldx, T, K, w, ws, np, b, y, ldy, relu] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
    let n = 11;
    const p = n++, t = n++, k = n++, xr = n++, wp = n++, yr = n++, ldxb = n++, ldyb = n++, xrow = n++, yrow = n++;
    const i32Locals = n - 11;
    const bias0 = n++, bias1 = n++, w0 = n++, w1 = n++, s = n++;
    const acc = Array.from({ length: 2 * ROWS }, () => n++);
    const v128Locals = 5 + 2 * ROWS;
    const madd = (a, wv) => fma
      ? [...op.get(s), ...op.get(wv), ...op.get(a), ...op.fma, ...op.set(a)]
      : [...op.get(a), ...op.get(s), ...op.get(wv), ...op.fmul, ...op.fadd, ...op.set(a)];

    function rows(r) {  // r rows of output for panel p, starting at row t
      const c = [];
      for (let i = 0; i < r; i++) c.push(...op.get(bias0), ...op.set(acc[2 * i]), ...op.get(bias1), ...op.set(acc[2 * i + 1]));
      c.push(...op.get(w), ...op.set(wp), ...op.get(xrow), ...op.set(xr), ...op.get(K), ...op.set(k));
      c.push(...op.loop);
      c.push(...op.get(wp), ...op.load(0), ...op.set(w0), ...op.get(wp), ...op.load(16), ...op.set(w1));
      for (let i = 0; i < r; i++) {
        c.push(...op.get(xr));
        for (let j = 0; j < i; j++) c.push(...op.get(ldxb), ...op.add);
        c.push(...op.splat(0), ...op.set(s), ...madd(acc[2 * i], w0), ...madd(acc[2 * i + 1], w1));
      }
      c.push(...op.get(wp), ...op.i32(32), ...op.add, ...op.set(wp), ...op.get(xr), ...op.i32(4), ...op.add, ...op.set(xr));
      c.push(...op.get(k), ...op.i32(1), ...op.sub, ...op.tee(k), ...op.br_if(0), ...op.end);
      c.push(...op.get(relu), ...op.if_);
      for (const a of acc.slice(0, 2 * r)) c.push(...op.zero, ...op.get(a), ...op.pmax, ...op.set(a));
      c.push(...op.end);
      c.push(...op.get(yrow), ...op.set(yr));
      for (let i = 0; i < r; i++) {
        c.push(...op.get(yr), ...op.get(acc[2 * i]), ...op.store(0), ...op.get(yr), ...op.get(acc[2 * i + 1]), ...op.store(16));
        c.push(...op.get(yr), ...op.get(ldyb), ...op.add, ...op.set(yr));
      }
      for (const ptr of [xrow, yrow]) {
        c.push(...op.get(ptr));
        for (let i = 0; i < r; i++) c.push(...op.get(ptr === xrow ? ldxb : ldyb), ...op.add);
        c.push(...op.set(ptr));
      }
      c.push(...op.get(t), ...op.i32(r), ...op.add, ...op.set(t));
      return c;
    }

    const c = [];
    c.push(...op.get(ldx), ...op.i32(2), ...op.shl, ...op.set(ldxb), ...op.get(ldy), ...op.i32(2), ...op.shl, ...op.set(ldyb));
    c.push(...op.i32(0), ...op.set(p));
    c.push(...op.block, ...op.loop, ...op.get(p), ...op.get(np), ...op.ge_s, ...op.br_if(1));
    c.push(...op.get(b), ...op.load(0), ...op.set(bias0), ...op.get(b), ...op.load(16), ...op.set(bias1));
    c.push(...op.i32(0), ...op.set(t), ...op.get(x), ...op.set(xrow));
    c.push(...op.get(y), ...op.get(p), ...op.i32(5), ...op.shl, ...op.add, ...op.set(yrow));
    c.push(...op.block, ...op.loop, ...op.get(T), ...op.get(t), ...op.sub, ...op.i32(ROWS), ...op.lt_s, ...op.br_if(1),
           ...rows(ROWS), ...op.br(0), ...op.end, ...op.end);
    c.push(...op.block, ...op.loop, ...op.get(t), ...op.get(T), ...op.ge_s, ...op.br_if(1),
           ...rows(1), ...op.br(0), ...op.end, ...op.end);
    c.push(...op.get(p), ...op.i32(1), ...op.add, ...op.set(p));
    c.push(...op.get(w), ...op.get(ws), ...op.i32(2), ...op.shl, ...op.add, ...op.set(w));
    c.push(...op.get(b), ...op.i32(32), ...op.add, ...op.set(b));
    c.push(...op.br(0), ...op.end, ...op.end);

    const body = [...uleb(2), ...uleb(i32Locals), I32, ...uleb(v128Locals), V128, ...c, ...op.end];
    return new Uint8Array([
      0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00,
      ...section(1, [1, 0x60, 11, ...Array(11).fill(I32), 0]),             // type: (i32 x 11) -> ()
      ...section(2, [1, ...name("e"), ...name("m"), 0x02, 0x00, 0x00]),   // import memory e.m
      ...section(3, [1, 0]),                                              // one function
      ...section(7, [1, ...name("mm"), 0x00, 0]),                         // export it as mm
      ...section(10, [1, ...uleb(body.length), ...body]),
    ]);
  }

  /** The plain JavaScript twin of mm, on float offsets into the heap F (it accumulates in
      float64): the fallback where WebAssembly SIMD is missing. */
  function mmJS(F, x, ldx, T, K, w, ws, np, b, y, ldy, relu) {
    for (let p = 0; p < np; p++) {
      const wp = w + p * ws, bp = b + 8 * p;
      for (let t = 0; t < T; t++) {
        const xo = x + t * ldx;
        let a0 = F[bp], a1 = F[bp + 1], a2 = F[bp + 2], a3 = F[bp + 3];
        let a4 = F[bp + 4], a5 = F[bp + 5], a6 = F[bp + 6], a7 = F[bp + 7];
        for (let k = 0, wk = wp; k < K; k++, wk += 8) {
          const a = F[xo + k];
          a0 += a * F[wk]; a1 += a * F[wk + 1]; a2 += a * F[wk + 2]; a3 += a * F[wk + 3];
          a4 += a * F[wk + 4]; a5 += a * F[wk + 5]; a6 += a * F[wk + 6]; a7 += a * F[wk + 7];
        }
        if (relu) {
          a0 = a0 > 0 ? a0 : 0; a1 = a1 > 0 ? a1 : 0; a2 = a2 > 0 ? a2 : 0; a3 = a3 > 0 ? a3 : 0;
          a4 = a4 > 0 ? a4 : 0; a5 = a5 > 0 ? a5 : 0; a6 = a6 > 0 ? a6 : 0; a7 = a7 > 0 ? a7 : 0;
        }
        const yo = y + t * ldy + 8 * p;
        F[yo] = a0; F[yo + 1] = a1; F[yo + 2] = a2; F[yo + 3] = a3;
        F[yo + 4] = a4; F[yo + 5] = a5; F[yo + 6] = a6; F[yo + 7] = a7;
      }
    }
  }

  const BACKENDS = ["wasm-fma", "wasm", "js"];

  /** {heap: Float32Array, mm(x, ldx, T, K, w, ws, np, b, y, ldy, relu) on float offsets, name} for
      `floats` floats. backend "auto" takes the first of BACKENDS this browser runs; a named
      one that it cannot run is an error. */
  function makeBackend(floats, backend) {
    const want = backend || "auto";
    if (want !== "auto" && !BACKENDS.includes(want)) {
      throw new Error(`backend ${want} is unknown; choose auto, ${BACKENDS.join(", ")}`);
    }
    for (const fma of [true, false]) {
      const label = fma ? "wasm-fma" : "wasm";
      if (want !== "auto" && want !== label) continue;
      const bytes = assemble(fma);
      if (typeof WebAssembly !== "object" || !WebAssembly.validate(bytes)) {
        if (want === label) throw new Error(`this browser cannot run the ${label} backend; load the lab with backend "auto"`);
        continue;
      }
      const memory = new WebAssembly.Memory({ initial: Math.ceil((4 * floats + 64) / 65536) });
      const mm4 = new WebAssembly.Instance(new WebAssembly.Module(bytes), { e: { m: memory } }).exports.mm;
      const heap = new Float32Array(memory.buffer, 0, floats);
      const mm = (x, ldx, T, K, w, ws, np, b, y, ldy, relu) => {
        if (T > 0 && K > 0) mm4(4 * x, ldx, T, K, 4 * w, ws, np, 4 * b, 4 * y, ldy, relu ? 1 : 0);
        else mmJS(heap, x, ldx, T, K, w, ws, np, b, y, ldy, relu);  // the module's k loop needs K >= 1
      };
      return { heap, mm, name: label };
    }
    const heap = new Float32Array(floats);
    const mm = (x, ldx, T, K, w, ws, np, b, y, ldy, relu) => mmJS(heap, x, ldx, T, K, w, ws, np, b, y, ldy, relu);
    return { heap, mm, name: "js" };
  }

  // ------------------------------------------------------------------ small numerics

  const pad8 = (n) => (n + 7) & ~7;

  /** erfc(x) with fractional error < 1.2e-7 everywhere (Numerical Recipes' Chebyshev fit):
      the GELU is the exact (erf) one and JavaScript has no Math.erf. */
  function erfc(x) {
    const z = Math.abs(x), t = 1 / (1 + 0.5 * z);
    const r = t * Math.exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 +
      t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 +
      t * 0.17087277)))))))));
    return x >= 0 ? r : 2 - r;
  }

  /* GELU(x) = x Phi(x) with Phi(x) = erfc(-x / sqrt 2) / 2, by cubic Hermite interpolation
     of Phi and its slope (the normal density) on a grid of step 1/64 over [-6, 6]: within
     3e-8 of the erfc above, and 6.5x faster than calling it (1.3 ms against 8.6 for 196,608
     values, in V8). Past the grid GELU is x or 0 to within 6e-9 |x|. */
  const GELU_STEP = 64, GELU_EDGE = 6;
  let geluGrid = null;

  function geluTable() {
    if (geluGrid) return geluGrid;
    const n = 2 * GELU_EDGE * GELU_STEP + 2, value = new Float64Array(n), slope = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      const x = -GELU_EDGE + i / GELU_STEP;
      value[i] = 0.5 * erfc(-x * Math.SQRT1_2);
      slope[i] = Math.exp(-0.5 * x * x) / Math.sqrt(2 * Math.PI) / GELU_STEP;  // dPhi per grid step
    }
    return (geluGrid = { value, slope });
  }

  /** GELU in place on F[from, from + n). */
  function gelu(F, from, n) {
    const { value, slope } = geluTable();
    for (let j = from; j < from + n; j++) {
      const v = F[j];
      if (v >= GELU_EDGE) continue;
      if (v <= -GELU_EDGE) { F[j] = 0; continue; }
      const u = (v + GELU_EDGE) * GELU_STEP, i = u | 0, s = u - i, s2 = s * s, s3 = s2 * s;
      F[j] = v * ((2 * s3 - 3 * s2 + 1) * value[i] + (s3 - 2 * s2 + s) * slope[i] +
                  (3 * s2 - 2 * s3) * value[i + 1] + (s3 - s2) * slope[i + 1]);
    }
  }

  /** A small seeded PRNG (mulberry32): uniform numbers in [0, 1). */
  function mulberry32(seed) {
    let a = seed | 0;
    return function () {
      a = (a + 0x6d2b79f5) | 0;
      let t = Math.imul(a ^ (a >>> 15), 1 | a);
      t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
  }

  /** The k-th largest of values[0..n) (k >= 1), by quickselect on `scratch`. */
  function kthLargest(values, n, k, scratch) {
    for (let i = 0; i < n; i++) scratch[i] = values[i];
    let lo = 0, hi = n - 1;
    const want = k - 1;  // index in descending order
    while (lo < hi) {
      const pivot = scratch[(lo + hi) >> 1];
      let i = lo, j = hi;
      while (i <= j) {
        while (scratch[i] > pivot) i++;
        while (scratch[j] < pivot) j--;
        if (i <= j) { const tmp = scratch[i]; scratch[i] = scratch[j]; scratch[j] = tmp; i++; j--; }
      }
      if (want <= j) hi = j; else if (want >= i) lo = i; else break;
    }
    return scratch[want];
  }

  // ------------------------------------------------------------------ the lab

  const ATTENTION_ROWS = 32;
  const REQUIRED = ["n_layer", "n_head", "n_embd", "block_size", "vocab_size", "layer", "d_mlp", "d_sae"];

  class Lab {
    constructor(model, options) {
      if (!model || typeof model !== "object" || !model.config || typeof model.data !== "string") {
        throw new Error("no model: lab/model.js did not load (window.MONOFAST_MODEL is missing); rebuild the site");
      }
      const cfg = model.config;
      for (const key of REQUIRED) {
        if (!Number.isInteger(cfg[key]) || cfg[key] < (key === "layer" ? 0 : 1)) {
          throw new Error(`lab/model.js is damaged: config.${key} is ${cfg[key]}; rebuild the site`);
        }
      }
      if (cfg.layer >= cfg.n_layer || cfg.n_embd % cfg.n_head || cfg.d_mlp !== 4 * cfg.n_embd) {
        throw new Error("lab/model.js is damaged: its config does not describe a monofast GPT; rebuild the site");
      }
      this.config = Object.assign({}, cfg);
      const started = performance.now();
      this._layout(cfg);
      const back = makeBackend(this.size, options.backend);
      this.backend = back.name;
      this.F = back.heap;
      this.mm = back.mm;
      this._loadWeights(model);
      this.loadMs = performance.now() - started;
      this.reset();
    }

    // ---------------------------------------------------------------- heap layout

    /** Offsets (in floats) of every weight and buffer; the row strides are padded to 8. */
    _layout(cfg) {
      const C = cfg.n_embd, H = cfg.n_head, hd = C / H, D = cfg.d_mlp, Fs = cfg.d_sae;
      const V = cfg.vocab_size, B = cfg.block_size;
      const s = { C, H, hd, D, Fs, V, B, L: cfg.layer, NL: cfg.n_layer,
                  Cs: pad8(C), Q3: pad8(3 * C), Dp: pad8(D), Fp: pad8(Fs), Vp: pad8(V), Bp: pad8(B), Hp: pad8(hd) };
      this.s = s;
      let top = 0;
      const take = (n) => { const at = top; top += (n + 3) & ~3; return at; };
      const panels = (rows, cols) => take(pad8(cols) * rows);  // K = rows, N = cols
      this.w = { blocks: [] };
      for (let l = 0; l < s.NL; l++) {
        this.w.blocks.push({
          ln1w: take(C), ln1b: take(C), attn: panels(C, 3 * C), attnB: take(s.Q3), proj: panels(C, C), projB: take(s.Cs),
          ln2w: take(C), ln2b: take(C), fc: panels(C, D), fcB: take(s.Dp), out: panels(D, C), outB: take(s.Cs),
          K: Array.from({ length: H }, () => take(pad8(B) * hd)),   // [B/8][hd][8]: position panels
          Vc: Array.from({ length: H }, () => take(s.Hp * B)),      // [hd/8][B][8]: dimension panels
        });
      }
      Object.assign(this.w, {
        wte: panels(C, V), wpe: take(B * C), lnfw: take(C), lnfb: take(C),
        enc: panels(D, Fs), encB: take(s.Fp), dec: take(Fs * D),
      });
      const widest = Math.max(s.Q3, s.Cs, s.Dp, s.Fp, s.Vp, s.Hp, s.Bp);
      this.buf = {
        zero: take(widest), x: take(B * s.Cs), h: take(B * s.Cs), att: take(B * s.Cs), tmp: take(B * s.Cs),
        mid: take(B * s.Cs), fin: take(B * s.Cs), qkv: take(B * s.Q3), mlp: take(B * s.Dp), raw: take(B * s.Dp),
        acts: take(B * s.Dp), feats: take(B * s.Fp), logits: take(B * s.Vp), S: take(B * s.Bp), Y: take(B * s.Hp),
      };
      this.size = top;
    }

    /** Decode model.data and put every tensor where the layout wants it. */
    _loadWeights(model) {
      const s = this.s, F = this.F, half = halfTable();
      const enc = model.encoding || {};
      if (enc.dtype !== "float16" || typeof enc.alphabet !== "string" || enc.alphabet.length !== 91) {
        throw new Error("lab/model.js has an encoding this engine does not read; rebuild the site");
      }
      const index = new Map(model.tensors.map((t) => [t.name, t]));
      const words = decodeWords(model.data, enc.alphabet, model.count);
      const get = (nm, shape, optional) => {
        const t = index.get(nm);
        if (!t) {
          if (optional) return null;
          throw new Error(`lab/model.js is damaged: it has no tensor ${nm}; rebuild the site`);
        }
        if (t.shape.join("x") !== shape.join("x") || t.offset + shape.reduce((a, b) => a * b, 1) > words.length) {
          throw new Error(`lab/model.js is damaged: ${nm} has shape ${t.shape} where ${shape} was expected; rebuild the site`);
        }
        return t.offset;
      };
      const plain = (nm, n, dst, optional) => {
        const at = get(nm, [n], optional);
        if (at !== null) for (let i = 0; i < n; i++) F[dst + i] = half[words[at + i]];
      };
      // A torch Linear weight (out, in) -> panels [out/8][in][8].
      const outIn = (nm, out, inn, dst) => {
        const at = get(nm, [out, inn]);
        for (let o = 0; o < out; o++) {
          const to = dst + (o >> 3) * inn * 8 + (o & 7), from = at + o * inn;
          for (let k = 0; k < inn; k++) F[to + 8 * k] = half[words[from + k]];
        }
      };
      const C = s.C, D = s.D, nob = !this.config.bias;  // without biases their buffers stay zero
      for (let l = 0; l < s.NL; l++) {
        const w = this.w.blocks[l], p = `h.${l}.`;
        plain(p + "ln_1.weight", C, w.ln1w); plain(p + "ln_1.bias", C, w.ln1b, nob);
        outIn(p + "attn.c_attn.weight", 3 * C, C, w.attn); plain(p + "attn.c_attn.bias", 3 * C, w.attnB, nob);
        outIn(p + "attn.c_proj.weight", C, C, w.proj); plain(p + "attn.c_proj.bias", C, w.projB, nob);
        plain(p + "ln_2.weight", C, w.ln2w); plain(p + "ln_2.bias", C, w.ln2b, nob);
        outIn(p + "mlp.c_fc.weight", D, C, w.fc); plain(p + "mlp.c_fc.bias", D, w.fcB, nob);
        outIn(p + "mlp.c_proj.weight", C, D, w.out); plain(p + "mlp.c_proj.bias", C, w.outB, nob);
      }
      outIn("wte.weight", s.V, C, this.w.wte);
      const wpe = get("wpe.weight", [s.B, C]);
      for (let i = 0; i < s.B * C; i++) F[this.w.wpe + i] = half[words[wpe + i]];
      plain("ln_f.weight", C, this.w.lnfw); plain("ln_f.bias", C, this.w.lnfb, nob);
      // The SAE's folded encoder (in, out) -> panels [d_sae/8][d_mlp][8].
      const encAt = get("sae.W_enc", [D, s.Fs]);
      for (let k = 0; k < D; k++) {
        const from = encAt + k * s.Fs;
        for (let j = 0; j < s.Fs; j++) F[this.w.enc + (j >> 3) * D * 8 + 8 * k + (j & 7)] = half[words[from + j]];
      }
      plain("sae.b_enc", s.Fs, this.w.encB);
      const dec = get("sae.W_dec", [s.Fs, D]);
      for (let i = 0; i < s.Fs * D; i++) F[this.w.dec + i] = half[words[dec + i]];
    }

    // ---------------------------------------------------------------- the cache of the last ids

    /** Forget every computed position. */
    reset() {
      this.ids = new Int32Array(this.s.B);
      this.n = 0;          // ids held
      this.nHook = 0;      // positions with the hooked activation (and K, V of layers <= hook)
      this.nFeats = 0;     // positions with feature activations
      this.nActs = 0;      // positions with the clamped activation, for clampKey
      this.nRest = 0;      // positions with K, V of the later layers and the final residual, for clampKey
      this.clampKey = "";
      this.logitsOk = new Uint8Array(this.s.B);
    }

    /** Keep what was computed for the longest common prefix of ids and the held ids. */
    _sync(ids, clamps) {
      let P = 0;
      const n = Math.min(ids.length, this.n);
      while (P < n && ids[P] === this.ids[P]) P++;
      this.ids.set(ids);
      this.n = ids.length;
      this.nHook = Math.min(this.nHook, P);
      this.nFeats = Math.min(this.nFeats, P);
      if (clamps.key !== this.clampKey) {
        this.clampKey = clamps.key;
        this.nActs = 0;
        this.nRest = 0;
        this.logitsOk.fill(0);
      }
      this.nActs = Math.min(this.nActs, P);
      this.nRest = Math.min(this.nRest, P);
      this.logitsOk.fill(0, P);
    }

    // ---------------------------------------------------------------- the model's pieces

    _layerNorm(src, dst, from, to, wt, bias) {
      const F = this.F, C = this.s.C, Cs = this.s.Cs;
      for (let t = from; t < to; t++) {
        const a = src + t * Cs, o = dst + t * Cs;
        let mean = 0;
        for (let c = 0; c < C; c++) mean += F[a + c];
        mean /= C;
        let vr = 0;
        for (let c = 0; c < C; c++) { const d = F[a + c] - mean; vr += d * d; }
        const inv = 1 / Math.sqrt(vr / C + 1e-5);
        for (let c = 0; c < C; c++) F[o + c] = (F[a + c] - mean) * inv * F[wt + c] + F[bias + c];
      }
    }

    /** y rows [from, to) = x rows @ W + b, for a Linear of `rows` inputs and `cols` outputs. */
    _linear(x, ldx, from, to, rows, cols, w, b, y, ldy) {
      this.mm(x + from * ldx, ldx, to - from, rows, w, 8 * rows, pad8(cols) >> 3, b, y + from * ldy, ldy);
    }

    _embed(from, to) {
      const F = this.F, s = this.s, C = s.C, ids = this.ids;
      for (let t = from; t < to; t++) {
        const id = ids[t], row = this.w.wte + (id >> 3) * C * 8 + (id & 7), x = this.buf.x + t * s.Cs;
        for (let c = 0; c < C; c++) F[x + c] = F[row + 8 * c] + F[this.w.wpe + t * C + c];
      }
    }

    /** x rows [from, to) += attention of block l; stores their keys and values. */
    _attention(l, from, to) {
      const F = this.F, s = this.s, w = this.w.blocks[l], buf = this.buf;
      const { C, Cs, Q3, H, hd, Hp, Bp, B } = s;
      this._layerNorm(buf.x, buf.h, from, to, w.ln1w, w.ln1b);
      this._linear(buf.h, Cs, from, to, C, 3 * C, w.attn, w.attnB, buf.qkv, Q3);
      for (let t = from; t < to; t++) {
        const q = buf.qkv + t * Q3;
        for (let h = 0; h < H; h++) {
          const kp = w.K[h] + (t >> 3) * hd * 8 + (t & 7), vp = w.Vc[h] + 8 * t;
          for (let d = 0; d < hd; d++) {
            F[kp + 8 * d] = F[q + C + h * hd + d];
            F[vp + (d >> 3) * B * 8 + (d & 7)] = F[q + 2 * C + h * hd + d];
          }
        }
      }
      // Queries in chunks of ATTENTION_ROWS, each against the keys up to its last row: the
      // products skip most of the causal mask's zeros (at T = 256, 1.1x the work a
      // triangle needs rather than 2x).
      const scale = 1 / Math.sqrt(hd);
      for (let a = from; a < to; a += ATTENTION_ROWS) {
        const end = Math.min(a + ATTENTION_ROWS, to), rows = end - a;
        for (let h = 0; h < H; h++) {
          // scores (rows, end) = q_h @ k_h^T, then a causal softmax in place
          this.mm(buf.qkv + a * Q3 + h * hd, Q3, rows, hd, w.K[h], hd * 8, pad8(end) >> 3, buf.zero, buf.S, Bp);
          for (let i = 0; i < rows; i++) {
            const t = a + i, r = buf.S + i * Bp;
            let max = -Infinity;
            for (let j = 0; j <= t; j++) max = Math.max(max, F[r + j] * scale);
            let sum = 0;
            for (let j = 0; j <= t; j++) { const e = Math.exp(F[r + j] * scale - max); F[r + j] = e; sum += e; }
            const inv = 1 / sum;
            for (let j = 0; j <= t; j++) F[r + j] *= inv;
            for (let j = t + 1; j < end; j++) F[r + j] = 0;
          }
          // y_h (rows, hd) = p @ v_h
          this.mm(buf.S, Bp, rows, end, w.Vc[h], B * 8, Hp >> 3, buf.zero, buf.Y, Hp);
          for (let i = 0; i < rows; i++) {
            const y = buf.Y + i * Hp, o = buf.att + (a + i) * Cs + h * hd;
            for (let d = 0; d < hd; d++) F[o + d] = F[y + d];
          }
        }
      }
      this._linear(buf.att, Cs, from, to, C, C, w.proj, w.projB, buf.tmp, Cs);
      this._addRows(buf.x, buf.tmp, from, to, C, Cs);
    }

    _addRows(dst, src, from, to, n, stride) {
      const F = this.F;
      for (let t = from; t < to; t++) {
        const a = dst + t * stride, b = src + t * stride;
        for (let c = 0; c < n; c++) F[a + c] += F[b + c];
      }
    }

    /** act rows [from, to) = GELU(ln_2(x) @ c_fc + b) of block l (the erf GELU, see gelu). */
    _mlpIn(l, from, to, act) {
      const F = this.F, s = this.s, w = this.w.blocks[l], buf = this.buf, D = s.D, Dp = s.Dp;
      this._layerNorm(buf.x, buf.h, from, to, w.ln2w, w.ln2b);
      this._linear(buf.h, s.Cs, from, to, s.C, D, w.fc, w.fcB, act, Dp);
      for (let t = from; t < to; t++) gelu(F, act + t * Dp, D);
    }

    /** x rows [from, to) = base + act @ c_proj + b of block l. */
    _mlpOut(l, from, to, act, base) {
      const s = this.s, w = this.w.blocks[l], buf = this.buf;
      this._linear(act, s.Dp, from, to, s.D, s.C, w.out, w.outB, buf.tmp, s.Cs);
      if (base !== buf.x) this.F.copyWithin(buf.x + from * s.Cs, base + from * s.Cs, base + to * s.Cs);
      this._addRows(buf.x, buf.tmp, from, to, s.C, s.Cs);
    }

    // ---------------------------------------------------------------- the stages

    /** Up to the hook: the unclamped activation `raw` for positions [nHook, T). */
    _toHook(T) {
      const from = this.nHook, buf = this.buf, s = this.s;
      if (from >= T) return;
      this._embed(from, T);
      for (let l = 0; l < s.L; l++) {
        this._attention(l, from, T);
        this._mlpIn(l, from, T, buf.mlp);
        this._mlpOut(l, from, T, buf.mlp, buf.x);
      }
      this._attention(s.L, from, T);
      this.F.copyWithin(buf.mid + from * s.Cs, buf.x + from * s.Cs, buf.x + T * s.Cs);
      this._mlpIn(s.L, from, T, buf.raw);
      this.nHook = T;
    }

    /** The SAE's features of `raw` for positions [nFeats, T): ReLU, or ReLU of the top k. */
    _encode(T) {
      const from = this.nFeats, s = this.s, F = this.F, buf = this.buf;
      if (from >= T) return;
      const k = this.config.sae_variant === "topk" && this.config.k < s.Fs ? this.config.k : 0;
      this.mm(buf.raw + from * s.Dp, s.Dp, T - from, s.D, this.w.enc, 8 * s.D, s.Fp >> 3, this.w.encB,
              buf.feats + from * s.Fp, s.Fp, !k);
      const scratch = new Float32Array(s.Fs);
      for (let t = from; t < T && k; t++) {
        const row = buf.feats + t * s.Fp, values = F.subarray(row, row + s.Fs);
        const kth = kthLargest(values, s.Fs, k, scratch);
        let above = 0;
        for (let j = 0; j < s.Fs; j++) if (values[j] > kth) above++;
        let ties = k - above;  // the k-th value's ties, kept in index order
        for (let j = 0; j < s.Fs; j++) {
          const v = values[j];
          if (v > kth) continue;
          if (v === kth && ties > 0) { ties--; continue; }
          values[j] = 0;
        }
        for (let j = 0; j < s.Fs; j++) if (!(values[j] > 0)) values[j] = 0;
      }
      this.nFeats = T;
    }

    /** The activation feature c holds at position t, as clamp_hook's feature_acts: the
        encoded row for a top-k SAE, else ReLU of that one encoder column. */
    _current(t, c) {
      const s = this.s, F = this.F;
      if (this.config.sae_variant === "topk") return F[this.buf.feats + t * s.Fp + c];
      const col = this.w.enc + (c >> 3) * s.D * 8 + (c & 7), x = this.buf.raw + t * s.Dp;
      let sum = 0;
      for (let k = 0; k < s.D; k++) sum += F[x + k] * F[col + 8 * k];
      const pre = Math.fround(sum + F[this.w.encB + c]);
      return pre > 0 ? pre : 0;
    }

    /** acts rows [nActs, T) = raw + sum over clamps of (v - f_c) W_dec[c]. */
    _clamp(T, clamps) {
      const from = this.nActs, s = this.s, F = this.F, buf = this.buf, D = s.D;
      if (from >= T) return;
      if (clamps.ids.length && this.config.sae_variant === "topk") this._encode(T);
      const shift = new Float64Array(D);
      for (let t = from; t < T; t++) {
        const raw = buf.raw + t * s.Dp, act = buf.acts + t * s.Dp;
        shift.fill(0);
        clamps.ids.forEach((c, i) => {
          const d = Math.fround(clamps.values[i] - this._current(t, c)), row = this.w.dec + c * D;
          if (d !== 0) for (let j = 0; j < D; j++) shift[j] += d * F[row + j];
        });
        for (let j = 0; j < D; j++) F[act + j] = F[raw + j] + Math.fround(shift[j]);
      }
      this.nActs = T;
    }

    /** From the clamped activation to the final residual, positions [nRest, T). */
    _rest(T) {
      const from = this.nRest, s = this.s, buf = this.buf;
      if (from >= T) return;
      this._mlpOut(s.L, from, T, buf.acts, buf.mid);
      for (let l = s.L + 1; l < s.NL; l++) {
        this._attention(l, from, T);
        this._mlpIn(l, from, T, buf.mlp);
        this._mlpOut(l, from, T, buf.mlp, buf.x);
      }
      this.F.copyWithin(buf.fin + from * s.Cs, buf.x + from * s.Cs, buf.x + T * s.Cs);
      this.nRest = T;
    }

    /** logits rows [from, to) = ln_f(final residual) @ wte^T, for those not yet computed. */
    _logits(from, to) {
      const s = this.s, buf = this.buf;
      while (from < to && this.logitsOk[from]) from++;
      if (from >= to) return;
      this._layerNorm(buf.fin, buf.h, from, to, this.w.lnfw, this.w.lnfb);
      this._linear(buf.h, s.Cs, from, to, s.C, s.V, this.w.wte, buf.zero, buf.logits, s.Vp);
      this.logitsOk.fill(1, from, to);
    }

    // ---------------------------------------------------------------- checking the inputs

    /** ids as an Int32Array, checked: 1..block_size of them (any number >= 1 when `long`). */
    _ids(ids, long) {
      const V = this.s.V, B = this.s.B;
      const out = Int32Array.from(ids);
      if (out.length < 1) throw new RangeError("no tokens: give at least one id");
      if (out.length > B && !long) {
        throw new RangeError(`${out.length} tokens is more than block_size ${B}; ` +
                             "take lab.window(ids).ids, the last block_size of them");
      }
      for (let i = 0; i < out.length; i++) {
        if (!(out[i] >= 0 && out[i] < V) || out[i] !== Number(ids[i])) {
          throw new RangeError(`token id ${ids[i]} at position ${i} is not in 0..${V - 1}`);
        }
      }
      return out;
    }

    _clamps(clamps) {
      const ids = [], values = [];
      for (const [key, value] of Object.entries(clamps || {})) {
        const c = Number(key);
        if (!Number.isInteger(c) || c < 0 || c >= this.s.Fs) {
          throw new RangeError(`feature ${key} does not exist; this SAE has features 0..${this.s.Fs - 1}`);
        }
        const v = Number(value);
        if (!Number.isFinite(v)) throw new RangeError(`clamp of feature ${key}: ${value} is not a finite number`);
        ids.push(c);
        values.push(Math.fround(v));
      }
      const order = ids.map((_, i) => i).sort((a, b) => ids[a] - ids[b]);
      const sorted = { ids: order.map((i) => ids[i]), values: order.map((i) => values[i]) };
      sorted.key = sorted.ids.map((c, i) => `${c}=${sorted.values[i]}`).join(",");
      return sorted;
    }

    _copyRows(src, T, n, stride) {
      const out = new Float32Array(T * n);
      if (n === stride) out.set(this.F.subarray(src, src + T * n));
      else for (let t = 0; t < T; t++) out.set(this.F.subarray(src + t * stride, src + t * stride + n), t * n);
      return out;
    }

    // ---------------------------------------------------------------- the public methods

    /** {T, acts, feats, logits} of ids (at most block_size of them); see the header. */
    forward(ids, opts) {
      opts = opts || {};
      const tokens = this._ids(ids), clamps = this._clamps(opts.clamps), T = tokens.length, s = this.s;
      if (opts.cache === false) this.reset();
      this._sync(tokens, clamps);
      this._toHook(T);
      this._encode(T);
      const clamped = clamps.ids.length > 0;
      if (clamped || opts.logits) this._clamp(T, clamps);
      if (opts.logits) { this._rest(T); this._logits(0, T); }
      return {
        T,
        acts: this._copyRows(clamped ? this.buf.acts : this.buf.raw, T, s.D, s.Dp),
        feats: this._copyRows(this.buf.feats, T, s.Fs, s.Fp),
        logits: opts.logits ? this._copyRows(this.buf.logits, T, s.V, s.Vp) : undefined,
      };
    }

    /** n new tokens after ids, as monofast.gpt.GPT.generate: the context is cut to the last
        block_size tokens before each step (from there on each step recomputes the window,
        as the positions shift). temperature 0 is greedy (ties to the lowest id). */
    generate(ids, n, opts) {
      opts = opts || {};
      const temperature = opts.temperature === undefined ? 0.8 : Number(opts.temperature);
      const topK = opts.topK === undefined ? 50 : opts.topK;
      const clamps = this._clamps(opts.clamps), random = mulberry32(opts.seed || 0), s = this.s;
      const history = Array.from(this._ids(ids, true));
      const out = new Int32Array(n);
      const probs = new Float64Array(s.V);
      for (let i = 0; i < n; i++) {
        const win = history.length > s.B ? history.slice(history.length - s.B) : history, T = win.length;
        if (opts.cache === false) this.reset();
        this._sync(win, clamps);
        this._toHook(T);
        this._clamp(T, clamps);
        this._rest(T);
        this._logits(T - 1, T);
        out[i] = this._pick(this.buf.logits + (T - 1) * s.Vp, temperature, topK, random, probs);
        history.push(out[i]);
      }
      return out;
    }

    _pick(row, temperature, topK, random, probs) {
      const F = this.F, V = this.s.V;
      if (!(temperature > 0)) {
        let best = 0;
        for (let v = 1; v < V; v++) if (F[row + v] > F[row + best]) best = v;
        return best;
      }
      let kth = -Infinity;
      if (topK && topK < V) {
        const scaled = new Float32Array(V);
        for (let v = 0; v < V; v++) scaled[v] = F[row + v] / temperature;
        kth = kthLargest(scaled, V, topK, new Float32Array(V));
      }
      let max = -Infinity;
      for (let v = 0; v < V; v++) {
        const l = Math.fround(F[row + v] / temperature);
        probs[v] = l < kth ? -Infinity : l;
        max = Math.max(max, probs[v]);
      }
      let sum = 0;
      for (let v = 0; v < V; v++) { probs[v] = Math.exp(probs[v] - max); sum += probs[v]; }
      let r = random() * sum;
      for (let v = 0; v < V; v++) {
        r -= probs[v];
        if (r < 0 && probs[v] > 0) return v;
      }
      for (let v = V - 1; v >= 0; v--) if (probs[v] > 0) return v;
      return 0;
    }

    /** {ids, cut, dropped}: the last block_size ids, and how many were dropped before them. */
    window(ids) {
      const all = Int32Array.from(ids), B = this.s.B;
      const dropped = Math.max(0, all.length - B);
      return { ids: all.subarray(dropped), cut: dropped > 0, dropped };
    }

    /** [{id, value}]: the n strongest firing features at token t of feats (T * d_sae). */
    topFeatures(feats, t, n) {
      const Fs = this.s.Fs, row = feats.subarray(t * Fs, (t + 1) * Fs), out = [];
      for (let j = 0; j < Fs; j++) if (row[j] > 0) out.push({ id: j, value: row[j] });
      out.sort((a, b) => b.value - a.value || a.id - b.id);
      return out.slice(0, n);
    }
  }

  window.MonofastLab = {
    /** A lab for `model` (window.MONOFAST_MODEL); options.backend: "auto", "wasm" or "js". */
    load(model, options) { return new Lab(model, options || {}); },
    _internals: { assemble, decodeWords, halfTable, erfc, gelu, mulberry32 },
  };
})();
