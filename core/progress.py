"""Progress bars for long work: on by default, off with ``progress=False`` or ``CROSSPATCH_PROGRESS=0``."""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress_bar(items: Iterable[T], enabled: bool | None = None, **kwargs) -> Iterable[T]:
    if enabled is None:
        enabled = os.environ.get("CROSSPATCH_PROGRESS", "1") != "0"
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, leave=False, **kwargs)
