"""A tiny GPT-2 checkpoint (the IOI word tokenizer, untrained) served by ``crosspatch serve`` from a
background thread, for the server's tests with and without a browser."""

from __future__ import annotations

import types


def serve_tiny_model(tmp_path_factory):
    """Yield ``(running server, session)``; the server stops when the generator closes."""
    from fake_zoo import build

    from crosspatch.serve.server import start_in_thread, task_examples
    from crosspatch.serve.session import Session
    from crosspatch.zoo.sources import wrap

    folder = tmp_path_factory.mktemp("serve") / "ckpt"
    build(folder, types.SimpleNamespace(seed=0))
    session = Session(wrap(str(folder)), str(folder), task_examples("ioi", 4))
    server = start_in_thread(session)
    try:
        yield server, session
    finally:
        server.stop()
