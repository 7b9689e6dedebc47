/* crosspatch serve: what every page of the local explorer shares. api(path, body) sends JSON to the
   page's own server (GET without a body) and rejects with the server's error message; latest(send)
   wraps a request so that one is in flight at a time and, while it runs, only the newest value waits
   to be sent next (a dragged slider never piles up requests); follow(job, ui) shows a queued job's
   events as they stream; saveStudy(body, status) downloads the sweep as a study file. Uses explorer.js. */
(function () {
  "use strict";

  function api(path, body) {
    return fetch(path, {
      method: body === undefined ? "GET" : "POST",
      headers: body === undefined ? {} : { "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body)
    }).then(function (response) {
      return response.json().then(function (data) {
        if (!response.ok) throw new Error(data.error || ("HTTP " + response.status));
        return data;
      });
    });
  }

  function latest(send) {
    var inFlight = false, waiting = false, wanted = null;
    function go(value) {
      wanted = value;
      waiting = true;
      if (inFlight) return;
      waiting = false;
      inFlight = true;
      Promise.resolve(send(value)).catch(function () { /* send shows its own errors */ }).then(function () {
        inFlight = false;
        if (waiting) go(wanted);
      });
    }
    return go;
  }

  // A queued job's server-sent events (queued, started, progress, result, error, cancelled) shown through
  // ui: status(text, cls), progress (a <progress>), unit (what a step is), draw(view), result(data), end().
  function follow(job, ui) {
    var source = new EventSource(job.events);
    function end(text, cls) {
      source.close();
      ui.end();
      ui.status(text, cls);
    }
    source.addEventListener("queued", function (e) {
      var d = JSON.parse(e.data);
      ui.status(d.position > 0 ? "queued behind " + d.position + " job(s)" : "queued");
    });
    source.addEventListener("started", function () { ui.status("running"); });
    source.addEventListener("progress", function (e) {
      var d = JSON.parse(e.data);
      ui.progress.max = d.total;
      ui.progress.value = d.done;
      ui.status("running: " + d.done + " of " + d.total + " " + ui.unit);
      if (d.view) ui.draw(d.view);
    });
    source.addEventListener("result", function (e) {
      ui.progress.value = ui.progress.max;
      ui.result(JSON.parse(e.data).data);
      end("done", "cp-ok");
    });
    source.addEventListener("error", function (e) {
      if (e.data) end("error: " + JSON.parse(e.data).message, "cp-bad");
      else if (source.readyState === EventSource.CLOSED) end("connection lost", "cp-bad");
    });
    source.addEventListener("cancelled", function () { end("cancelled", "cp-bad"); });
    return source;
  }

  // A sweep's Cancel button (#cancel) wired, and the function that starts one: body() is the request,
  // ui as for follow (without end: the Run button #run and Cancel are enabled and disabled here).
  function sweeper(body, ui) {
    var current = null, run = document.getElementById("run"), cancel = document.getElementById("cancel");
    cancel.addEventListener("click", function () {
      if (current) api("/api/jobs/" + current + "/cancel", {}).catch(function () { /* already ended */ });
    });
    return function start() {
      run.disabled = true;
      ui.status("sending…");
      api("/api/jobs", body()).then(function (job) {
        current = job.id;
        cancel.disabled = false;
        follow(job, Object.assign({}, ui, { end: function () {
          current = null;
          run.disabled = false;
          cancel.disabled = true;
        } }));
      }).catch(function (err) {
        run.disabled = false;
        ui.status("error: " + err.message, "cp-bad");
      });
    };
  }

  // A status line's setter: status(text, cls) shows text in element #id styled by cls (cp-ok, cp-bad, ...).
  function statusLine(id) {
    return function (text, cls) {
      var node = document.getElementById(id);
      node.textContent = text;
      node.className = "cp-status " + (cls || "");
    };
  }

  // "Save as study.toml": the server writes the sweep's settings as a study file, the page downloads it;
  // status(text, cls) says what happened (the server's reason when it cannot be saved).
  function saveStudy(body, status) {
    return fetch("/api/study", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body) }).then(function (response) {
      return response.text().then(function (text) {
        if (!response.ok) {
          var message;
          try { message = JSON.parse(text).error; } catch (e) { message = "HTTP " + response.status; }
          throw new Error(message);
        }
        var link = window.crosspatch.el("a", { href: URL.createObjectURL(new Blob([text], { type: "application/toml" })),
          download: "study.toml" });
        document.body.appendChild(link);
        link.click();
        link.remove();
        status("saved study.toml: crosspatch run study.toml computes these values", "cp-ok");
      });
    }).catch(function (err) { status("study not saved: " + err.message, "cp-bad"); });
  }

  window.crosspatch.serveCommon = { api: api, latest: latest, follow: follow, sweeper: sweeper, saveStudy: saveStudy,
    statusLine: statusLine };
})();
