/* crosspatch serve: the SAE / transcoder feature picker of a text model's page. Choose a dictionary
   (an SAE or a transcoder), a source layer and a feature: the server answers with the feature's
   steering interventions (Add of its decoder row at each site it writes, as to_dict JSON) and where
   the feature fires on the corrupt prompt; the slider sends those interventions back with a new
   alpha and the next-token distribution follows. Uses explorer.js and serve.js. */
(function () {
  "use strict";

  var cp = window.crosspatch, el = cp.el, fmt = cp.fmt, serve = cp.serve;
  var info = JSON.parse(document.getElementById("cp-serve").textContent).info;
  var dictionaries = {};
  (info.features || []).forEach(function (d) { dictionaries[d.name] = d; });
  var side = document.querySelector(".cp-side");

  var dictSelect = el("select", { id: "feature-dict" });
  var sourceSelect = el("select", { id: "feature-source" });
  var panel = el("div", { id: "feature-panel", class: "cp-panel" }, [
    el("h2", { text: "Steer with a feature" }),
    el("p", { class: "cp-muted", text: "An SAE or transcoder feature's decoder row, added with strength α where the " +
      "dictionary writes (every position of the corrupt prompt): what the feature would write at activation α." }),
    el("div", { class: "cp-inline" }, [
      el("label", { class: "cp-field cp-narrow" }, [el("span", { text: "SAE / transcoder" }), dictSelect]),
      el("label", { class: "cp-field cp-narrow" }, [el("span", { text: "source" }), sourceSelect]),
      el("label", { class: "cp-field cp-narrow" }, [el("span", { text: "feature" }),
        el("input", { id: "feature-index", type: "number", min: 0, value: 0, class: "cp-short" })]),
      el("button", { id: "feature-load", type: "button", text: "Load feature" })
    ]),
    el("div", { class: "cp-inline" }, [
      el("label", { class: "cp-field" }, [el("span", { text: "or load a folder (SAE: cfg.json, transcoder: " +
        "transcoder.json)" }), el("input", { id: "dict-path", type: "text", class: "cp-sites" })]),
      el("button", { id: "dict-load", type: "button", text: "Load folder" })
    ]),
    el("p", { id: "feature-status", class: "cp-status", text: "" }),
    el("div", { id: "feature-info" }),
    el("label", { class: "cp-field" }, [el("span", { id: "feature-value", text: "α = 0" }),
      el("input", { id: "feature-alpha", type: "range", min: -10, max: 10, step: 0.5, value: 0, disabled: "disabled",
        class: "cp-slider" })]),
    el("div", { id: "feature-dist" })
  ]);
  side.appendChild(panel);

  var status = cp.serveCommon.statusLine("feature-status");

  function fillDictionaries(selected) {
    dictSelect.textContent = "";
    Object.keys(dictionaries).forEach(function (name) {
      var option = el("option", { value: name, text: name + " (" + dictionaries[name].kind + ", " +
        dictionaries[name].n_features + " features)" });
      if (name === selected) option.selected = true;
      dictSelect.appendChild(option);
    });
    fillSources();
    if (!Object.keys(dictionaries).length) status("no SAE or transcoder loaded: load a folder", "");
  }

  function fillSources() {
    sourceSelect.textContent = "";
    var d = dictionaries[dictSelect.value];
    if (!d) return;
    d.sources.forEach(function (s) {
      sourceSelect.appendChild(el("option", { value: s.index, text: s.reads + " → " + s.writes.join(", ") }));
    });
    sourceSelect.value = String(Math.min(d.sources.length - 1, 1));
    document.getElementById("feature-index").max = d.n_features - 1;
  }

  dictSelect.addEventListener("change", fillSources);
  fillDictionaries(Object.keys(dictionaries)[0]);

  document.getElementById("dict-load").addEventListener("click", function () {
    status("loading…");
    serve.api("/api/dictionaries", { path: serve.value("dict-path") }).then(function (d) {
      dictionaries[d.name] = d;
      fillDictionaries(d.name);
      status("loaded " + d.name, "cp-ok");
    }).catch(function (err) { status("error: " + err.message, "cp-bad"); });
  });

  // ------------------------------------------------------------------ one feature

  var feature = null;

  function tokens(data) {
    var box = el("div", { class: "cp-feature-tokens", id: "feature-tokens" });
    var peak = Math.max.apply(null, data.tokens.map(function (t) { return t.activation; }).concat([1e-12]));
    var byPos = data.tokens.slice().sort(function (a, b) { return a.pos - b.pos; });
    byPos.forEach(function (t) {
      var span = el("span", { class: "cp-ftok", text: t.token, title: "position " + t.pos + ": " + fmt(t.activation),
        "data-activation": t.activation });
      var share = Math.max(0, t.activation) / peak;
      span.style.background = "rgba(230, 97, 1, " + (0.85 * share).toFixed(3) + ")";
      box.appendChild(span);
    });
    return box;
  }

  function showFeature(data) {
    var infoBox = document.getElementById("feature-info");
    infoBox.textContent = "";
    infoBox.appendChild(el("p", { class: "cp-watch", text: "feature " + data.feature + " of " + data.dictionary +
      " writes at " + data.interventions.map(function (i) { return i.site; }).join(", ") + " (|decoder row| = " +
      fmt(data.norm) + ")" }));
    if (data.tokens) {
      var top = data.tokens.filter(function (t) { return t.activation > 0; }).slice(0, 5);
      infoBox.appendChild(el("p", { class: "cp-watch", text: top.length ? "fires on the corrupt prompt at: " +
        top.map(function (t) { return JSON.stringify(t.token) + " " + fmt(t.activation); }).join(", ") :
        "does not fire on the corrupt prompt" }));
      infoBox.appendChild(tokens(data));
    }
    if (data.active && data.active.length) {
      var list = el("p", { class: "cp-watch", id: "feature-active" }, [el("span", { text: "most active here: " })]);
      data.active.forEach(function (a, i) {
        var link = el("a", { href: "#", text: "#" + a.feature, title: fmt(a.activation) + " at " + JSON.stringify(a.token),
          "data-feature": a.feature });
        link.addEventListener("click", function (event) {
          event.preventDefault();
          document.getElementById("feature-index").value = a.feature;
          load();
        });
        if (i) list.appendChild(document.createTextNode(", "));
        list.appendChild(link);
      });
      infoBox.appendChild(list);
    }
  }

  function load() {
    var body = { dictionary: dictSelect.value, source: Number(sourceSelect.value),
      feature: Number(document.getElementById("feature-index").value), prompt: serve.value("corrupt") };
    status("loading feature…");
    serve.api("/api/feature", body).then(function (data) {
      feature = data;
      showFeature(data);
      var slider = document.getElementById("feature-alpha");
      slider.disabled = false;
      slider.value = 0;
      document.getElementById("feature-value").textContent = "α = 0";
      status("feature " + data.feature, "cp-ok");
      steerTo(0);
    }).catch(function (err) { status("error: " + err.message, "cp-bad"); });
  }

  document.getElementById("feature-load").addEventListener("click", load);

  var steerTo = cp.serveCommon.latest(function (alpha) {
    if (!feature) return null;
    var shown = feature;
    var interventions = alpha === 0 ? [] : shown.interventions.map(function (i) {
      return { site: i.site, intervention: Object.assign({}, i.intervention, { alpha: alpha }) };
    });
    return serve.api("/api/predict", { prompt: serve.value("corrupt"), answer: serve.value("answer"),
      distractor: serve.value("distractor"), interventions: interventions })
      .then(function (data) {
        var out = document.getElementById("feature-dist");
        if (!data.patched) data.watch = [];
        serve.distribution(out, data, "next token, feature " + shown.feature + " at α = " + alpha);
        out.setAttribute("data-alpha", String(alpha));
        out.setAttribute("data-feature", String(shown.feature));
      })
      .catch(function (err) { status("error: " + err.message, "cp-bad"); });
  });

  document.getElementById("feature-alpha").addEventListener("input", function (event) {
    var alpha = Number(event.target.value);
    document.getElementById("feature-value").textContent = "α = " + alpha;
    steerTo(alpha);
  });
})();
