// The index table: filled from window.MONOFAST_INDEX (features.js), sortable by any column,
// filtered by search text, source, purity and density. Rows render a page at a time, so an
// index of 16,384 features stays fast.
(function () {
  "use strict";
  var D = window.MONOFAST_INDEX;
  var PAGE = 4096;
  var state = { key: 1, dir: -1, limit: PAGE };
  var body = document.querySelector("#features tbody");
  var heads = document.querySelectorAll("#features th");

  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }
  function num(v, digits) {
    if (v === null || v === undefined) return "–";
    if (v === 0) return "0";
    var a = Math.abs(v);
    return a >= 1000 || a < 0.001 ? v.toExponential(digits - 1) : String(+v.toPrecision(digits));
  }
  function value(id) { return document.getElementById(id).value; }

  function matches(row) {
    var q = value("q").trim().toLowerCase();
    var src = value("src");
    var minPurity = parseFloat(value("pur")) || 0;
    var dmin = parseFloat(value("dmin")), dmax = parseFloat(value("dmax"));
    var showDead = document.getElementById("dead").checked;
    if (row[1] === 0 || row[1] === null) { if (!showDead) return false; }
    else {
      var logd = Math.log10(row[1]);
      if (!isNaN(dmin) && logd < dmin) return false;
      if (!isNaN(dmax) && logd > dmax) return false;
    }
    if (src === "mixed") { if (row[5] === null || row[5] > D.pure) return false; }
    else if (src !== "" && row[4] !== parseInt(src, 10)) return false;
    if ((row[5] || 0) < minPurity) return false;
    if (q) {
      if (/^\d+$/.test(q)) return String(row[0]) === q || String(row[0]).indexOf(q) === 0;
      return row[7].toLowerCase().indexOf(q) >= 0;
    }
    return true;
  }

  function render() {
    var started = performance.now();
    var rows = D.rows.filter(matches);
    var k = state.key, dir = state.dir;
    rows.sort(function (a, b) {
      var x = a[k], y = b[k];
      if (x === null) return 1;
      if (y === null) return -1;
      if (typeof x === "string") return dir * x.localeCompare(y);
      return dir * (x - y) || a[0] - b[0];
    });
    var shown = rows.slice(0, state.limit);
    var html = [];
    for (var i = 0; i < shown.length; i++) {
      var r = shown[i];
      var source = r[4] >= 0 ? '<span class="src s' + (r[4] % 6) + '">&nbsp;</span> ' + esc(D.sources[r[4]]) : "–";
      html.push('<tr><td><a href="features/' + r[0] + '.html">' + r[0] + "</a></td><td>" +
        (r[1] ? (100 * r[1]).toPrecision(3) + "%" : "dead") + "</td><td>" + num(r[2], 3) + "</td><td>" +
        num(r[3], 3) + "</td><td>" + source + "</td><td>" + (r[5] === null ? "–" : (100 * r[5]).toFixed(1) + "%") +
        "</td><td>" + num(r[6], 3) + '</td><td class="tok">' + esc(r[7]) + "</td></tr>");
    }
    body.innerHTML = html.join("");
    document.getElementById("count").textContent = rows.length + " of " + D.rows.length + " features" +
      (rows.length > shown.length ? ", showing " + shown.length : "");
    document.getElementById("more").style.display = rows.length > shown.length ? "" : "none";
    document.getElementById("count").setAttribute("data-ms", (performance.now() - started).toFixed(1));
    for (var h = 0; h < heads.length; h++) {
      heads[h].className = +heads[h].getAttribute("data-k") === k ? (dir > 0 ? "asc" : "desc") : "";
    }
  }

  for (var h = 0; h < heads.length; h++) {
    heads[h].addEventListener("click", function () {
      var k = +this.getAttribute("data-k");
      state.dir = state.key === k ? -state.dir : (k === 0 || k === 7 ? 1 : -1);
      state.key = k;
      state.limit = PAGE;
      render();
    });
  }
  ["q", "src", "pur", "dmin", "dmax", "dead"].forEach(function (id) {
    document.getElementById(id).addEventListener("input", function () { state.limit = PAGE; render(); });
    document.getElementById(id).addEventListener("change", function () { state.limit = PAGE; render(); });
  });
  document.getElementById("more").addEventListener("click", function () { state.limit += PAGE; render(); });
  render();
})();
