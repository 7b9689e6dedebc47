/* crosspatch serve: what every page of the local explorer shares. api(path, body) sends JSON to the
   page's own server (GET without a body) and rejects with the server's error message; latest(send)
   wraps a request so that one is in flight at a time and, while it runs, only the newest value waits
   to be sent next (a dragged slider never piles up requests). Uses explorer.js. */
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

  window.crosspatch.serveCommon = { api: api, latest: latest };
})();
