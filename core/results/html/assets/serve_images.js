/* crosspatch serve: the page of an image model. A VAE shows the reconstruction of a shapes image
   changing as a latent direction's strength is dragged, and the image a patch between two shapes
   images produces; a CLIP-style model shows the image's similarities to captions changing the same
   way. Images arrive as PNG data URLs; every intervention is sent as its JSON (to_dict), and a patch
   names its source image by its index in the gallery ({"image": k}). Uses explorer.js. */
(function () {
  "use strict";

  var cp = window.crosspatch, el = cp.el, fmt = cp.fmt;
  var info = JSON.parse(document.getElementById("cp-serve").textContent).info;
  var root = document.getElementById("cp-root");
  var isVAE = info.kind === "vae";
  var gallery = info.gallery;

  var api = cp.serveCommon.api;

  function choice(id, label, options, selected) {
    var select = el("select", { id: id });
    options.forEach(function (o) {
      var option = el("option", { value: o.value, text: o.text });
      if (String(o.value) === String(selected)) option.selected = true;
      select.appendChild(option);
    });
    return el("label", { class: "cp-field cp-narrow" }, [el("span", { text: label }), select]);
  }

  function value(id) { return document.getElementById(id).value; }
  function imageA() { return Number(value("image-a")); }
  function imageB() { return Number(value("image-b")); }

  function picture(src, caption, id, attrs) {
    var img = el("img", Object.assign({ src: src, alt: caption, class: "cp-pixels" }, id ? { id: id } : {}, attrs || {}));
    return el("figure", { class: "cp-figure" }, [img, el("figcaption", { text: caption })]);
  }

  // ------------------------------------------------------------------ layout

  root.appendChild(el("h1", { text: "crosspatch · " + info.model }));
  var describe = info.describe || {};
  root.appendChild(el("p", { class: "cp-facts", text: (describe["class"] || "") + " · " + (isVAE ?
    "VAE, " + info.latent_dim + " latents: the reconstruction under steering and patching" :
    "two towers: image-text similarities (logit_scale × cosine) under steering and patching") +
    " · images of the shapes task" }));

  var images = gallery.map(function (g) {
    return { value: g.index, text: (g.index + 1) + ". " + g.caption + (g.split === "test" ? " (held out)" : "") };
  });
  var strip = el("div", { id: "gallery", class: "cp-gallery" });
  gallery.forEach(function (g) {
    var thumb = el("img", { src: g.png, alt: g.caption, title: (g.index + 1) + ". " + g.caption + " (click: image A, " +
      "shift-click: image B)", class: "cp-thumb", "data-index": g.index });
    thumb.addEventListener("click", function (event) {
      var target = document.getElementById(event.shiftKey ? "image-b" : "image-a");
      target.value = String(g.index);
      target.dispatchEvent(new Event("change"));
    });
    strip.appendChild(thumb);
  });
  var captions = isVAE ? null : el("textarea", { id: "captions", rows: 9, spellcheck: "false" });
  var pairPicker = null;
  if ((info.pairs || []).length) {  // counterfactual pairs: picking one sets image A and image B
    pairPicker = el("select", { id: "pair-pick" }, el("option", { value: "", text: "—" }));
    info.pairs.forEach(function (p, i) {
      pairPicker.appendChild(el("option", { value: i, text: p.factor + ": " + gallery[p.a].caption + "  ↔  " +
        gallery[p.b].caption }));
    });
    pairPicker.addEventListener("change", function () {
      if (pairPicker.value === "") return;
      var p = info.pairs[Number(pairPicker.value)];
      document.getElementById("image-b").value = String(p.b);
      var a = document.getElementById("image-a");
      a.value = String(p.a);
      a.dispatchEvent(new Event("change"));
    });
  }
  root.appendChild(el("div", { class: "cp-form" }, [
    strip,
    el("div", { class: "cp-inline" }, [
      choice("image-a", "image A (the run)", images, 0),
      choice("image-b", "image B (patch source, steering target)", images, Math.min(1, gallery.length - 1)),
      pairPicker ? el("label", { class: "cp-field cp-narrow" }, [el("span", { text: "or a pair that differs in one " +
        "factor" }), pairPicker]) : null,
      el("span", { id: "status", class: "cp-status", text: "idle" })
    ]),
    el("div", { id: "pair", class: "cp-inline" }),
    captions ? el("label", { class: "cp-field" }, [el("span", { text: "captions, one per line (image A is scored " +
      "against each)" }), captions]) : null
  ]));

  var siteOptions = info.sites.map(function (s) { return { value: s, text: s }; });
  var latentSite = info.latent_site || "latent.z";
  var directions = [];
  if (isVAE) {
    for (var k = 0; k < (info.latent_dim || 0); k++) directions.push({ value: "z" + k, text: "latent axis z" + k });
  }
  directions.push({ value: "contrast", text: "image A → image B (difference of mean activations)" });

  var steer = el("div", { id: "steer-panel", class: "cp-panel" }, [
    el("h2", { text: "Steer" }),
    el("p", { class: "cp-muted", text: isVAE ? "Add α × direction at the site, on image A's run: a latent axis " +
      "(at " + latentSite + "), or the difference between image B's and image A's activation (α = 1 at " +
      latentSite + " decodes image B's latent)." : "Add α × (image B's mean activation − image A's) at a vision " +
      "site of image A's run, and watch its similarity to each caption." }),
    el("div", { class: "cp-inline" }, [
      choice("direction", "direction", directions, directions[0].value),
      choice("steer-site", "site", siteOptions, isVAE ? latentSite : info.sites[Math.max(0, info.sites.length - 2)]),
      el("button", { id: "steer-vector", type: "button", text: isVAE ? "Use direction" : "Compute vector" })
    ]),
    el("label", { class: "cp-field" }, [el("span", { id: "steer-value", text: "α = 0" }),
      el("input", { id: "steer-alpha", type: "range", min: isVAE ? -4 : -8, max: isVAE ? 4 : 8, step: isVAE ? 0.25 : 0.5,
        value: 0, disabled: "disabled", class: "cp-slider" })]),
    el("div", { id: "steer-out" })
  ]);
  var patchList = el("datalist", { id: "cp-patch-sites" });
  (info.patch_sites || info.sites).forEach(function (s) { patchList.appendChild(el("option", { value: s })); });
  var patch = el("div", { id: "patch-panel", class: "cp-panel" }, [
    el("h2", { text: "Patch" }),
    el("p", { class: "cp-muted", text: "Replace the activation at the site in image A's run with image B's (a " +
      "selection such as latent.z[dim=2] or vision.resid_post.1[pos=0] patches that part alone)." }),
    el("div", { class: "cp-inline" }, [
      el("label", { class: "cp-field cp-narrow" }, [el("span", { text: "site (pick or type one)" }),
        el("input", { id: "patch-site", type: "text", list: "cp-patch-sites", class: "cp-sites",
          value: isVAE ? latentSite : info.sites[0] })]),
      patchList,
      el("button", { id: "patch-run", type: "button", text: "Patch B → A" })
    ]),
    el("div", { id: "patch-out" })
  ]);
  var sweepList = el("datalist", { id: "cp-sweeps" });
  (info.sweeps || []).forEach(function (s) { sweepList.appendChild(el("option", { value: s })); });
  var sweep = el("div", { id: "sweep-panel", class: "cp-panel" }, [
    el("h2", { text: "Sweep" }),
    el("p", { class: "cp-muted", text: "Patch each site of the pattern from image B into image A's run, one layer at a " +
      "time; 1 is the whole way from A's output to B's (" + (isVAE ? "minus the squared distance to B's " +
      "reconstruction" : "logit of B's caption minus logit of A's") + "). Click a heatmap cell or a bar to patch " +
      "that site." }),
    el("div", { class: "cp-inline" }, [
      el("label", { class: "cp-field cp-narrow" }, [el("span", { text: "sites" }),
        el("input", { id: "sites", type: "text", list: "cp-sweeps", class: "cp-sites", value: (info.sweeps || [""])[0] })]),
      sweepList,
      el("button", { id: "run", type: "button", text: "Run sweep" }),
      el("button", { id: "cancel", type: "button", text: "Cancel", disabled: "disabled" }),
      el("progress", { id: "progress", max: 1, value: 0 }),
      el("span", { id: "sweep-status", class: "cp-status", text: "idle" }),
      el("button", { id: "save-study", type: "button", text: "Save as study.toml",
        title: "the two images (named by how the shapes task draws them), the sites and the metric, as a study " +
          "file: crosspatch run study.toml computes this sweep's values" })
    ]),
    el("div", { id: "result", class: "cp-result" })
  ]);
  root.appendChild(sweep);
  root.appendChild(el("div", { class: "cp-columns" }, [steer, patch]));

  var setStatus = cp.serveCommon.statusLine("status");

  // ------------------------------------------------------------------ requests and what they show

  function captionList() {
    return captions.value.split("\n").map(function (c) { return c.trim(); }).filter(function (c) { return c; });
  }

  function run(interventions) {
    var body = { image: imageA(), interventions: interventions };
    if (!isVAE) body.captions = captionList();
    return api("/api/image", body);
  }

  function showImages(container, data, label, attrs) {
    container.textContent = "";
    var row = el("div", { class: "cp-images" }, [
      picture(data.input, "image A"),
      picture(data.base, "reconstruction"),
      data.output ? picture(data.output, label, null, attrs) : null
    ]);
    container.appendChild(row);
    if (data.output) {
      container.appendChild(el("p", { class: "cp-watch", text: "mean |Δ pixel| " + fmt(data.mean_abs_change) }));
    }
    if (data.mu) {
      container.appendChild(el("p", { class: "cp-watch", text: "image A's latent mean: " +
        data.mu.map(function (v, i) { return "z" + i + " " + fmt(v); }).join(", ") }));
    }
  }

  function showSimilarities(container, data, attrs) {
    container.textContent = "";
    var changed = !!data.patched;
    var table = el("table", Object.assign({ class: "cp-table cp-dist" }, attrs || {}), el("tr", {}, [
      el("th", { text: "caption" }), el("th", { text: changed ? "similarity before" : "similarity" }),
      el("th", { text: changed ? "after" : "" }), el("th", { text: "p (softmax over captions)" })]));
    var probs = changed ? data.patched_probs : data.base_probs;
    data.captions.forEach(function (caption, i) {
      var bar = el("span", { class: "cp-pbar" });
      bar.style.width = Math.round(120 * probs[i]) + "px";
      var p = el("td", { class: "cp-num", text: fmt(probs[i]) });
      p.appendChild(bar);
      table.appendChild(el("tr", { "data-caption": caption }, [
        el("td", { class: "cp-tok", text: caption }),
        el("td", { class: "cp-num", text: fmt(data.base[i]) }),
        el("td", { class: "cp-num cp-after", text: changed ? fmt(data.patched[i]) : "" }),
        p
      ]));
    });
    container.appendChild(el("div", { class: "cp-images" }, [picture(data.input, "image A")]));
    container.appendChild(table);
  }

  function show(container, data, label, attrs) {
    if (isVAE) showImages(container, data, label, attrs);
    else showSimilarities(container, data, attrs);
  }

  // ------------------------------------------------------------------ the pair

  function showPair() {
    var a = gallery[imageA()], b = gallery[imageB()];
    var pair = document.getElementById("pair");
    pair.textContent = "";
    pair.appendChild(picture(a.png, "A: " + a.caption, "pair-a"));
    pair.appendChild(picture(b.png, "B: " + b.caption, "pair-b"));
    var marks = document.querySelectorAll(".cp-thumb");
    for (var i = 0; i < marks.length; i++) {
      var index = Number(marks[i].getAttribute("data-index"));
      marks[i].className = "cp-thumb" + (index === imageA() ? " cp-a" : "") + (index === imageB() ? " cp-b" : "");
    }
  }

  document.getElementById("image-a").addEventListener("change", function () {
    if (captions) captions.value = (gallery[imageA()].captions || [gallery[imageA()].caption]).join("\n");
    showPair();
    steering = null;
    document.getElementById("steer-alpha").disabled = true;
    document.getElementById("steer-value").textContent = "α = 0";
    refreshBase();
  });
  document.getElementById("image-b").addEventListener("change", function () {
    showPair();
    if (steering && value("direction") === "contrast") {
      steering = null;
      document.getElementById("steer-alpha").disabled = true;
    }
  });

  function refreshBase() {
    setStatus("running…");
    run([]).then(function (data) {
      var out = document.getElementById("steer-out");
      show(out, data, "steered");
      setStatus("ready", "cp-ok");
    }).catch(function (err) { setStatus("error: " + err.message, "cp-bad"); });
  }

  // ------------------------------------------------------------------ steering

  var steering = null;

  document.getElementById("steer-vector").addEventListener("click", function () {
    var direction = value("direction");
    var slider = document.getElementById("steer-alpha");
    function ready(data) {
      steering = data;
      slider.disabled = false;
      slider.value = 0;
      document.getElementById("steer-value").textContent = "α = 0 (|vector| = " + fmt(steering.norm) + ", at " +
        steering.site + ")";
      steerTo(0);
    }
    if (direction !== "contrast") {  // a latent axis: the unit vector, built here as data
      var axis = Number(direction.slice(1)), vector = [];
      for (var i = 0; i < info.latent_dim; i++) vector.push(info.latent_spatial ? [[i === axis ? 1 : 0]] : i === axis ? 1 : 0);
      document.getElementById("steer-site").value = latentSite;
      ready({ site: latentSite, intervention: { kind: "add", vector: vector, alpha: 1 }, norm: 1 });
      return;
    }
    document.getElementById("steer-value").textContent = "computing…";
    api("/api/jobs", { kind: "steering", site: value("steer-site"), image: imageA(), toward: imageB() })
      .then(function (job) {
        var source = new EventSource(job.events);
        source.addEventListener("result", function (e) { source.close(); ready(JSON.parse(e.data).data); });
        source.addEventListener("error", function (e) {
          source.close();
          document.getElementById("steer-value").textContent = e.data ? "error: " + JSON.parse(e.data).message
            : "connection lost";
        });
      }).catch(function (err) { document.getElementById("steer-value").textContent = "error: " + err.message; });
  });

  var steerTo = cp.serveCommon.latest(function (alpha) {
    if (!steering) return null;
    var intervention = Object.assign({}, steering.intervention, { alpha: alpha });
    return run(alpha === 0 ? [] : [{ site: steering.site, intervention: intervention }])
      .then(function (data) {
        var out = document.getElementById("steer-out");
        show(out, data, "steered, α = " + alpha, { id: "steer-shown" });
        out.setAttribute("data-alpha", String(alpha));
        setStatus("ready", "cp-ok");
      })
      .catch(function (err) { document.getElementById("steer-value").textContent = "error: " + err.message; });
  });

  document.getElementById("steer-alpha").addEventListener("input", function (event) {
    var alpha = Number(event.target.value);
    document.getElementById("steer-value").textContent = "α = " + alpha + (steering ? " (at " + steering.site + ")" : "");
    steerTo(alpha);
  });

  // ------------------------------------------------------------------ sweeps

  var sweepStatus = cp.serveCommon.statusLine("sweep-status");

  function drawSweep(view) {
    var result = document.getElementById("result");
    result.textContent = "";
    view.onSite = function (site) {  // a clicked cell or bar: patch that site from B into A
      document.getElementById("patch-site").value = site;
      document.getElementById("patch-run").click();
    };
    cp.renderView(result, view, 0);
  }

  function sweepRequest() {
    return { kind: "sweep", image: imageA(), toward: imageB(), sites: value("sites") };
  }

  document.getElementById("save-study").addEventListener("click", function () {
    cp.serveCommon.saveStudy(sweepRequest(), sweepStatus);
  });

  document.getElementById("run").addEventListener("click", cp.serveCommon.sweeper(sweepRequest, {
    status: sweepStatus, progress: document.getElementById("progress"), unit: "steps", draw: drawSweep,
    result: function (d) { drawSweep(d.view); } }));

  // ------------------------------------------------------------------ patching

  document.getElementById("patch-run").addEventListener("click", function () {
    var site = value("patch-site");
    var out = document.getElementById("patch-out");
    out.removeAttribute("data-site");
    setStatus("patching " + site + "…");
    run([{ site: site, intervention: { kind: "patch", source: { image: imageB() } } }]).then(function (data) {
      show(out, data, "patched at " + site, { id: "patch-shown" });
      if (isVAE) out.querySelector(".cp-images").appendChild(picture(gallery[imageB()].png, "image B (source)"));
      out.setAttribute("data-site", site);
      setStatus("patched " + site, "cp-ok");
    }).catch(function (err) { setStatus("error: " + err.message, "cp-bad"); });
  });

  if (captions) captions.value = (gallery[0].captions || [gallery[0].caption]).join("\n");
  showPair();
  refreshBase();
})();
