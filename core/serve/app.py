"""The Starlette application: the page, the JSON API and the event streams.

    GET  /                        the page (script and style inlined; nothing fetched elsewhere)
    GET  /api/info                the model, its site families, suggested sweeps, methods, metrics
    POST /api/tokens              {"text"} -> the tokens
    POST /api/jobs                {"kind": "sweep" | "predict" | "steering", ...} -> {"id"}; queued
    GET  /api/jobs/{id}/events    the job's events as a server-sent event stream
    POST /api/jobs/{id}/cancel    cancel a queued or running job
    GET  /api/queue               the running job and the queued ones
    POST /api/predict             a predict job, answered when it has run (the slider and clicks use it)
    POST /api/image               VAE / CLIP: a gallery image's reconstruction or similarities under interventions
    POST /api/feature             an SAE / transcoder feature: its steering interventions, where it fires
    POST /api/dictionaries        {"path"}: load an SAE or transcoder folder for the feature picker
    POST /api/study               the page's sweep as a study file (TOML text): prompts, or two shapes images
    POST /api/view                a saved Result or graph (its JSON) -> the view the page draws

POST bodies must be JSON (``Content-Type: application/json``: another site's page cannot send that
without a CORS preflight, which this server never answers) and requests must name this server in
``Host`` (a DNS-rebinding page names its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, Mapping

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..results.html.graph import is_graph
from ..results.html.page import document_html, json_script
from ..results.html.views import view
from .jobs import TERMINAL, JobQueue
from .session import RequestError, Session

__all__ = ["create_app"]

#: Seconds between looks at a job's events while streaming them.
POLL = 0.05
#: Longest a synchronous predict waits for its turn and its run (seconds).
PREDICT_TIMEOUT = 600.0


def create_app(session: Session, *, allowed_hosts: list[str] | None = None) -> Starlette:
    """The app over ``session``; ``allowed_hosts`` are the ``Host`` names accepted (default loopback)."""
    jobs = JobQueue()

    async def page(request: Request) -> Response:
        data = json_script({"info": session.info()}, "cp-serve")
        scripts = ["explorer.js", "serve_common.js", *(
            ["serve_images.js"] if session.kind in ("vae", "clip") else ["serve.js", "serve_features.js"])]
        return HTMLResponse(document_html(f"crosspatch · {session.name}", ["explorer.css", "serve.css"],
                                          scripts, data, same_origin=True))

    async def info(request: Request) -> Response:
        return JSONResponse(session.info())

    async def tokens(request: Request) -> Response:
        body = await _json(request)
        return JSONResponse({"tokens": session.tokens(str(body.get("text", "")))})

    def submit(body: Mapping[str, Any]):
        kind = body.get("kind")
        if kind == "sweep":
            return jobs.submit(kind, lambda job: session.sweep(job, body))
        if kind == "predict":
            return jobs.submit(kind, lambda job: session.predict(body))
        if kind == "steering":
            return jobs.submit(kind, lambda job: session.steering(body))
        if kind == "image" and hasattr(session, "image"):
            return jobs.submit(kind, lambda job: session.image(body))
        if kind == "feature" and hasattr(session, "feature"):
            return jobs.submit(kind, lambda job: session.feature(body))
        if kind == "dictionary" and hasattr(session, "load_dictionary"):
            return jobs.submit(kind, lambda job: session.load_dictionary(body))
        kinds = "sweep, predict, steering, " + ("image" if session.kind in ("vae", "clip") else "feature, dictionary")
        raise RequestError(f"kind {kind!r} is not one of {kinds}")

    async def create_job(request: Request) -> Response:
        job = submit(await _json(request))
        return JSONResponse({"id": job.id, "events": f"/api/jobs/{job.id}/events"}, status_code=202)

    async def events(request: Request) -> Response:
        job = jobs.get(request.path_params["job"])
        if job is None:
            return JSONResponse({"error": "no such job (finished jobs are kept for a while only)"}, status_code=404)

        async def stream():
            seen = 0
            while True:
                fresh = job.events[seen:]
                seen += len(fresh)
                for event in fresh:
                    yield f"event: {event['event']}\ndata: {json.dumps(event, allow_nan=False)}\n\n"
                    if event["event"] in TERMINAL:
                        return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(POLL)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def cancel(request: Request) -> Response:
        ok = jobs.cancel(request.path_params["job"])
        return JSONResponse({"cancelled": ok}, status_code=200 if ok else 409)

    async def queue(request: Request) -> Response:
        return JSONResponse(jobs.status())

    async def answered(request: Request, kind: str) -> Response:
        """Queue a ``kind`` job and answer with its result once it has run."""
        body = dict(await _json(request))
        body["kind"] = kind
        job = submit(body)
        loop = asyncio.get_running_loop()
        last = await loop.run_in_executor(None, job.wait, PREDICT_TIMEOUT)
        if last["event"] == "result":
            return JSONResponse(last["data"])
        return JSONResponse({"error": last.get("message", last["event"])}, status_code=400)

    async def predict(request: Request) -> Response:
        return await answered(request, "predict")

    async def image(request: Request) -> Response:
        return await answered(request, "image")

    async def feature(request: Request) -> Response:
        return await answered(request, "feature")

    async def dictionaries(request: Request) -> Response:
        return await answered(request, "dictionary")

    async def study(request: Request) -> Response:
        study = session.study(await _json(request))
        return PlainTextResponse(study.to_toml(), media_type="application/toml",
                                 headers={"Content-Disposition": 'attachment; filename="study.toml"'})

    async def open_view(request: Request) -> Response:
        body = await _json(request)
        name = str(body.get("name", "saved"))
        document = body.get("document")
        if is_graph(document):
            return JSONResponse(view(document, name))
        return JSONResponse(view(_result_from_document(document), name))

    async def errors(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": " ".join(str(exc).split())}, status_code=400)

    routes = [
        Route("/", page), Route("/api/info", info), Route("/api/tokens", tokens, methods=["POST"]),
        Route("/api/jobs", create_job, methods=["POST"]), Route("/api/jobs/{job}/events", events),
        Route("/api/jobs/{job}/cancel", cancel, methods=["POST"]), Route("/api/queue", queue),
        Route("/api/predict", predict, methods=["POST"]), Route("/api/study", study, methods=["POST"]),
        Route("/api/view", open_view, methods=["POST"]), Route("/api/image", image, methods=["POST"]),
        Route("/api/feature", feature, methods=["POST"]), Route("/api/dictionaries", dictionaries, methods=["POST"]),
    ]
    hosts = allowed_hosts or ["127.0.0.1", "localhost", "[::1]"]
    app = Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)],
                    exception_handlers={RequestError: errors, ValueError: errors, KeyError: errors},
                    lifespan=_closing(jobs))
    app.state.jobs = jobs
    return app


def _closing(jobs: JobQueue):
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        jobs.close()

    return lifespan


async def _json(request: Request) -> Mapping[str, Any]:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise RequestError("send the request body as JSON (Content-Type: application/json)")
    body = await request.json()
    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object")
    return body


def _result_from_document(document: Any):
    import json as _j
    import tempfile
    from pathlib import Path

    from ..results.result import Result

    if not isinstance(document, Mapping):
        raise RequestError("document must be a saved Result (JSON) or a graph with nodes and links")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "result.json"
        path.write_text(_j.dumps(document), encoding="utf-8")
        return Result.load(path)
