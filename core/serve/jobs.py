"""Model work in order, on one worker thread: hooks are installed on the one model per run, so two
runs must never overlap. A job records its events (``queued``, ``progress``, ``result``, ``error``,
``cancelled``) for any number of readers; cancelling a queued job drops it, cancelling a running one
sets a flag its work checks between forwards (:class:`Cancelled` ends it)."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["Cancelled", "Job", "JobQueue", "TERMINAL"]

logger = logging.getLogger(__name__)

TERMINAL = ("result", "error", "cancelled")
#: How many finished jobs are kept for late readers.
KEEP_FINISHED = 64


class Cancelled(Exception):
    """Raised inside a job's work when the job was cancelled."""


@dataclass
class Job:
    id: str
    kind: str
    work: Callable[["Job"], Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    state: str = "queued"  # queued, running, done, error, cancelled
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def emit(self, event: str, **data: Any) -> None:
        with self.changed:
            self.events.append({"event": event, **data})
            self.changed.notify_all()

    def check(self) -> None:
        """Raise :class:`Cancelled` if the job was cancelled (work calls this between steps)."""
        if self.cancel_requested.is_set():
            raise Cancelled(self.id)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "error", "cancelled")

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until the job ends; its last event."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.changed:
            while not self.finished:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"job {self.id} still {self.state}")
                self.changed.wait(left)
            return self.events[-1]


class JobQueue:
    """A FIFO of jobs and the one thread that runs them."""

    def __init__(self) -> None:
        self._queue: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}
        self._finished: deque[str] = deque()
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._running: Job | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="crosspatch-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, kind: str, work: Callable[[Job], Any]) -> Job:
        """Queue ``work(job)``; its return value becomes the ``result`` event's ``data``."""
        with self._lock:
            job = Job(f"{next(self._ids)}", kind, work)
            self._jobs[job.id] = job
            self._queue.append(job)
            job.emit("queued", position=len(self._queue) - 1 + (self._running is not None))
            self._lock.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False if there is no such job or it has ended."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.finished:
                return False
            job.cancel_requested.set()
            if job in self._queue:
                self._queue.remove(job)
                job.emit("cancelled")
                self._finish(job, "cancelled")
        return True

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"running": None if self._running is None else self._running.id,
                    "queued": [job.id for job in self._queue]}

    def close(self) -> None:
        with self._lock:
            self._stop = True
            for job in list(self._queue):
                job.cancel_requested.set()
            if self._running is not None:
                self._running.cancel_requested.set()
            self._lock.notify_all()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stop:
                    self._lock.wait()
                if self._stop:
                    return
                job = self._queue.popleft()
                self._running = job
                job.state = "running"
            job.emit("started")
            try:
                data = job.work(job)
            except Cancelled:
                state, event = "cancelled", {"event": "cancelled"}
            except Exception as exc:  # the person sees the error; the server keeps serving
                logger.debug("job %s failed", job.id, exc_info=True)
                state, event = "error", {"event": "error", "message": " ".join(str(exc).split()) or type(exc).__name__}
            else:
                state, event = "done", {"event": "result", "data": data}
            job.emit(**event)
            with self._lock:
                self._running = None
                self._finish(job, state)

    def _finish(self, job: Job, state: str) -> None:
        with job.changed:
            job.state = state
            job.changed.notify_all()
        self._finished.append(job.id)
        while len(self._finished) > KEEP_FINISHED:
            self._jobs.pop(self._finished.popleft(), None)
