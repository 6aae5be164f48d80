/* monofast lab: type a text, see the SAE's features fire, clamp some and generate.
 *
 * Everything runs in the page: the run's tokenizer (tokenizer.js), its GPT up to the
 * hooked MLP layer and the SAE encoder (engine.js), on the data scripts lab/tokenizer.js
 * and lab/model.js, and the feature table features.js. No server, no network.
 * State lives in the URL hash (#f=12&text=...), so "try it" links and reloads keep it.
 */
(function () {
  "use strict";

  var $ = function (id) { return document.getElementById(id); };
  var DEBOUNCE_MS = 250;
  var TOP_PER_TOKEN = 6;
  var TOP_TEXT = 12;

  function fail(message) {
    var box = $("lab-error");
    box.textContent = message;
    box.hidden = false;
    $("lab").hidden = true;
  }

  function missing() {
    if (typeof TextEncoder === "undefined" || typeof Float32Array === "undefined" ||
        typeof Math.fround !== "function") {
      return "This browser lacks typed arrays or TextEncoder, which the lab needs: open it in a current Chromium, Firefox or Safari.";
    }
    try { new RegExp("\\p{L}", "u"); } catch (e) {
      return "This browser's regular expressions lack Unicode property classes (\\p{L}), which the tokenizer needs: open the lab in a current browser.";
    }
    if (!window.MONOFAST_MODEL || !window.MONOFAST_TOKENIZER || !window.MonofastLab || !window.MonofastTokenizer) {
      return "The lab's model files did not load (lab/model.js, lab/tokenizer.js): rebuild the site with `monofast site --force`.";
    }
    return "";
  }

  function escapeHtml(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }

  function fmt(x) {
    if (!isFinite(x)) { return "–"; }
    var a = Math.abs(x);
    return a >= 100 ? x.toFixed(0) : a >= 10 ? x.toFixed(1) : a >= 1 ? x.toFixed(2) : x.toPrecision(2);
  }

  /* The feature table (features.js): dominant source, maximum, top tokens of each feature. */
  function featureInfo() {
    var index = window.MONOFAST_INDEX || { sources: [], rows: [] };
    var byId = {};
    index.rows.forEach(function (r) { byId[r[0]] = { max: r[2], source: r[4], purity: r[5], tokens: r[7] }; });
    return { sources: index.sources, byId: byId };
  }

  function parseHash() {
    var out = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (part) {
      var i = part.indexOf("=");
      if (i > 0) { out[decodeURIComponent(part.slice(0, i))] = decodeURIComponent(part.slice(i + 1)); }
    });
    return out;
  }

  function writeHash(state) {
    var parts = ["f=" + state.feature, "text=" + encodeURIComponent(state.text)];
    history.replaceState(null, "", "#" + parts.join("&"));
  }

  function start() {
    var problem = missing();
    if (problem) { fail(problem); return; }
    var tok, lab;
    try {
      tok = window.MonofastTokenizer.load(window.MONOFAST_TOKENIZER);
      lab = window.MonofastLab.load(window.MONOFAST_MODEL);
    } catch (err) {
      fail("The lab could not load the model: " + err.message);
      return;
    }
    var info = featureInfo();
    var cfg = lab.config;
    var state = { text: "", feature: 0, clamps: [], last: null };
    var hash = parseHash();
    state.text = hash.text !== undefined ? hash.text : $("lab-text").value;
    state.feature = Math.min(Math.max(parseInt(hash.f || "0", 10) || 0, 0), cfg.d_sae - 1);
    $("lab-text").value = state.text;
    if (hash.temp !== undefined) { $("lab-temp").value = hash.temp; }
    if (hash.n !== undefined) { $("lab-n").value = hash.n; }
    $("lab-feature").value = state.feature;
    $("lab-feature").max = cfg.d_sae - 1;
    if (hash.f !== undefined) { state.clamps = [{ feature: state.feature, multiple: 4 }]; }
    $("lab-status").textContent = "model: " + cfg.n_layer + " layers, " + cfg.n_embd + " wide, hook at layer " +
      cfg.layer + "; SAE: " + cfg.d_sae + " features";

    function sourceName(s) { return s >= 0 && s < info.sources.length ? info.sources[s] : "–"; }

    function featureLink(f, act) {
      var meta = info.byId[f] || {};
      return '<a href="features/' + f + '.html">#' + f + "</a> " +
        (act !== undefined ? '<b>' + fmt(act) + "</b> " : "") +
        '<span class="src s' + ((meta.source >= 0 ? meta.source : 0) % 6) + '">' + escapeHtml(sourceName(meta.source)) + "</span> " +
        '<span class="tk">' + escapeHtml(meta.tokens || "") + "</span>";
    }

    function analyse() {
      var text = state.text;
      $("lab-note").textContent = "";
      if (!text) {
        $("lab-tokens").innerHTML = '<span class="muted">Type or paste some text above.</span>';
        $("lab-summary").innerHTML = "";
        state.last = null;
        return;
      }
      var ids = tok.encode(text);
      var win = lab.window(ids);
      if (win.cut) {
        $("lab-note").textContent = "The text has " + ids.length + " tokens; the model reads " + cfg.block_size +
          " at a time, so the lab shows the last " + cfg.block_size + ".";
      }
      var began = performance.now();
      var out = lab.forward(win.ids, {});
      var ms = performance.now() - began;
      state.last = { ids: win.ids, feats: out.feats };
      render();
      $("lab-time").textContent = win.ids.length + " tokens, forward to the hook and encode in " + ms.toFixed(0) + " ms";
    }

    function render() {
      if (!state.last) { return; }
      var ids = state.last.ids, feats = state.last.feats, F = cfg.d_sae, T = ids.length;
      var f = state.feature, meta = info.byId[f] || {};
      var scale = meta.max > 0 ? meta.max : 1;
      for (var t = 0; t < T; t++) { scale = Math.max(scale, feats[t * F + f]); }
      var strings = tok.tokenStrings(ids);
      var html = [];
      for (t = 0; t < T; t++) {
        var a = feats[t * F + f];
        var alpha = a > 0 ? Math.min(1, a / scale) : 0;
        html.push('<i data-t="' + t + '" style="--a:' + alpha.toFixed(2) + '" title="feature ' + f + ": " +
                  fmt(a) + '">' + escapeHtml(strings[t]) + "</i>");
      }
      $("lab-tokens").innerHTML = html.join("");
      $("lab-picked").innerHTML = featureLink(f);
      var peak = 0;
      for (t = 1; t < T; t++) { if (feats[t * F + f] > feats[peak * F + f]) { peak = t; } }
      tokenDetail(peak);  // the features of the token where the shaded one peaks
      summary();
    }

    function summary() {
      var ids = state.last.ids, feats = state.last.feats, F = cfg.d_sae, T = ids.length;
      var total = new Float64Array(F), bySource = new Float64Array(Math.max(info.sources.length, 1));
      for (var t = 0; t < T; t++) {
        for (var j = 0; j < F; j++) {
          var a = feats[t * F + j];
          if (a > 0) {
            total[j] += a;
            var s = (info.byId[j] || {}).source;
            if (s >= 0) { bySource[s] += a; }
          }
        }
      }
      var order = Array.from(total.keys()).filter(function (j) { return total[j] > 0; })
        .sort(function (a, b) { return total[b] - total[a]; }).slice(0, TOP_TEXT);
      var mass = bySource.reduce(function (a, b) { return a + b; }, 0) || 1;
      var bar = info.sources.map(function (name, s) {
        var share = bySource[s] / mass;
        return '<span class="s' + (s % 6) + '" style="width:' + (100 * share).toFixed(1) + '%">' +
          escapeHtml(name) + " " + (100 * share).toFixed(0) + "%</span>";
      }).join("");
      $("lab-summary").innerHTML = "<h3>Share of feature activation by the features' source</h3>" +
        '<div class="bar">' + bar + "</div><h3>Features that fire most on this text</h3><ol class=\"tl\">" +
        order.map(function (j) {
          return '<li><button class="pick" data-f="' + j + '">show</button> ' + featureLink(j, total[j]) + "</li>";
        }).join("") + "</ol>";
    }

    function tokenDetail(t) {
      if (!state.last || t >= state.last.ids.length) { return; }
      var top = lab.topFeatures(state.last.feats, t, TOP_PER_TOKEN);
      var strings = tok.tokenStrings([state.last.ids[t]]);
      $("lab-detail").innerHTML = "<h3>Token " + t + ": <code>" + escapeHtml(strings[0]) + "</code></h3>" +
        (top.length ? "<ol class=\"tl\">" + top.map(function (p) {
          return '<li><button class="pick" data-f="' + p.id + '">show</button> ' + featureLink(p.id, p.value) + "</li>";
        }).join("") + "</ol>" : '<p class="muted">No feature fires on this token.</p>');
    }

    /* Steering: the same prompt and seed with and without the clamps. */
    function clampValues() {
      var out = {};
      state.clamps.forEach(function (c) {
        var meta = info.byId[c.feature] || {};
        out[c.feature] = c.value !== undefined ? c.value : c.multiple * (meta.max || 0);
      });
      return out;
    }

    function renderClamps() {
      $("lab-clamps").innerHTML = state.clamps.length ? state.clamps.map(function (c, i) {
        return "<li>feature " + featureLink(c.feature) + ' at <input type="number" step="0.5" class="mult" data-i="' + i +
          '" value="' + c.multiple + '"> x its maximum <button class="unclamp" data-i="' + i + '">remove</button></li>';
      }).join("") : '<li class="muted">No clamp yet: add the feature shown above.</li>';
    }

    function generate() {
      if (!state.last) { $("lab-gen").innerHTML = '<p class="muted">Type a prompt first.</p>'; return; }
      var n = Math.max(1, Math.min(256, parseInt($("lab-n").value, 10) || 40));
      var opts = { temperature: parseFloat($("lab-temp").value) || 0, topK: parseInt($("lab-topk").value, 10) || 0,
                   seed: parseInt($("lab-seed").value, 10) || 0 };
      var began = performance.now();
      var clean = lab.generate(state.last.ids, n, opts);
      var steered = lab.generate(state.last.ids, n, Object.assign({}, opts, { clamps: clampValues() }));
      var ms = performance.now() - began;
      if (hash.log) {  // one line for a browser driven from the command line (tests/site/test_lab_page.py)
        console.log("monofast-lab " + JSON.stringify({ ids: Array.from(state.last.ids), clean: Array.from(clean),
          clamped: Array.from(steered), top: Array.from(state.last.ids, function (_, t) {
            var best = lab.topFeatures(state.last.feats, t, 1);
            return best.length ? best[0].id : -1;
          }), backend: lab.backend }));
      }
      $("lab-gen").innerHTML = '<div class="cols"><div><h3>Unclamped</h3><div class="tx">' + escapeHtml(tok.decode(clean)) +
        '</div></div><div><h3>Clamped</h3><div class="tx">' + escapeHtml(tok.decode(steered)) + "</div></div></div>" +
        '<p class="muted">' + (2 * n) + " tokens in " + ms.toFixed(0) + " ms (" + (ms / (2 * n)).toFixed(1) + " ms a token)</p>";
    }

    var timer = null;
    $("lab-text").addEventListener("input", function () {
      state.text = $("lab-text").value;
      clearTimeout(timer);
      timer = setTimeout(function () { writeHash(state); analyse(); }, DEBOUNCE_MS);
    });
    $("lab-feature").addEventListener("change", function () {
      var f = parseInt($("lab-feature").value, 10);
      if (f >= 0 && f < cfg.d_sae) { state.feature = f; writeHash(state); render(); }
    });
    $("lab-search").addEventListener("input", function () {
      var q = $("lab-search").value.trim().toLowerCase();
      var hits = !q ? [] : Object.keys(info.byId).filter(function (f) {
        return (info.byId[f].tokens || "").toLowerCase().indexOf(q) >= 0;
      }).slice(0, 12);
      $("lab-hits").innerHTML = hits.map(function (f) {
        return '<li><button class="pick" data-f="' + f + '">show</button> ' + featureLink(parseInt(f, 10)) + "</li>";
      }).join("");
    });
    document.addEventListener("click", function (ev) {
      var el = ev.target;
      if (el.classList.contains("pick")) {
        state.feature = parseInt(el.getAttribute("data-f"), 10);
        $("lab-feature").value = state.feature;
        writeHash(state);
        render();
      } else if (el.classList.contains("unclamp")) {
        state.clamps.splice(parseInt(el.getAttribute("data-i"), 10), 1);
        renderClamps();
      } else if (el.tagName === "I" && el.hasAttribute("data-t")) {
        tokenDetail(parseInt(el.getAttribute("data-t"), 10));
      }
    });
    document.addEventListener("change", function (ev) {
      if (ev.target.classList.contains("mult")) {
        state.clamps[parseInt(ev.target.getAttribute("data-i"), 10)].multiple = parseFloat(ev.target.value) || 0;
      }
    });
    $("lab-add").addEventListener("click", function () {
      state.clamps.push({ feature: state.feature, multiple: parseFloat($("lab-mult").value) || 4 });
      renderClamps();
    });
    $("lab-go").addEventListener("click", generate);
    renderClamps();
    analyse();
    if (hash.generate) { generate(); }
    document.body.setAttribute("data-ready", "1");
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
