"""Speed-up of the Ray executor: one activation-patching sweep run locally, on one Ray actor and on two.

    .venv/bin/python benchmarks/ray_scaling.py            # needs `pip install "crosspatch[ray]"`

The "model loaded" rows keep the actors between studies (``keep_actors=True``): the speed-up of
the sweep itself, without actor start-up. Every configuration gets the same number of torch threads per worker (``--threads``, default 1) so
the comparison is of workers, not of intra-op threads. Ray runs a local cluster on this machine
(loopback only) with ``--cpus`` CPUs. Each timing is one whole study as a user sees it: actor
start-up and model loading included (the Ray cluster itself is started once, outside the timings).
Prints a markdown table (median of ``--repeats`` runs) and checks the three Results agree.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import gpt2_setup, size_arguments  # noqa: E402

import crosspatch as cp  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size_arguments(parser, seq=48, prompts=32)
    parser.add_argument("--sites", default="head_out.*[head=*,pos=*]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (and for the local run)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.set_defaults(repeats=3)
    args = parser.parse_args()
    os.environ.setdefault("CROSSPATCH_PROGRESS", "0")
    # Ray starts its workers at niceness 15: on a machine shared with other jobs they would yield the
    # CPU and the comparison with the in-process run (niceness 0) would measure the other jobs.
    os.environ.setdefault("RAY_worker_niceness", "0")
    logging.basicConfig(level=logging.WARNING)

    import ray

    from crosspatch.scale.ray_executor import RayExecutor, release_actors

    torch.set_num_threads(args.threads)
    s = gpt2_setup(args.layers, args.d_model, args.seq, args.prompts)
    n_sites = len(s.m.catalog.expand(args.sites, {"pos": args.seq}))
    study = dict(clean=s.clean, corrupt=s.corrupt, sites=args.sites, metric=s.metric, normalize=True)
    # The executor starts the local cluster on loopback only (a bare ray.init would expose the outward address).
    RayExecutor(init_options=dict(num_cpus=args.cpus, log_to_driver=False)).connect()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def ray_run(actors: int, keep: bool = False):
            ex = RayExecutor(actors=actors, num_cpus_per_actor=args.threads, checkpoint_dir=tmp, keep_actors=keep)
            return lambda: cp.activation_patching(s.model, executor=ex, **study)

        configs = [("local (in-process)", lambda: cp.activation_patching(s.m, **study), False)]
        configs += [("ray, 1 actor", ray_run(1), False), ("ray, 2 actors", ray_run(2), False)]
        # keep_actors: the model stays loaded between studies; one untimed run loads it first.
        configs += [("ray, 1 actor, model loaded", ray_run(1, True), True),
                    ("ray, 2 actors, model loaded", ray_run(2, True), True)]
        results = []
        for name, fn, warm_up in configs:
            if warm_up:
                release_actors()
                fn()
            median, times, result = timed(fn, args.repeats)
            results.append(result)
            rows.append((name, median, times))
            print(f"{name}: median {median:.2f} s over {args.repeats} runs ({', '.join(f'{t:.2f}' for t in times)})",
                  file=sys.stderr, flush=True)
    release_actors()
    ray.shutdown()
    diff = max(float(np.abs(r.values - results[0].values).max()) for r in results[1:])
    ran = results[0].metadata.get("sites_run", n_sites)
    print(f"\nactivation patching, {args.sites}: {n_sites} sites ({ran} run, the rest unchanged) x {args.prompts} "
          f"prompts, GPT-2 {args.layers} layers d_model {args.d_model}, seq {args.seq}; {args.threads} torch "
          f"thread(s) per worker, {os.cpu_count()} cores; median of {args.repeats}\n")
    print("| run | median s (runs) | speed-up vs local | speed-up vs 1 actor |")
    print("|---|---|---|---|")
    for i, (name, median, times) in enumerate(rows):
        one_actor = rows[3][1] if "loaded" in name else rows[1][1]
        shown = ", ".join(f"{t:.1f}" for t in times)
        vs_one = "" if i == 0 else f"{one_actor / median:.2f}x"
        print(f"| {name} | {median:.2f} ({shown}) | {rows[0][1] / median:.2f}x | {vs_one} |")
    print(f"\nlargest |ray - local| over all sites: {diff:.2e}")


if __name__ == "__main__":
    main()
