/* faithlens audit view: draws one annotation object (docs/annotations.md) into a container.
   Used by AuditReport.to_html (inlined) and by the server's /ui (served as a file). No dependencies. */
(function (global) {
  "use strict";

  var METRICS = [
    { key: "fai", label: "FAI" },
    { key: "waad", label: "WAAD" },
    { key: "saliency", label: "Saliency" },
  ];

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "class") node.className = attrs[k];
      else node.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) { node.appendChild(c); });
    return node;
  }

  function fmt(v) {
    if (v === null || v === undefined) return "–";
    if (typeof v === "number") {
      if (Number.isInteger(v)) return String(v);
      return Math.abs(v) >= 100 ? v.toFixed(1) : v.toPrecision(4);
    }
    if (typeof v === "boolean") return v ? "yes" : "no";
    return String(v);
  }

  function visible(text) {
    return text.replace(/\n/g, "\u21b5\n").replace(/\t/g, "\u21e5");
  }

  /* Colour for a value: sequential (white → orange) or, for saliency, diverging (blue ← white → red). */
  function colour(value, scale, diverging) {
    if (value === null || value === undefined || !isFinite(value) || scale <= 0) return "transparent";
    var x = Math.max(-1, Math.min(1, value / scale));
    if (diverging) {
      return x >= 0 ? "rgba(214, 39, 40, " + (0.08 + 0.8 * x).toFixed(3) + ")"
                    : "rgba(31, 119, 180, " + (0.08 + 0.8 * -x).toFixed(3) + ")";
    }
    return "rgba(255, 127, 14, " + (0.05 + 0.85 * Math.max(0, x)).toFixed(3) + ")";
  }

  function scaleOf(tokens, key) {
    var m = 0;
    tokens.forEach(function (t) { var v = t[key]; if (v !== null && v !== undefined && isFinite(v)) m = Math.max(m, Math.abs(v)); });
    return m;
  }

  function hoverCard(root) {
    var card = el("div", { class: "fl-card", role: "tooltip" });
    card.hidden = true;
    root.appendChild(card);
    return card;
  }

  function showCard(card, token, event) {
    var rows = [
      ["token", JSON.stringify(token.text)], ["index", token.index], ["id", token.id],
      ["logprob", token.logprob], ["FAI", token.fai], ["WAAD", token.waad], ["saliency", token.saliency],
      ["preplan", token.preplan], ["anchor", token.anchor], ["dominated anchor", token.dominated_anchor],
      ["intro", token.intro],
    ];
    card.innerHTML = "";
    var table = el("table", {}, rows.map(function (r) {
      return el("tr", { "data-field": r[0] }, [el("th", { text: r[0] }), el("td", { text: fmt(r[1]) })]);
    }));
    card.appendChild(table);
    card.hidden = false;
    var x = event.clientX + 14, y = event.clientY + 14;
    card.style.left = Math.min(x, window.innerWidth - 260) + "px";
    card.style.top = Math.min(y, window.innerHeight - 280) + "px";
  }

  function curves(tokens) {
    var ns = "http://www.w3.org/2000/svg";
    var w = 760, h = 160, pad = 24;
    var svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    svg.setAttribute("class", "fl-curves");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", "FAI and WAAD over the response");
    [["fai", "#ff7f0e"], ["waad", "#1f77b4"]].forEach(function (spec) {
      var key = spec[0], s = scaleOf(tokens, key), n = Math.max(tokens.length - 1, 1), d = "", pen = false;
      tokens.forEach(function (t, i) {
        var v = t[key];
        if (v === null || v === undefined || !isFinite(v) || s <= 0) { pen = false; return; }
        var x = pad + (w - 2 * pad) * i / n, y = h - pad - (h - 2 * pad) * v / s;
        d += (pen ? " L" : " M") + x.toFixed(1) + " " + y.toFixed(1);
        pen = true;
      });
      var path = document.createElementNS(ns, "path");
      path.setAttribute("d", d.trim() || "M0 0");
      path.setAttribute("fill", "none");
      path.setAttribute("stroke", spec[1]);
      path.setAttribute("stroke-width", "1.8");
      path.setAttribute("class", "fl-curve-" + key);
      svg.appendChild(path);
    });
    tokens.forEach(function (t, i) {
      if (!t.anchor) return;
      var n = Math.max(tokens.length - 1, 1);
      var mark = document.createElementNS(ns, "line");
      var x = pad + (w - 2 * pad) * i / n;
      mark.setAttribute("x1", x); mark.setAttribute("x2", x);
      mark.setAttribute("y1", h - pad); mark.setAttribute("y2", h - pad + 6);
      mark.setAttribute("stroke", "#444");
      svg.appendChild(mark);
    });
    var legend = document.createElementNS(ns, "text");
    legend.setAttribute("x", pad); legend.setAttribute("y", 14);
    legend.setAttribute("class", "fl-legend");
    legend.textContent = "FAI (orange) and WAAD (blue), each scaled to its maximum; ticks mark anchors";
    svg.appendChild(legend);
    return svg;
  }

  function summaryTable(summary) {
    var rows = Object.keys(summary).filter(function (k) {
      var v = summary[k];
      return v === null || typeof v !== "object";
    }).map(function (k) {
      return el("tr", {}, [el("th", { text: k.replace(/_/g, " ") }), el("td", { text: fmt(summary[k]) })]);
    });
    if (summary.counterfactual) {
      var c = summary.counterfactual;
      rows.push(el("tr", {}, [el("th", { text: "counterfactual (k=" + c.k + ")" }),
        el("td", { text: "top-k " + fmt(c.top_k_logprob) + " vs random-k " + fmt(c.random_k_logprob) + " (base " + fmt(c.base_logprob) + ")" })]));
    }
    return el("table", { class: "fl-summary" }, rows);
  }

  function render(container, analysis) {
    container.innerHTML = "";
    container.classList.add("fl-audit");
    var tokens = analysis.tokens || [];
    var hasSaliency = tokens.some(function (t) { return t.saliency !== null && t.saliency !== undefined; });
    var state = { metric: "fai" };
    var switcher = el("div", { class: "fl-switcher", role: "radiogroup", "aria-label": "metric" });
    var heat = el("div", { class: "fl-heatmap", "data-metric": "fai" });
    var card = hoverCard(container);
    var spans = tokens.map(function (t) {
      var cls = "fl-token" + (t.preplan ? " fl-preplan" : "") + (t.anchor ? " fl-anchor" : "") +
        (t.dominated_anchor ? " fl-dominated" : "") + (t.intro ? " fl-intro" : "");
      var span = el("span", { class: cls, "data-index": t.index, tabindex: "0" });
      span.textContent = visible(t.text);
      span.addEventListener("mouseenter", function (e) { showCard(card, t, e); });
      span.addEventListener("mousemove", function (e) { showCard(card, t, e); });
      span.addEventListener("mouseleave", function () { card.hidden = true; });
      span.addEventListener("focus", function () {
        var r = span.getBoundingClientRect();
        showCard(card, t, { clientX: r.left, clientY: r.bottom });
      });
      span.addEventListener("blur", function () { card.hidden = true; });
      heat.appendChild(span);
      return span;
    });

    function paint() {
      var key = state.metric, s = scaleOf(tokens, key);
      heat.setAttribute("data-metric", key);
      spans.forEach(function (span, i) { span.style.backgroundColor = colour(tokens[i][key], s, key === "saliency"); });
    }

    METRICS.forEach(function (m) {
      var disabled = m.key === "saliency" && !hasSaliency;
      var button = el("button", { type: "button", role: "radio", "data-metric": m.key, "aria-checked": String(m.key === state.metric), text: m.label });
      if (disabled) { button.disabled = true; button.title = "no saliency in this analysis"; }
      button.addEventListener("click", function () {
        state.metric = m.key;
        switcher.querySelectorAll("button").forEach(function (b) { b.setAttribute("aria-checked", String(b === button)); });
        paint();
      });
      switcher.appendChild(button);
    });

    var legend = el("p", { class: "fl-markers" }, [
      el("span", { class: "fl-token fl-anchor", text: "anchor" }), document.createTextNode(" "),
      el("span", { class: "fl-token fl-preplan", text: "preplan" }), document.createTextNode(" "),
      el("span", { class: "fl-token fl-dominated", text: "dominated anchor" }), document.createTextNode(" "),
      el("span", { class: "fl-token fl-intro", text: "intro (coupled)" }),
    ]);
    var meta = el("p", { class: "fl-meta", text: "model " + analysis.model + (analysis.adapter ? " + adapter " + analysis.adapter : "") +
      " · layers " + (analysis.layers || []).join(", ") + (analysis.answer_span ? " · answer " + JSON.stringify(analysis.answer_span.text) : "") });
    container.appendChild(meta);
    container.appendChild(switcher);
    container.appendChild(legend);
    container.appendChild(heat);
    container.appendChild(el("h2", { text: "Curves" }));
    container.appendChild(curves(tokens));
    container.appendChild(el("h2", { text: "Summary" }));
    container.appendChild(summaryTable(analysis.summary || {}));
    container.appendChild(card);
    paint();
    return { setMetric: function (key) { state.metric = key; paint(); } };
  }

  global.FaithlensAudit = { render: render, colour: colour };
})(window);
