/* crosspatch serve: the page of the local explorer. Sweeps stream their progress (server-sent events),
   a click on a heatmap cell or a bar patches that site, the steering slider re-runs the next-token distribution.
   Every intervention is sent as its JSON (Intervention.to_dict()), never as code. Uses explorer.js. */
(function () {
  "use strict";

  var cp = window.crosspatch, el = cp.el, fmt = cp.fmt;
  var info = JSON.parse(document.getElementById("cp-serve").textContent).info;
  var root = document.getElementById("cp-root");
  var lastDocument = null;
  var example = Object.assign({ clean: "When Mary and John went to the store, John gave a drink to",
    corrupt: "When Mary and John went to the store, Mary gave a drink to", answer: " Mary", distractor: " John" },
    info.example || {});

  var api = cp.serveCommon.api;

  function field(id, label, value, attrs) {
    var input = el("input", Object.assign({ id: id, type: "text", value: value || "" }, attrs || {}));
    return el("label", { class: "cp-field" }, [el("span", { text: label }), input]);
  }

  function choice(id, label, options, selected) {
    var select = el("select", { id: id });
    options.forEach(function (o) {
      var option = el("option", { value: o, text: o });
      if (o === selected) option.selected = true;
      select.appendChild(option);
    });
    return el("label", { class: "cp-field cp-narrow" }, [el("span", { text: label }), select]);
  }

  function value(id) { return document.getElementById(id).value; }

  // ------------------------------------------------------------------ layout

  root.appendChild(el("h1", { text: "crosspatch · " + info.model }));
  root.appendChild(el("p", { class: "cp-facts", text: (info.describe["class"] || "") + " · " + info.layers +
    " layers · site families: " + info.families.join(", ") }));

  var datalist = el("datalist", { id: "cp-sweeps" });
  info.sweeps.forEach(function (s) { datalist.appendChild(el("option", { value: s })); });
  var pairs = info.examples || [];
  var picker = null;
  if (pairs.length > 1) {  // a task's pairs: pick one to fill the prompts and answers
    picker = el("select", { id: "pair", "aria-label": "task pair" });
    pairs.forEach(function (p, i) {
      picker.appendChild(el("option", { value: i, text: (i + 1) + ". " + p.clean + "  →  " + p.corrupt }));
    });
  }
  var form = el("form", { id: "cp-form", class: "cp-form", autocomplete: "off" }, [
    picker ? el("label", { class: "cp-field" }, [el("span", { text: "task pair" }), picker]) : null,
    field("clean", "clean prompt", example.clean),
    field("corrupt", "corrupt prompt", example.corrupt),
    el("div", { class: "cp-inline" }, [
      field("answer", "answer", example.answer, { class: "cp-short" }),
      field("distractor", "distractor", example.distractor, { class: "cp-short" }),
      choice("metric", "metric", info.metrics, "logit_diff"),
      choice("method", "method", info.methods, "activation_patching"),
      field("sites", "sites", info.sweeps[0] || "", { list: "cp-sweeps", class: "cp-sites" }),
      datalist
    ]),
    el("div", { class: "cp-inline" }, [
      el("button", { id: "run", type: "submit", text: "Run sweep" }),
      el("button", { id: "cancel", type: "button", text: "Cancel", disabled: "disabled" }),
      el("progress", { id: "progress", max: 1, value: 0 }),
      el("span", { id: "status", class: "cp-status", text: "idle" }),
      el("button", { id: "save-study", type: "button", text: "Save as study.toml" }),
      el("a", { id: "download", class: "cp-hidden", text: "download result JSON" })
    ])
  ]);
  root.appendChild(form);
  if (picker) {
    picker.addEventListener("change", function () {
      var p = pairs[Number(picker.value)];
      ["clean", "corrupt", "answer", "distractor"].forEach(function (k) { document.getElementById(k).value = p[k]; });
    });
  }

  var result = el("div", { id: "result", class: "cp-result" },
    el("p", { class: "cp-muted", text: "Run a sweep; then click a cell (or a bar) to patch that site." }));
  var patch = el("div", { id: "patch-panel", class: "cp-panel" }, [
    el("h2", { text: "Patch and see" }),
    el("p", { id: "patch-site", class: "cp-muted", text: "Click a heatmap cell or a bar: the clean activation there is " +
      "patched into the corrupt run." }),
    el("div", { id: "patch-dist" })
  ]);
  var steerSites = [];
  info.steer_families.forEach(function (f) {
    for (var l = 0; l < info.layers; l++) steerSites.push(f + "." + l);
  });
  var steer = el("div", { id: "steer-panel", class: "cp-panel" }, [
    el("h2", { text: "Steer" }),
    el("p", { class: "cp-muted", text: "Vector: mean activation on the clean prompt minus the corrupt one, added " +
      "with strength α at every position of the corrupt prompt." }),
    el("div", { class: "cp-inline" }, [
      choice("steer-site", "site", steerSites, steerSites[Math.min(steerSites.length - 1, Math.floor(info.layers / 2))]),
      el("button", { id: "steer-vector", type: "button", text: "Compute vector" })
    ]),
    el("label", { class: "cp-field" }, [el("span", { id: "steer-value", text: "α = 0" }),
      el("input", { id: "steer-alpha", type: "range", min: -8, max: 8, step: 0.5, value: 0, disabled: "disabled",
        class: "cp-slider" })]),
    el("div", { id: "steer-dist" })
  ]);
  var opened = el("div", { id: "opened" });
  root.appendChild(el("div", { class: "cp-columns" }, [result, el("div", { class: "cp-side" }, [patch, steer])]));
  root.appendChild(el("div", { class: "cp-panel" }, [el("h2", { text: "Open a saved Result or graph" }),
    el("input", { id: "open-file", type: "file", accept: ".json,application/json" }), opened]));

  // ------------------------------------------------------------------ sweeps

  function request() {
    return { clean: value("clean"), corrupt: value("corrupt"), answer: value("answer"),
      distractor: value("distractor"), metric: value("metric"), method: value("method"), sites: value("sites"),
      normalize: true };
  }

  var setStatus = cp.serveCommon.statusLine("status");

  function draw(view) {
    result.textContent = "";
    view.onSite = patchSite;
    cp.renderView(result, view, 0);
  }

  var startSweep = cp.serveCommon.sweeper(function () {
    var body = request();
    body.kind = "sweep";
    return body;
  }, {
    status: setStatus, progress: document.getElementById("progress"), unit: "layers", draw: draw,
    result: function (d) {
      draw(d.view);
      lastDocument = d.result;
      var link = document.getElementById("download");
      link.href = URL.createObjectURL(new Blob([JSON.stringify(lastDocument)], { type: "application/json" }));
      link.download = "result.json";
      link.className = "";
    }
  });

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    startSweep();
  });

  // ------------------------------------------------------------------ next-token distributions

  function distribution(container, data, title) {
    container.textContent = "";
    var table = el("table", { class: "cp-table cp-dist" }, el("tr", {}, [el("th", { text: "token" }),
      el("th", { text: data.patched ? "before" : "p" })].concat(data.patched ? [el("th", { text: "after" })] : [])));
    var rows = data.patched || data.base;
    var before = {};
    data.base.forEach(function (t) { before[t.id] = t.p; });
    rows.forEach(function (t) {
      var bar = el("span", { class: "cp-pbar" });
      bar.style.width = Math.round(120 * t.p) + "px";
      var cells = [el("td", { class: "cp-tok", text: JSON.stringify(t.token) })];
      if (data.patched) cells.push(el("td", { class: "cp-num", text: before[t.id] === undefined ? "<" +
        fmt(data.base[data.base.length - 1].p) : fmt(before[t.id]) }));
      var last = el("td", { class: "cp-num", text: fmt(t.p) });
      last.appendChild(bar);
      cells.push(last);
      table.appendChild(el("tr", { "data-token": t.token }, cells));
    });
    if (title) container.appendChild(el("h3", { text: title }));
    container.appendChild(table);
    (data.watch || []).forEach(function (w) {
      container.appendChild(el("p", { class: "cp-watch", text: "p(" + JSON.stringify(w.token) + "): " +
        fmt(w.base) + " → " + fmt(w.patched) }));
    });
  }

  function patchSite(site) {
    var panel = document.getElementById("patch-dist");
    document.getElementById("patch-site").textContent = "patching " + site + " (clean → corrupt)…";
    var body = { prompt: value("corrupt"), answer: value("answer"), distractor: value("distractor"),
      interventions: [{ site: site, intervention: { kind: "patch", source: value("clean") } }] };
    api("/api/predict", body).then(function (data) {
      document.getElementById("patch-site").textContent = "patched " + site;
      panel.setAttribute("data-site", site);
      distribution(panel, data, "next token of the corrupt prompt");
    }).catch(function (err) {
      document.getElementById("patch-site").textContent = "error: " + err.message;
    });
  }

  // ------------------------------------------------------------------ steering

  var steering = null;

  document.getElementById("steer-vector").addEventListener("click", function () {
    var body = request();
    body.kind = "steering";
    body.site = value("steer-site");
    document.getElementById("steer-value").textContent = "computing…";
    api("/api/jobs", body).then(function (job) {
      var source = new EventSource(job.events);
      source.addEventListener("result", function (e) {
        source.close();
        steering = JSON.parse(e.data).data;
        var slider = document.getElementById("steer-alpha");
        slider.disabled = false;
        slider.value = 0;
        document.getElementById("steer-value").textContent = "α = 0 (|vector| = " + fmt(steering.norm) + ")";
        steerTo(0);
      });
      source.addEventListener("error", function (e) {
        source.close();
        document.getElementById("steer-value").textContent = e.data ? "error: " + JSON.parse(e.data).message
          : "connection lost";
      });
    });
  });

  var steerTo = cp.serveCommon.latest(function (alpha) {
    if (!steering) return null;
    var intervention = Object.assign({}, steering.intervention, { alpha: alpha });
    return api("/api/predict", { prompt: value("corrupt"), answer: value("answer"), distractor: value("distractor"),
      interventions: alpha === 0 ? [] : [{ site: steering.site, intervention: intervention }] })
      .then(function (data) {
        var panel = document.getElementById("steer-dist");
        if (!data.patched) data.watch = [];
        distribution(panel, data, "next token, α = " + alpha);
        panel.setAttribute("data-alpha", String(alpha));
      })
      .catch(function (err) { document.getElementById("steer-value").textContent = "error: " + err.message; });
  });

  document.getElementById("steer-alpha").addEventListener("input", function (event) {
    var alpha = Number(event.target.value);
    document.getElementById("steer-value").textContent = "α = " + alpha;
    steerTo(alpha);
  });

  // the feature picker (serve_features.js) draws with the same pieces
  cp.serve = { api: api, distribution: distribution, value: value, choice: choice };

  // ------------------------------------------------------------------ study file, saved results

  document.getElementById("save-study").addEventListener("click", function () {
    cp.serveCommon.saveStudy(request(), setStatus);
  });

  document.getElementById("open-file").addEventListener("change", function (event) {
    var file = event.target.files[0];
    if (!file) return;
    file.text().then(function (text) {
      return api("/api/view", { name: file.name, document: JSON.parse(text) });
    }).then(function (view) {
      opened.textContent = "";
      cp.renderView(opened, view, 1);
    }).catch(function (err) {
      opened.textContent = "";
      opened.appendChild(el("p", { class: "cp-bad", text: "cannot open " + file.name + ": " + err.message }));
    });
  });
})();
