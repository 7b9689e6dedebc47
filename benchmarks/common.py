"""What the single-library benchmarks share: a median timer, the peak resident memory of a call, and one
random-init GPT-2 with a clean/corrupt pair that differs in the middle token."""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import crosspatch as cp


def median_time(fn, repeats: int, clock=time.perf_counter) -> float:
    """Median of ``repeats`` timed calls after a warm-up; ``clock=time.process_time`` measures the process's
    CPU time, which other jobs on a shared machine do not inflate (with one torch thread)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def rss_peak(fn):
    """``(peak extra resident bytes, result)`` of one call of ``fn`` (Linux): after ``gc`` and ``malloc_trim``
    the process's peak RSS is reset (``/proc/self/clear_refs`` with ``5``); the peak reached during the call
    minus the RSS before it."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS:")
    out = fn()
    return _status("VmHWM:") - before, out


def paired(fns: dict, repeats: int, clock=time.process_time) -> dict:
    """Median times of calls interleaved round by round (after one warm-up each), so a load spike or a
    drift of the machine's speed hits all of them alike."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = clock()
            fn()
            times[k].append(clock() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def size_arguments(parser: argparse.ArgumentParser, *, seq: int, prompts: int, repeats: int = 5) -> None:
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seq", type=int, default=seq)
    parser.add_argument("--prompts", type=int, default=prompts)
    parser.add_argument("--repeats", type=int, default=repeats)


@dataclass
class Setup:
    model: GPT2LMHeadModel
    m: cp.WrappedModel
    clean: torch.Tensor
    corrupt: torch.Tensor
    metric: cp.metrics.Metric


def gpt2_setup(layers: int, d_model: int, seq: int, prompts: int, heads: int = 8) -> Setup:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_head=heads, n_embd=d_model, vocab_size=1000, n_positions=128)
    model = GPT2LMHeadModel(config).eval()
    clean = torch.randint(0, 1000, (prompts, seq))
    corrupt = clean.clone()
    corrupt[:, seq // 2] = (corrupt[:, seq // 2] + 1) % 1000
    metric = cp.metrics.logit_diff(clean[:, -1], (clean[:, -1] + 1) % 1000)
    return Setup(model, cp.wrap(model), clean, corrupt, metric)
