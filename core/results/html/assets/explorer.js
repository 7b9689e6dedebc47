/* crosspatch explorer: draws the JSON views of crosspatch Results (heatmaps, bars, attention patterns,
   edge graphs, faithfulness tables) with hover values. No dependencies, no network: shipped inside the
   crosspatch package and inlined into every page. window.crosspatch.renderView(container, view) draws
   one view; a page with a <script type="application/json" id="cp-data"> block is drawn on load. */
(function () {
  "use strict";

  var SVGNS = "http://www.w3.org/2000/svg";

  // ------------------------------------------------------------------ small helpers

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function svg(tag, attrs, children) {
    var node = document.createElementNS(SVGNS, tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }

  function setAttrs(node, attrs) {
    if (!attrs) return;
    Object.keys(attrs).forEach(function (key) {
      var value = attrs[key];
      if (value === null || value === undefined || value === false) return;
      if (key === "text") node.textContent = String(value);
      else if (key === "class") node.setAttribute("class", value);
      else node.setAttribute(key, String(value));
    });
  }

  function append(node, children) {
    if (children === undefined || children === null) return;
    if (!Array.isArray(children)) children = [children];
    children.forEach(function (child) {
      if (child === null || child === undefined) return;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    });
  }

  function fmt(value) {
    if (value === null || value === undefined || Number.isNaN(value)) return "nan";
    var a = Math.abs(value);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return value.toExponential(3);
    return String(Number(value.toPrecision(4)));
  }

  function short(value) {
    if (value === null || value === undefined) return "";
    var a = Math.abs(value);
    if (a !== 0 && (a >= 1e3 || a < 1e-2)) return value.toExponential(0);
    return String(Number(value.toPrecision(2)));
  }

  // Diverging blue - white - red centred on 0 (RdBu reversed, as the PNG plots).
  var NEG = [33, 102, 172], MID = [247, 247, 247], POS = [178, 24, 43];

  function colour(value, limit) {
    if (value === null || value === undefined || Number.isNaN(value)) return "#999";
    var t = limit > 0 ? Math.max(-1, Math.min(1, value / limit)) : 0;
    var end = t < 0 ? NEG : POS, s = Math.abs(t);
    var rgb = MID.map(function (m, i) { return Math.round(m + (end[i] - m) * s); });
    return "rgb(" + rgb.join(",") + ")";
  }

  // Sequential white - blue for probabilities (attention patterns).
  function sequential(value) {
    if (value === null || value === undefined) return "#999";
    var s = Math.max(0, Math.min(1, value));
    var rgb = [255, 255, 255].map(function (w, i) { return Math.round(w + (NEG[i] - w) * s); });
    return "rgb(" + rgb.join(",") + ")";
  }

  function dark(value, limit) {
    return limit > 0 && value !== null && Math.abs(value / limit) > 0.6;
  }

  function flat(values) {
    var out = [];
    (function walk(v) {
      if (Array.isArray(v)) v.forEach(walk);
      else if (v !== null && v !== undefined && Number.isFinite(v)) out.push(v);
    })(values);
    return out;
  }

  function absMax(values) {
    var m = 0;
    flat(values).forEach(function (v) { m = Math.max(m, Math.abs(v)); });
    return m || 1;
  }

  function pick(values, index) {
    var v = values;
    index.forEach(function (i) { v = v[i]; });
    return v;
  }

  function textWidth(labels, px) {
    var longest = 0;
    labels.forEach(function (l) { longest = Math.max(longest, String(l).length); });
    return Math.min(220, 12 + longest * (px || 6.6));
  }

  // ------------------------------------------------------------------ tooltip

  var tip = null;

  function showTip(event, lines) {
    if (!tip) {
      tip = el("div", { id: "cp-tip", class: "cp-tip", role: "tooltip" });
      document.body.appendChild(tip);
    }
    tip.textContent = lines.join("\n");
    tip.style.display = "block";
    var x = event.pageX + 14, y = event.pageY + 14;
    var room = window.scrollX + document.documentElement.clientWidth - tip.offsetWidth - 8;
    tip.style.left = Math.max(0, Math.min(x, room)) + "px";
    tip.style.top = y + "px";
  }

  function hideTip() {
    if (tip) tip.style.display = "none";
  }

  // ------------------------------------------------------------------ colour legend

  function legend(limit, kind) {
    var width = 160, stops = [];
    for (var i = 0; i <= 10; i++) {
      var t = i / 10;
      var c = kind === "sequential" ? sequential(t) : colour(-limit + 2 * limit * t, limit);
      stops.push(c + " " + (t * 100) + "%");
    }
    var bar = el("span", { class: "cp-legend-bar" });
    bar.style.width = width + "px";
    bar.style.background = "linear-gradient(to right, " + stops.join(", ") + ")";
    var lo = kind === "sequential" ? "0" : fmt(-limit), hi = kind === "sequential" ? "1" : fmt(limit);
    return el("div", { class: "cp-legend" }, [el("span", { text: lo }), bar, el("span", { text: hi })]);
  }

  // ------------------------------------------------------------------ lead-dim selectors

  function selectors(lead, onChange) {
    var state = lead.map(function () { return 0; });
    var box = el("div", { class: "cp-selectors" });
    lead.forEach(function (d, k) {
      var select = el("select", { "data-dim": d.dim, "aria-label": d.dim });
      d.labels.forEach(function (label, i) { select.appendChild(el("option", { value: i, text: label })); });
      select.addEventListener("change", function () { state[k] = Number(select.value); onChange(state.slice()); });
      box.appendChild(el("label", {}, [d.dim + " ", select]));
    });
    return { box: box, state: state };
  }

  // ------------------------------------------------------------------ heatmap

  function heatmapSvg(opts) {
    // opts: rows, cols, values (2-D), limit, skipped, rowdim, coldim, onHover(r, c, evt), onClick(r, c), seq
    var rows = opts.rows, cols = opts.cols;
    var cw = Math.max(12, Math.min(40, Math.floor(760 / Math.max(1, cols.length))));
    var ch = Math.max(12, Math.min(30, Math.floor(460 / Math.max(1, rows.length))));
    var left = textWidth(rows) + 8;
    var rotated = cols.some(function (c) { return String(c).length > 2; }) || cw < 20;
    var bottom = rotated ? Math.min(140, textWidth(cols, 6) * 0.8 + 10) : 22;
    var width = left + cw * cols.length + 4, height = ch * rows.length + bottom + 16;
    var root = svg("svg", { width: width, height: height, class: "cp-heatmap", role: "img" });
    var defs = svg("defs", {}, svg("pattern", { id: "cp-hatch", width: 6, height: 6, patternUnits: "userSpaceOnUse",
      patternTransform: "rotate(45)" }, [svg("rect", { width: 6, height: 6, fill: "#eee" }),
      svg("line", { x1: 0, y1: 0, x2: 0, y2: 6, stroke: "#aaa", "stroke-width": 2 })]));
    root.appendChild(defs);
    var grid = svg("g", { transform: "translate(" + left + ",0)" });
    root.appendChild(grid);
    var label = cw >= 30 && ch >= 16;
    rows.forEach(function (_, r) {
      cols.forEach(function (_, c) {
        var v = opts.values[r][c];
        var skipped = opts.skipped && opts.skipped[r][c];
        var fill = skipped ? "url(#cp-hatch)" : (opts.seq ? sequential(v) : colour(v, opts.limit));
        grid.appendChild(svg("rect", { x: c * cw, y: r * ch, width: cw - 1, height: ch - 1, fill: fill,
          class: "cp-cell", "data-r": r, "data-c": c }));
        if (label && !skipped && v !== null) {
          var light = opts.seq ? v > 0.6 : dark(v, opts.limit);
          grid.appendChild(svg("text", { x: c * cw + cw / 2 - 0.5, y: r * ch + ch / 2 + 3.5, class: "cp-cell-text",
            fill: light ? "#fff" : "#222", text: short(v) }));
        }
      });
    });
    rows.forEach(function (text, r) {
      root.appendChild(svg("text", { x: left - 6, y: r * ch + ch / 2 + 4, class: "cp-axis", "text-anchor": "end",
        text: text }));
    });
    var top = ch * rows.length + 12;
    cols.forEach(function (text, c) {
      var x = left + c * cw + cw / 2;
      root.appendChild(svg("text", rotated
        ? { x: x, y: top, class: "cp-axis", "text-anchor": "end", transform: "rotate(-60 " + x + " " + top + ")",
            text: text }
        : { x: x, y: top + 2, class: "cp-axis", "text-anchor": "middle", text: text }));
    });
    grid.addEventListener("mousemove", function (event) {
      var t = event.target;
      if (!t.classList || !t.classList.contains("cp-cell")) return hideTip();
      opts.onHover(Number(t.getAttribute("data-r")), Number(t.getAttribute("data-c")), event);
    });
    grid.addEventListener("mouseleave", hideTip);
    grid.addEventListener("click", function (event) {
      var t = event.target;
      if (!t.classList || !t.classList.contains("cp-cell") || !opts.onClick) return;
      grid.querySelectorAll(".cp-cell.cp-picked").forEach(function (n) { n.classList.remove("cp-picked"); });
      t.classList.add("cp-picked");
      opts.onClick(Number(t.getAttribute("data-r")), Number(t.getAttribute("data-c")));
    });
    return root;
  }

  function siteOf(view, rowLabel, colLabel) {
    // The concrete site of a cell of a sweep "family.*[axis=*]" over (layer, axis).
    if (!view.site || view.site.indexOf("*") < 0) return null;
    var values = {};
    values[view.rowdim] = String(rowLabel).split(" ")[0];
    values[view.coldim] = String(colLabel).split(" ")[0];
    var used = 0;
    var site = view.site.replace(/\.\*/, function () { used++; return "." + values.layer; });
    site = site.replace(/(\w+)=\*/g, function (_, axis) { used++; return axis + "=" + values[axis]; });
    return used === 2 && site.indexOf("undefined") < 0 ? site : null;
  }

  function renderHeatmap(body, view) {
    var limit = absMax(view.values);
    var sel = selectors(view.lead, function (state) { draw(state); });
    var holder = el("div", { class: "cp-plot" });
    var detail = el("div", { class: "cp-detail", "aria-live": "polite" },
      el("p", { class: "cp-muted", text: view.prompts ? "Click a cell to see every prompt's value."
        : "Click a cell to see its row and column." }));
    body.appendChild(sel.box);
    body.appendChild(legend(limit));
    body.appendChild(el("div", { class: "cp-row" }, [holder, detail]));

    function draw(state) {
      holder.textContent = "";
      var values = pick(view.values, state);
      var skipped = view.skipped ? pick(view.skipped, state) : null;
      holder.appendChild(heatmapSvg({
        rows: view.rows, cols: view.cols, values: values, limit: limit, skipped: skipped,
        onHover: function (r, c, event) {
          var lines = [view.rowdim + " " + view.rows[r] + " · " + view.coldim + " " + view.cols[c],
            (skipped && skipped[r][c]) ? "not run: 0 by construction" : "value " + fmt(values[r][c])];
          var site = siteOf(view, view.rows[r], view.cols[c]);
          if (site) lines.push(site);
          showTip(event, lines);
        },
        onClick: function (r, c) {
          showDetail(state, r, c);
          var site = siteOf(view, view.rows[r], view.cols[c]);
          if (site && typeof view.onSite === "function") view.onSite(site);
        }
      }));
    }

    function showDetail(state, r, c) {
      detail.textContent = "";
      var head = view.rowdim + " " + view.rows[r] + " · " + view.coldim + " " + view.cols[c];
      detail.appendChild(el("h3", { text: head }));
      if (view.prompts) {
        var per = pick(view.per_prompt, state)[r][c];
        detail.appendChild(el("p", { class: "cp-muted", text: "mean " + fmt(pick(view.values, state)[r][c]) +
          " over " + view.prompts.length + " prompts" }));
        // Prompts are long: the axis numbers them, the tooltip shows each one's text.
        detail.appendChild(barsSvg({ labels: view.prompts.map(function (_, i) { return String(i); }), tips: view.prompts,
          values: per, limit: absMax(per), xdim: "prompt", width: 320 }));
      } else {
        var values = pick(view.values, state);
        detail.appendChild(el("p", { class: "cp-muted", text: "value " + fmt(values[r][c]) }));
        detail.appendChild(el("h4", { text: view.rowdim + " " + view.rows[r] + " across " + view.coldim }));
        detail.appendChild(barsSvg({ labels: view.cols, values: values[r], limit: limit, xdim: view.coldim,
          width: 320, mark: c }));
        detail.appendChild(el("h4", { text: view.coldim + " " + view.cols[c] + " across " + view.rowdim }));
        detail.appendChild(barsSvg({ labels: view.rows, values: values.map(function (row) { return row[c]; }),
          limit: limit, xdim: view.rowdim, width: 320, mark: r }));
      }
    }

    draw(sel.state);
  }

  // ------------------------------------------------------------------ bars

  function barsSvg(opts) {
    // opts: labels, values, limit, xdim, width, skipped, mark, tips (tooltip labels, default the labels)
    var n = opts.labels.length;
    var bw = Math.max(6, Math.min(40, Math.floor((opts.width || 760) / Math.max(1, n))));
    var rotated = opts.labels.some(function (l) { return String(l).length > 2; }) || bw < 18;
    var limit = opts.limit || 1;
    // One-signed values use the whole height; mixed signs put 0 in the middle.
    var known = opts.values.filter(function (v) { return v !== null; });
    var up = known.some(function (v) { return v > 0; }), down = known.some(function (v) { return v < 0; });
    var plotH = 150, bottom = rotated ? Math.min(130, textWidth(opts.labels, 6) * 0.8 + 10) : 22;
    var left = Math.max(48, textWidth([fmt(limit), fmt(-limit)], 7) + 12);
    var width = left + bw * n + 8, height = plotH + bottom + 10;
    var root = svg("svg", { width: width, height: height, class: "cp-bars", role: "img" });
    var mid = down && !up ? 9 : up && !down ? plotH - 4 : 5 + plotH / 2;
    var scale = (up !== down ? plotH - 13 : plotH / 2 - 4) / limit;
    root.appendChild(svg("line", { x1: left, x2: width - 4, y1: mid, y2: mid, stroke: "#555", "stroke-width": 0.8 }));
    if (up || !down) root.appendChild(svg("text", { x: left - 6, y: 12, class: "cp-axis", "text-anchor": "end", text: fmt(limit) }));
    root.appendChild(svg("text", { x: left - 6, y: mid + 4, class: "cp-axis", "text-anchor": "end", text: "0" }));
    if (down || !up) root.appendChild(svg("text", { x: left - 6, y: plotH + 2, class: "cp-axis", "text-anchor": "end",
      text: fmt(-limit) }));
    opts.values.forEach(function (v, i) {
      var skipped = opts.skipped && opts.skipped[i];
      var h = v === null ? 0 : Math.abs(v) * scale, y = v !== null && v > 0 ? mid - h : mid;
      var fill = skipped ? "#ddd" : colour(v === null ? 0 : v, limit);
      root.appendChild(svg("rect", { x: left + i * bw + 1, y: y, width: bw - 2, height: Math.max(h, 1), fill: fill,
        stroke: opts.mark === i ? "#000" : "#777", "stroke-width": opts.mark === i ? 1.5 : 0.4, class: "cp-bar",
        "data-i": i }));
    });
    var top = plotH + 18, every = Math.ceil(14 / bw);  // narrow bars: label every few
    opts.labels.forEach(function (text, i) {
      if (i % every) return;
      var x = left + i * bw + bw / 2;
      root.appendChild(svg("text", rotated
        ? { x: x, y: top, class: "cp-axis", "text-anchor": "end", transform: "rotate(-60 " + x + " " + top + ")",
            text: text }
        : { x: x, y: top, class: "cp-axis", "text-anchor": "middle", text: text }));
    });
    root.addEventListener("mousemove", function (event) {
      var t = event.target;
      if (!t.classList || !t.classList.contains("cp-bar")) return hideTip();
      var i = Number(t.getAttribute("data-i"));
      showTip(event, [(opts.xdim || "") + " " + (opts.tips ? opts.tips[i] : opts.labels[i]),
        (opts.skipped && opts.skipped[i]) ? "not run: 0 by construction" : "value " + fmt(opts.values[i])]);
    });
    root.addEventListener("mouseleave", hideTip);
    if (opts.onClick) {
      root.classList.add("cp-clickable");
      root.addEventListener("click", function (event) {
        var t = event.target;
        if (!t.classList || !t.classList.contains("cp-bar")) return;
        root.querySelectorAll(".cp-bar").forEach(function (bar) {
          bar.setAttribute("stroke", "#777");
          bar.setAttribute("stroke-width", 0.4);
          bar.classList.remove("cp-picked");
        });
        t.setAttribute("stroke", "#000");
        t.setAttribute("stroke-width", 1.5);
        t.classList.add("cp-picked");
        opts.onClick(Number(t.getAttribute("data-i")));
      });
    }
    return root;
  }

  function barSite(view, label) {
    // The concrete site of a bar of a sweep with one wildcard ("latent.z[dim=*]", "encoder.block.*").
    var pattern = view.site || (view.metadata && typeof view.metadata.sites === "string" ? view.metadata.sites : null);
    if (!pattern) return null;
    var wildcards = (pattern.match(/\.\*/g) || []).length + (pattern.match(/=\*/g) || []).length;
    if (wildcards !== 1) return null;
    var value = String(label).split(" ")[0];
    if (view.xdim === "layer" && /\.\*/.test(pattern)) return pattern.replace(/\.\*/, "." + value);
    var axis = new RegExp("\\b" + view.xdim + "=\\*");
    return axis.test(pattern) ? pattern.replace(axis, view.xdim + "=" + value) : null;
  }

  function renderBars(body, view) {
    var limit = absMax(view.values);
    var clickable = typeof view.onSite === "function" && barSite(view, view.x[0]) !== null;
    body.appendChild(el("div", { class: "cp-plot" }, barsSvg({ labels: view.x, values: view.values, limit: limit,
      xdim: view.xdim, skipped: view.skipped, tips: clickable ? view.x.map(function (x) {
        return x + " · " + barSite(view, x) + " (click: patch it)";
      }) : null, onClick: clickable ? function (i) { view.onSite(barSite(view, view.x[i])); } : null })));
  }

  function renderScalar(body, view) {
    body.appendChild(el("p", { class: "cp-scalar", text: fmt(view.value) }));
  }

  // ------------------------------------------------------------------ attention patterns

  function thumb(values, size) {
    var canvas = el("canvas", { width: size, height: size, class: "cp-thumb" });
    var ctx = canvas.getContext("2d"), n = values.length, m = values[0] ? values[0].length : 0;
    for (var q = 0; q < n; q++) {
      for (var k = 0; k < m; k++) {
        ctx.fillStyle = sequential(values[q][k]);
        ctx.fillRect(Math.floor(k * size / m), Math.floor(q * size / n), Math.ceil(size / m), Math.ceil(size / n));
      }
    }
    return canvas;
  }

  function renderAttention(body, view) {
    // view.values: [*lead, query, key]; the last lead dim (the head) is shown as clickable thumbnails.
    var lead = view.lead;
    var outer = lead.slice(0, Math.max(0, lead.length - 1));
    var inner = lead.length ? lead[lead.length - 1] : null;
    var chosen = 0;
    var sel = selectors(outer, function (state) { outerState = state; drawThumbs(); drawMain(); });
    var outerState = sel.state;
    var thumbs = el("div", { class: "cp-thumbs" });
    var main = el("div", { class: "cp-plot" });
    var tokens = el("div", { class: "cp-tokens", title: "hover a token: how much it attends to each earlier one" });
    body.appendChild(sel.box);
    if (inner) body.appendChild(thumbs);
    body.appendChild(legend(1, "sequential"));
    body.appendChild(tokens);
    body.appendChild(main);

    function pattern() {
      var p = pick(view.values, outerState);
      return inner ? p[chosen] : p;
    }

    function drawThumbs() {
      if (!inner) return;
      thumbs.textContent = "";
      var base = pick(view.values, outerState);
      inner.labels.forEach(function (label, i) {
        var box = el("button", { type: "button", class: "cp-thumb-box" + (i === chosen ? " cp-on" : ""),
          "data-index": i, "aria-label": inner.dim + " " + label }, [thumb(base[i], 64),
          el("span", { text: inner.dim + " " + label })]);
        box.addEventListener("click", function () { chosen = i; drawThumbs(); drawMain(); });
        thumbs.appendChild(box);
      });
    }

    function drawMain() {
      var p = pattern();
      main.textContent = "";
      main.appendChild(heatmapSvg({
        rows: view.queries, cols: view.keys, values: p, limit: 1, seq: true, rowdim: "query", coldim: "key",
        onHover: function (q, k, event) {
          showTip(event, ["query " + view.queries[q] + " → key " + view.keys[k], "attention " + fmt(p[q][k])]);
        }
      }));
      tokens.textContent = "";
      view.queries.forEach(function (text, q) {
        var span = el("span", { class: "cp-token", "data-q": q, text: String(text).replace(/^\d+ /, "") });
        span.addEventListener("mouseenter", function () {
          tokens.querySelectorAll(".cp-token").forEach(function (t, k) {
            var a = k < p[q].length ? p[q][k] : 0;
            t.style.background = k === q ? "#fde68a" : sequential(a);
            t.style.color = a > 0.6 && k !== q ? "#fff" : "";
          });
        });
        span.addEventListener("mouseleave", function () {
          tokens.querySelectorAll(".cp-token").forEach(function (t) { t.style.background = ""; t.style.color = ""; });
        });
        tokens.appendChild(span);
      });
    }

    drawThumbs();
    drawMain();
  }

  // ------------------------------------------------------------------ edge graphs

  function renderGraph(body, view, index) {
    var graph = view.graph;
    var links = graph.links.filter(function (l) { return l.weight !== null; }).slice();
    links.sort(function (a, b) { return Math.abs(b.weight) - Math.abs(a.weight); });
    var total = links.length;
    var keyName = "keep" + (index || 0);
    var keep = Math.min(total, Math.max(1, Number(hashParam(keyName)) || Math.min(total, 40)));
    var slider = el("input", { type: "range", min: 1, max: Math.max(1, total), value: keep, class: "cp-slider",
      "aria-label": "edges kept" });
    var count = el("span", { class: "cp-count" });
    var hide = el("input", { type: "checkbox", checked: "checked" });
    var controls = el("div", { class: "cp-controls" }, [el("label", {}, ["edges kept ", slider]), count,
      el("label", {}, [hide, " hide nodes without a kept edge"])]);
    var holder = el("div", { class: "cp-plot cp-graph-holder" });
    body.appendChild(controls);
    body.appendChild(holder);
    var kinds = {};
    graph.nodes.forEach(function (n) { if (!(n.kind in kinds)) kinds[n.kind] = Object.keys(kinds).length; });

    function draw() {
      keep = Number(slider.value);
      setHashParam(keyName, keep);
      var kept = links.slice(0, keep);
      var threshold = kept.length ? Math.abs(kept[kept.length - 1].weight) : 0;
      count.textContent = kept.length + " of " + total + " edges, |weight| ≥ " + fmt(threshold);
      var used = {};
      kept.forEach(function (l) { used[l.source] = true; used[l.target] = true; });
      var nodes = graph.nodes.filter(function (n) { return !hide.checked || used[n.id]; });
      var columns = {}, order = [];
      nodes.forEach(function (n) {
        var key = n.layer * 1000 + kinds[n.kind];
        if (!(key in columns)) { columns[key] = []; order.push(key); }
        columns[key].push(n);
      });
      order.sort(function (a, b) { return a - b; });
      var colW = 116, rowH = 22, nodeW = 96, top = 28;
      var tallest = 0;
      order.forEach(function (key) { tallest = Math.max(tallest, columns[key].length); });
      var width = Math.max(300, order.length * colW + 20), height = top + tallest * rowH + 20;
      var at = {};
      order.forEach(function (key, c) {
        var col = columns[key], offset = (tallest - col.length) * rowH / 2;
        col.forEach(function (n, r) { at[n.id] = { x: 10 + c * colW, y: top + offset + r * rowH, node: n }; });
      });
      var root = svg("svg", { width: width, height: height, class: "cp-graph", role: "img" });
      var layers = {};
      order.forEach(function (key, c) {
        var first = columns[key][0], layer = first.layer;
        var output = /logit/.test(first.kind);
        var header = layer < 0 ? "embed" : (output ? "output" : "layer " + layer);
        if (!(header in layers)) {
          layers[header] = true;
          root.appendChild(svg("text", { x: 10 + c * colW, y: 14, class: "cp-axis cp-layer", text: header }));
        }
      });
      var lim = kept.length ? Math.abs(kept[0].weight) : 1;
      var edgeLayer = svg("g", { class: "cp-edges" });
      root.appendChild(edgeLayer);
      kept.forEach(function (l) {
        var a = at[l.source], b = at[l.target];
        if (!a || !b) return;
        var x1 = a.x + nodeW, y1 = a.y + 8, x2 = b.x, y2 = b.y + 8, mx = (x1 + x2) / 2;
        edgeLayer.appendChild(svg("path", {
          d: "M" + x1 + "," + y1 + " C" + mx + "," + y1 + " " + mx + "," + y2 + " " + x2 + "," + y2,
          stroke: l.weight >= 0 ? "rgb(178,24,43)" : "rgb(33,102,172)", fill: "none",
          "stroke-width": (0.6 + 3.4 * Math.abs(l.weight) / (lim || 1)).toFixed(2),
          "stroke-opacity": 0.65, class: "cp-link", "data-source": l.source, "data-target": l.target,
          "data-weight": l.weight }));
      });
      var nodeLayer = svg("g", { class: "cp-nodes" });
      root.appendChild(nodeLayer);
      nodes.forEach(function (n) {
        var p = at[n.id];
        var g = svg("g", { class: "cp-node" + (used[n.id] ? "" : " cp-faded"), "data-id": n.id,
          transform: "translate(" + p.x + "," + p.y + ")" });
        g.appendChild(svg("rect", { width: nodeW, height: 16, rx: 3, class: "cp-node-box cp-kind-" + n.kind }));
        var label = String(n.label || n.id);
        g.appendChild(svg("text", { x: 4, y: 12, class: "cp-node-text",
          text: label.length > 17 ? label.slice(0, 16) + "…" : label }));
        nodeLayer.appendChild(g);
      });
      root.addEventListener("mousemove", function (event) {
        var t = event.target;
        if (t.classList && t.classList.contains("cp-link")) {
          return showTip(event, [t.getAttribute("data-source") + " → " + t.getAttribute("data-target"),
            "weight " + fmt(Number(t.getAttribute("data-weight")))]);
        }
        var g = t.closest ? t.closest(".cp-node") : null;
        if (!g) { highlight(null); return hideTip(); }
        var n = at[g.getAttribute("data-id")].node, degree = 0;
        kept.forEach(function (l) { if (l.source === n.id || l.target === n.id) degree++; });
        highlight(n.id);
        showTip(event, [n.id, n.kind + " · layer " + n.layer + (n.pos !== null && n.pos !== undefined ?
          " · pos " + n.pos : ""), degree + " kept edge" + (degree === 1 ? "" : "s")]);
      });
      root.addEventListener("mouseleave", function () { highlight(null); hideTip(); });

      function highlight(id) {
        edgeLayer.querySelectorAll(".cp-link").forEach(function (p) {
          var on = id === null || p.getAttribute("data-source") === id || p.getAttribute("data-target") === id;
          p.setAttribute("stroke-opacity", id === null ? 0.65 : (on ? 0.95 : 0.08));
        });
      }

      holder.textContent = "";
      holder.appendChild(root);
    }

    slider.addEventListener("input", draw);
    hide.addEventListener("change", draw);
    draw();
  }

  function hashParam(name) {
    var found = null;
    window.location.hash.replace(/^#/, "").split("&").forEach(function (part) {
      var kv = part.split("=");
      if (kv[0] === name) found = decodeURIComponent(kv[1] || "");
    });
    return found;
  }

  function setHashParam(name, value) {
    var parts = window.location.hash.replace(/^#/, "").split("&").filter(function (p) {
      return p && p.split("=")[0] !== name;
    });
    parts.push(name + "=" + encodeURIComponent(value));
    try { history.replaceState(null, "", "#" + parts.join("&")); } catch (e) { /* sandboxed frame: no history */ }
  }

  // ------------------------------------------------------------------ faithfulness table

  function renderTable(body, view) {
    var head = el("tr", {}, [el("th", { text: view.rowdim })].concat(view.columns.map(function (c, i) {
      return el("th", { text: c, colspan: i === 0 ? 2 : null });
    })));
    var table = el("table", { class: "cp-table" }, head);
    view.rows.forEach(function (row) {
      var tr = el("tr", {}, el("th", { text: row.label }));
      row.cells.forEach(function (v, i) {
        var td = el("td", { class: "cp-num", text: fmt(v) });
        var barCell = null;
        if (i === 0) {  // the score as a bar: 80 px = 1, the whole candidate set
          barCell = el("td", { class: "cp-barcell" });
          var bar = el("span", { class: "cp-fbar" });
          bar.style.width = Math.round(80 * Math.max(0, Math.min(1.2, v === null ? 0 : Math.abs(v)))) + "px";
          bar.style.background = v !== null && v < 0 ? "rgb(33,102,172)" : "rgb(178,24,43)";
          barCell.appendChild(bar);
        }
        td.addEventListener("mousemove", function (event) {
          showTip(event, [view.rowdim + " " + row.label + " · " + view.columns[i], fmt(v)]);
        });
        td.addEventListener("mouseleave", hideTip);
        tr.appendChild(td);
        if (barCell) tr.appendChild(barCell);
      });
      table.appendChild(tr);
    });
    body.appendChild(table);
    if (view.note) body.appendChild(el("p", { class: "cp-muted", text: view.note }));
  }

  // ------------------------------------------------------------------ page

  var RENDERERS = { heatmap: renderHeatmap, bars: renderBars, scalar: renderScalar, attention: renderAttention,
    graph: renderGraph, table: renderTable };

  function renderView(container, view, index) {
    var section = el("section", { class: "cp-view", "data-kind": view.kind });
    if (view.name) section.appendChild(el("h2", { text: view.name }));
    if (view.facts && view.facts.length) section.appendChild(el("p", { class: "cp-facts",
      text: view.facts.join(" · ") }));
    var body = el("div", { class: "cp-body" });
    section.appendChild(body);
    var draw = RENDERERS[view.kind];
    if (!draw) body.appendChild(el("p", { class: "cp-muted", text: "no drawing for a view of kind " + view.kind }));
    else draw(body, view, index);
    if (view.metadata) {
      section.appendChild(el("details", { class: "cp-meta" }, [el("summary", { text: "metadata" }),
        el("pre", { text: JSON.stringify(view.metadata, null, 1) })]));
    }
    container.appendChild(section);
    return section;
  }

  function renderPage(data, root) {
    root = root || document.getElementById("cp-root") || document.body;
    root.appendChild(el("h1", { text: data.title || "crosspatch" }));
    if (data.links && data.links.length) {
      var p = el("p", { class: "cp-links" });
      data.links.forEach(function (link, i) {
        if (i) p.appendChild(document.createTextNode(" · "));
        p.appendChild(el("a", { href: link.href, text: link.text }));
      });
      root.appendChild(p);
    }
    var context = data.context || {};
    var keys = Object.keys(context);
    if (keys.length) {
      var table = el("table", { class: "cp-context" });
      keys.forEach(function (k) {
        table.appendChild(el("tr", {}, [el("th", { text: k }), el("td", { text: plain(context[k]) })]));
      });
      root.appendChild(table);
    }
    (data.views || []).forEach(function (view, i) { renderView(root, view, i); });
    if (data.footer) root.appendChild(el("footer", { text: data.footer }));
  }

  function plain(value) {
    if (Array.isArray(value)) return value.map(plain).join(", ");
    if (value && typeof value === "object") {
      return Object.keys(value).map(function (k) { return k + " " + plain(value[k]); }).join(", ");
    }
    return typeof value === "number" ? fmt(value) : String(value);
  }

  window.crosspatch = { renderView: renderView, renderPage: renderPage, colour: colour, fmt: fmt, el: el,
    barsSvg: barsSvg, barSite: barSite, showTip: showTip, hideTip: hideTip };

  function boot() {
    var block = document.getElementById("cp-data");
    if (block) renderPage(JSON.parse(block.textContent));
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot);
  else boot();
})();
