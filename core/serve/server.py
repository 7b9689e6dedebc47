"""Starting the server: loopback by default; any other address only when asked for explicitly, with
a warning (the server runs the model for whoever reaches it, and has no accounts)."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import warnings
from dataclasses import dataclass
from typing import Any

__all__ = ["RemoteBindingError", "RunningServer", "allowed_hosts", "is_loopback", "load_session", "serve",
           "start_in_thread", "task_example", "task_examples"]

logger = logging.getLogger(__name__)

REMOTE_WARNING = ("crosspatch serve is listening on {host}: anyone who can reach this address can run the model "
                  "and read what you type; there are no accounts. Use it on a network you trust, or keep the "
                  "default 127.0.0.1 and tunnel (ssh -L).")


class RemoteBindingError(ValueError):
    """A non-loopback address without the explicit permission to listen there."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str) -> list[str]:
    """``Host`` header names the app accepts: loopback names, or any name when listening elsewhere."""
    return ["127.0.0.1", "localhost", "[::1]"] if is_loopback(host) else ["*"]


def check_host(host: str, allow_remote: bool) -> None:
    if is_loopback(host):
        return
    if not allow_remote:
        raise RemoteBindingError(
            f"--host {host} is not a loopback address; the server would run the model for anyone who reaches it. "
            f"Pass --allow-remote to listen there anyway, or keep the default 127.0.0.1"
        )
    warnings.warn(REMOTE_WARNING.format(host=host), UserWarning, stacklevel=2)


def load_session(model: str, *, seed: int = 0, device: Any = None, dtype: Any = None, features: Any = ()):
    """A zoo model or a checkpoint folder as a serving session: a VAE or CLIP-style model gets the image
    panels (on images of the ``shapes`` task), a text model the prompt page with the feature picker
    (``features``: SAE or transcoder folders, plus the zoo's transcoders of the model already built)."""
    from ..zoo.sources import find_model, wrap
    from ..zoo.store import ZooModel
    from .features import load_dictionary, zoo_dictionaries
    from .image_session import CLIPSession, VAESession, model_kind
    from .session import Session

    found = find_model(model)
    m = wrap(model, seed=seed, device=device, dtype=dtype)
    kind = model_kind(m)
    if kind == "vae":
        session = VAESession(m, model, model_seed=seed)
    elif kind == "clip":
        session = CLIPSession(m, model, model_seed=seed)
    else:
        dictionaries = [*zoo_dictionaries(model), *(load_dictionary(path) for path in features)]
        session = Session(m, model, task_examples(found.task) if isinstance(found, ZooModel) and found.task else None,
                          dictionaries, model_seed=seed)
    if dtype is not None:  # a saved study loads the model the same way
        session.dtype = str(dtype).removeprefix("torch.")
    return session


def task_example(task_name: str) -> dict[str, str] | None:
    """The first test pair of a text task, as the page's starting prompts (None for other tasks)."""
    pairs = task_examples(task_name, 1)
    return pairs[0] if pairs else None


def task_examples(task_name: str, n: int = 8) -> list[dict[str, str]]:
    """``n`` test pairs of a text task (seed 0) for the page's pair picker; none for other tasks."""
    from ..zoo.tasks import get_task

    task = get_task(task_name)
    if getattr(task, "modality", "text") != "text":
        return []
    out = []
    for pair in task.pairs(n, seed=0, split="test"):
        prefix = getattr(pair, "answer_prefix", " ")
        out.append({"clean": pair.clean, "corrupt": pair.corrupt, "answer": prefix + pair.answer.strip(),
                    "distractor": prefix + pair.distractor.strip()})
    return out


def serve(session: Any, host: str = "127.0.0.1", port: int = 8765, *, allow_remote: bool = False) -> None:
    """Serve ``session`` until interrupted."""
    import uvicorn

    from .app import create_app

    check_host(host, allow_remote)
    app = create_app(session, allowed_hosts=allowed_hosts(host))
    uvicorn.run(app, host=host, port=port, log_level="warning")


@dataclass
class RunningServer:
    url: str
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def start_in_thread(session: Any, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Serve ``session`` from a background thread (port 0: a free one); for tests and notebooks."""
    import uvicorn

    from .app import create_app

    check_host(host, allow_remote=False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(create_app(session, allowed_hosts=allowed_hosts(host)), log_level="warning",
                            lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="crosspatch-serve", daemon=True)
    thread.start()
    for _ in range(400):
        if server.started:
            break
        threading.Event().wait(0.025)
    else:
        raise RuntimeError("the server did not start within 10 s")
    return RunningServer(f"http://{host}:{sock.getsockname()[1]}", server, thread)
