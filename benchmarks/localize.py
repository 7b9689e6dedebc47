"""Coarse-to-fine localisation (``cp.localize``) against the exhaustive activation-patching sweep and
against AtP and AtP* alone: recall of the exhaustive sweep's top-k at the (component, position) level
(``head_out.*[pos=*,head=*]`` and ``mlp_out.*[pos=*]`` ranked together by |effect|) and the share of
the sweep's forwards spent, on the zoo models and on random GPT-2s with planted heads.

Forwards are counted as crosspatch.methods.localize counts them (rows / prompts, a backward as two):
the exhaustive sweep is its clean and corrupt runs plus one per site it runs (sites before the corrupted
position are not run: their effect is 0 by construction). The same runs are also counted as engine calls
and costed by the engine's batching model (:class:`Count`), since a CPU sweep batches sites into shared
forwards; the profile splits both counts by level and part (estimates, baselines, each level's sites).
A planted model is a GPT-2 of the given
geometry with seeded random weights in which three heads (distinct layers, drawn by the seed) have their
output projection scaled by 8, so they dominate the logit difference; ``saturated`` also scales their
query weights by 30, so their attention saturates and AtP's gradients through it go flat (its blind
spot). The metric is each prompt's logit difference between the tokens the corruption raises most and
least at the last position; values are normalised by the clean-corrupt gap.

    python benchmarks/localize.py                       # small, gpt2 and one-prompt small1, zoo models: localize.md
    python benchmarks/localize.py --geometries small --seeds 0 1 --out /tmp/localize.md
    python benchmarks/localize.py --render              # localize.md again from the last run's rows
    python benchmarks/localize.py --geometries small --seeds 0 --zoo --tracr --methods localize --out /tmp/l.md
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import crosspatch as cp
from crosspatch.adapters.transformers.tiny import tiny_model
from crosspatch.methods.attribution import attribution_patching
from crosspatch.engine.resume import FORWARD_OVERHEAD_TOKENS
from crosspatch.methods.localize import atp_forwards, level_patterns, localize
from crosspatch.methods.localize_verify import Verifier
from crosspatch.zoo import store as zoo

HERE = Path(__file__).resolve().parent
FINE = level_patterns("component_pos")  # head_out.*[pos=*,head=*], mlp_out.*[pos=*]
GEOMETRIES = {  # layers, heads, d_model, tokens, prompts
    "small": (6, 8, 128, 24, 8),
    "gpt2": (12, 12, 768, 24, 8),  # GPT-2 small's depth, heads and width (vocabulary 512)
    "small1": (6, 8, 128, 24, 1),  # one prompt: the sweep's and the verification's later sites join at their block
}
PLANTED = 3


@dataclass
class Case:
    name: str
    group: str
    model: cp.WrappedModel
    clean: object
    corrupt: object
    metric: object
    planted: list[tuple[int, int]]
    resample: Callable[[], "Case"] | None = None  # the same model on a second draw of prompts


def planted_case(geometry: str, seed: int, saturated: bool) -> Case:
    layers, heads, width, tokens, prompts = GEOMETRIES[geometry]
    model = tiny_model("gpt2", seed=seed, n_layer=layers, n_head=heads, n_embd=width, n_inner=4 * width,
                       vocab_size=512, n_positions=128)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(layers, PLANTED, replace=False).tolist())
    planted = [(int(layer), int(rng.integers(heads))) for layer in chosen]
    d_head = width // heads
    with torch.no_grad():
        for layer, head in planted:
            attn = model.transformer.h[layer].attn
            attn.c_proj.weight[head * d_head : (head + 1) * d_head] *= 8.0
            if saturated:
                attn.c_attn.weight[:, head * d_head : (head + 1) * d_head] *= 30.0
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 512, (prompts, tokens), generator=g)
    corrupt = clean.clone()
    corrupt[:, tokens // 3] = (clean[:, tokens // 3] + torch.randint(1, 512, (prompts,), generator=g)) % 512
    with torch.no_grad():
        moved = model(clean).logits[:, -1] - model(corrupt).logits[:, -1]
    metric = cp.metrics.logit_diff(moved.argmax(-1), moved.argmin(-1))
    variant = "saturated" if saturated else "plain"
    return Case(f"{geometry}-{variant}-s{seed}", f"{geometry} {variant}", cp.wrap(model), clean, corrupt, metric,
                planted)


def zoo_case(name: str, prompts: int = 16, seed: int = 0, model: cp.WrappedModel | None = None) -> Case:
    """A zoo model on ``prompts`` pairs of its task drawn with ``seed``; its ``resample`` draws seed + 1."""
    m = model or cp.wrap(name)
    pairs = cp.tasks.get_task(zoo.get(name).task).pairs(prompts, seed=seed)
    prefix = pairs[0].answer_prefix
    metric = cp.metrics.logit_diff([prefix + p.answer for p in pairs], [prefix + p.distractor for p in pairs])
    return Case(name if seed == 0 else f"{name}-prompts{seed}", name, m, [p.clean for p in pairs],
                [p.corrupt for p in pairs], metric, [], lambda: zoo_case(name, prompts, seed + 1, m))


def tracr_case(program: str, prompts: int = 16) -> Case:
    """A tracr-compiled program (``tests/data/tracr``) on its longest reference inputs, clean and corrupt
    two seeded draws of them, scored by the log-probability of the clean run's output (``output_score``)."""
    from crosspatch.adapters.tracr import TracrAdapter, load, output_score

    data = HERE.parent / "tests" / "data" / "tracr"
    model = load(data, program)
    refs = [r["ids"] for r in json.loads((data / f"{program}.json").read_text())["reference"]]
    longest = max(len(r) for r in refs)
    ids = torch.tensor([r for r in refs if len(r) == longest])
    g = torch.Generator().manual_seed(0)
    clean, corrupt = (ids[torch.randperm(len(ids), generator=g)[:prompts]] for _ in range(2))
    return Case(f"tracr-{program}", f"tracr {program}", cp.wrap(model, TracrAdapter()), clean, corrupt,
                output_score(model.categorical), [])


# The modules whose engine calls are counted: every model run of the sweep, AtP* and localize goes through one.
COUNTED = ["crosspatch.methods.activation_patching", "crosspatch.methods.attribution",
           "crosspatch.methods.shared_prefix", "crosspatch.methods.localize_verify"]
ESTIMATES = ("crosspatch.methods.attribution", "crosspatch.methods.shared_prefix")  # AtP's gradient and source runs


@dataclass
class Count:
    """The engine calls a method made: how many, and their cost under the engine's own cost model
    (``crosspatch.engine.resume``: blocks run x (``FORWARD_OVERHEAD_TOKENS`` + token rows computed), a call
    with gradients three times, its backward counted as two), in units of one whole forward of the prompts."""

    calls: int = 0
    units: float = 0.0
    whole: float = 1.0  # the cost of one whole forward of the n prompts
    phase: str | None = None  # set while localize's verifier patches a round: the level of its first site
    parts: dict = field(default_factory=dict)  # units by part: "estimates", "baselines", or a level

    @property
    def model_forwards(self) -> float:
        return self.units / self.whole

    def part_forwards(self) -> dict[str, float]:
        return {part: units / self.whole for part, units in self.parts.items()}


def site_level(site: str) -> str:
    """The first level (start="components") that lists ``site``: the level a verified site is charged to."""
    family = site.split(".")[0]
    if family in ("attn_out", "mlp_out"):
        return "layer_pos" if "[pos=" in site else "layer"
    return "component_pos" if "pos=" in site else "component"


@contextmanager
def counting(case: Case):
    """Count every engine call made inside the block (see :class:`Count`)."""
    m = case.model
    layers = m.catalog.family("attn_out").layers if "attn_out" in m.catalog else m.catalog.family("resid_pre").layers
    ids = _ids(m.prepare(case.corrupt))
    n, length = ids.shape
    count = Count(whole=layers * (FORWARD_OVERHEAD_TOKENS + n * length))
    patched = []
    for name in COUNTED:
        module = importlib.import_module(name)
        real = module.execute

        def wrapper(module_, adapter, catalog, inputs, *args, _real=real, _name=name, **kwargs):
            rows = _ids(inputs).shape[0]
            resume, grad = kwargs.get("resume"), kwargs.get("grad", False)
            blocks = layers - (resume.layer if resume is not None else 0)
            positions = length - (resume.pos if resume is not None else 0)
            units = (3 if grad else 1) * call_units(rows, blocks, positions, layers, resume)
            count.calls += 1
            count.units += units
            part = count.phase or ("estimates" if _name in ESTIMATES else "baselines")
            count.parts[part] = count.parts.get(part, 0.0) + units
            return _real(module_, adapter, catalog, inputs, *args, **kwargs)

        module.execute = wrapper
        patched.append((module, real))
    real_patch = Verifier.patch

    def patch(self, sites, _real=real_patch):
        count.phase = site_level(str(sites[0])) if len(sites) else None
        try:
            return _real(self, sites)
        finally:
            count.phase = None

    Verifier.patch = patch
    try:
        yield count
    finally:
        Verifier.patch = real_patch
        for module, real in patched:
            module.execute = real


def call_units(rows: int, blocks: int, positions: int, layers: int, resume) -> int:
    """One engine call under the cost model: every block it runs costs the overhead plus its token rows; rows that
    join the run part-way (``Resume.joins``, one-prompt sweeps) count only from their own block on."""
    joins = resume.joins if resume is not None else ()
    joined = resume.joined if resume is not None else 0
    units = blocks * (FORWARD_OVERHEAD_TOKENS + (rows - joined) * positions)
    for key, copies in joins:
        units += copies * resume.prefix.rows * positions * (layers - int(key.split(".")[1]))
    return units


def _ids(inputs) -> torch.Tensor:
    return next(v for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() == 2)


def exhaustive(case: Case, cache: Path) -> dict:
    """Every (component, position) site patched, as ``activation_patching`` runs a sweep: values by site,
    forwards (counted as localize counts them), engine calls, cost-model forwards, seconds (cached by case)."""
    path = cache / f"{case.name}.v2.json"
    if path.exists():
        return json.loads(path.read_text())
    start = time.perf_counter()
    with counting(case) as count:  # one sweep over both patterns: one pair of baseline runs, batched together
        res = cp.activation_patching(case.model, case.clean, case.corrupt, FINE, case.metric, normalize=True,
                                     progress=False)
    values = {str(site): float(v) for site, v in zip(res.coords["site"], res.values.reshape(-1))}
    saved = {"values": values, "forwards": 2 + int(res.metadata["sites_run"]), "seconds": time.perf_counter() - start,
             "calls": count.calls, "model_forwards": count.model_forwards}
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved))
    return saved


def top(values: dict[str, float], k: int) -> list[str]:
    sites = list(values)
    order = np.argsort(-np.abs(np.array([values[s] for s in sites])), kind="stable")
    return [sites[i] for i in order[:k]]


def recall(truth: dict[str, float], found: dict[str, float], k: int) -> float:
    return len(set(top(truth, k)) & set(top(found, k))) / k


def recall_above(truth: dict[str, float], found: dict[str, float], k: int, tol: float) -> float | None:
    """Recall@k of the sweep's top-k sites whose |effect| reaches ``tol`` (what localize promises with ``tol``);
    None when none does."""
    promised = [s for s in top(truth, k) if abs(truth[s]) >= tol]
    return len(set(promised) & set(top(found, k))) / len(promised) if promised else None


def fine_values(loc) -> tuple[dict[str, float], set[str]]:
    """The (component, position) level's values (exact where verified, else the estimate) and the verified sites."""
    res = loc.levels["component_pos"]
    values = dict(zip(res.coords["site"], res.values.tolist()))
    return values, {s for s, f in zip(res.coords["site"], res.metadata["verified"]) if f}


def planted_found(verified: set[str], truth: dict[str, float], planted: list[tuple[int, int]]) -> tuple[int, str]:
    """How many planted heads have their strongest (component, position) site (by the exhaustive sweep)
    verified, and those sites' ranks in the exhaustive sweep."""
    order = {site: i + 1 for i, site in enumerate(top(truth, len(truth)))}
    found, ranks = 0, []
    for layer, head in planted:
        sites = [s for s in truth if s.startswith(f"head_out.{layer}[") and s.endswith(f",head={head}]")]
        best = max(sites, key=lambda s: abs(truth[s]))
        found += best in verified
        ranks.append(str(order[best]))
    return found, " ".join(ranks)


def fixed_cost(loc) -> int:
    """What localize spends before it verifies anything the estimates choose: the estimates (AtP or AtP*), the
    clean and corrupt runs, and the anchor (every layer-level site, always verified)."""
    cost = loc.metadata["cost"]
    anchor = loc.levels["layer"].metadata["verified_count"] if "layer" in loc.levels else 0
    return cost["attribution"] + cost["baseline_runs"] + anchor


#: The methods compared with the sweep: AtP alone (plain, and AtP* with GradDrop), AtP verified by
#: localize's rule at the finest level only, localize (plain AtP, the default) and localize ranking by AtP*.
METHODS = {
    "AtP": {"estimates_only": True, "grad_drop": False},
    "AtP*": {"estimates_only": True, "grad_drop": True},
    "AtP + verify": {"levels": ["component_pos"]},
    "localize": {},
    "localize (AtP*)": {"estimator": "atp*"},
}
PARTS = ["estimates", "baselines", "layer", "layer_pos", "component", "component_pos"]


def run_case(case: Case, ks: list[int], tol: float, cache: Path, methods: list[str]) -> list[dict]:
    full = exhaustive(case, cache)
    truth = full["values"]
    rows = []
    base = {"case": case.name, "group": case.group, "exhaustive_forwards": full["forwards"],
            "exhaustive_seconds": full["seconds"], "exhaustive_calls": full["calls"],
            "exhaustive_model_forwards": full["model_forwards"], "planted_ranks": None,
            "above_tol": int(sum(abs(v) >= tol for v in truth.values()))}
    # the sweep itself on a second draw of prompts: how much of its top k is the model's, not the sample's
    again = exhaustive(case.resample(), cache)["values"] if case.resample else None
    alone = {}
    for method in [m for m in methods if METHODS[m].get("estimates_only")]:
        start = time.perf_counter()
        with counting(case) as count:
            atp = attribution_patching(case.model, case.clean, case.corrupt, FINE, case.metric,
                                       grad_drop=METHODS[method]["grad_drop"], normalize=True)
        alone[method] = (atp, count, time.perf_counter() - start)
    for k in ks:
        base["resample_recall"] = recall(truth, again, k) if again else None
        for method, (atp, count, seconds) in alone.items():
            estimates = dict(zip(atp.coords["site"], atp.values.tolist()))
            rows.append({**base, "method": method, "k": k, "recall": recall(truth, estimates, k),
                         "recall_above_tol": recall_above(truth, estimates, k, tol),
                         "verified_recall": 0.0, "forwards": atp_forwards(atp), "seconds": seconds, "planted": None,
                         "calls": count.calls, "model_forwards": count.model_forwards, "fixed": atp_forwards(atp),
                         "parts": count.part_forwards(), "level_forwards": {}})
        for method in [m for m in methods if not METHODS[m].get("estimates_only")]:
            start = time.perf_counter()
            with counting(case) as count_loc:
                loc = localize(case.model, case.clean, case.corrupt, case.metric, tol=tol, k=k, normalize=True,
                               progress=False, **METHODS[method])
            seconds = time.perf_counter() - start
            values, verified = fine_values(loc)
            for site in verified:  # the oracle: verified values are the sweep's own, within float rounding
                # (batched differently: measured up to 1.2e-6 of the gap with GPT-2's width and saturated heads)
                assert abs(values[site] - truth[site]) <= 1e-5, (case.name, site, values[site], truth[site])
            # localize's own count of the sweep it spared, made without running it, is the sweep's measured count
            spared = loc.metadata["sweep_forwards"]
            assert spared in (full["forwards"], None), (case.name, spared)
            found, ranks = planted_found(verified, truth, case.planted) if case.planted else (None, None)
            rows.append({**base, "method": method, "k": k, "recall": recall(truth, values, k),
                         "recall_above_tol": recall_above(truth, values, k, tol),
                         "verified_recall": len(set(top(truth, k)) & verified) / k, "forwards": loc.forwards,
                         "seconds": seconds, "planted": found, "planted_ranks": ranks, "calls": count_loc.calls,
                         "model_forwards": count_loc.model_forwards, "fixed": fixed_cost(loc),
                         "parts": count_loc.part_forwards(),
                         "level_forwards": {lv: r.metadata["forwards"] for lv, r in loc.levels.items()},
                         "level_verified": {lv: r.metadata["patched_count"] for lv, r in loc.levels.items()},
                         "level_rests": {lv: r.metadata["rest_test_count"] for lv, r in loc.levels.items()}})
    for row in rows:
        row["fraction"] = row["forwards"] / row["exhaustive_forwards"]
        row["model_fraction"] = row["model_forwards"] / row["exhaustive_model_forwards"]
        row["calls_fraction"] = row["calls"] / row["exhaustive_calls"]
        row["seconds_fraction"] = row["seconds"] / row["exhaustive_seconds"]
        row["budget"] = max(0.10 * row["exhaustive_forwards"], row["fixed"])
    return rows


def table(rows: list[dict], keys: list[str], heads: list[str]) -> str:
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if v is None:
        return "-"
    return str(v)


def summary(rows: list[dict]) -> list[dict]:
    out = []
    groups = list(dict.fromkeys((r["group"], r["method"], r["k"]) for r in rows))
    for group, method, k in groups:
        sel = [r for r in rows if (r["group"], r["method"], r["k"]) == (group, method, k)]
        planted = [r["planted"] for r in sel if r["planted"] is not None]
        total = PLANTED * len(planted)
        out.append({
            "group": group, "method": method, "k": k, "cases": len(sel),
            "recall": float(np.mean([r["recall"] for r in sel])), "min_recall": float(min(r["recall"] for r in sel)),
            "verified_recall": float(np.mean([r["verified_recall"] for r in sel])),
            "fraction": float(np.mean([r["fraction"] for r in sel])),
            "max_fraction": float(max(r["fraction"] for r in sel)),
            "model_fraction": float(np.mean([r["model_fraction"] for r in sel])),
            "calls_fraction": float(np.mean([r["calls_fraction"] for r in sel])),
            "seconds_fraction": float(np.mean([r["seconds_fraction"] for r in sel])),
            "planted": f"{sum(planted)}/{total}" if planted else None,
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometries", nargs="*", default=["small", "gpt2", "small1"], choices=list(GEOMETRIES))
    parser.add_argument("--seeds", nargs="*", type=int, default=list(range(12)))
    parser.add_argument("--gpt2-seeds", nargs="*", type=int, default=[0, 1])
    parser.add_argument("--small1-seeds", nargs="*", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--zoo", nargs="*", default=["ioi-gpt2-tiny", "ioi-gpt2-6x16"])
    parser.add_argument("--tracr", nargs="*", default=["reverse", "frac_prevs", "hist"])
    parser.add_argument("--ks", nargs="*", type=int, default=[5, 10, 20])
    parser.add_argument("--tracr-ks", nargs="*", type=int, default=[3, 5])
    parser.add_argument("--tol", type=float, default=0.01)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "crosspatch" / "bench-localize")
    parser.add_argument("--out", type=Path, default=HERE / "localize.md")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--render", action="store_true", help="rewrite --out from the last run's rows in --cache")
    parser.add_argument("--add-rows", type=Path, default=None,
                        help="rows.json of an earlier run (the GPT-2 geometry run on its own), written with this one's")
    parser.add_argument("--no-verify-joins", action="store_true",
                        help="localize's verification without joined rows (as before; the sweep still joins)")
    args = parser.parse_args()
    if args.no_verify_joins:
        importlib.import_module("crosspatch.methods.localize_verify").JOIN_ROWS = False
    if args.render:
        rows = json.loads((args.cache / "rows.json").read_text())
        write(json.loads(args.add_rows.read_text()) + rows if args.add_rows is not None else rows, args)
        return
    torch.set_num_threads(1)

    rows: list[dict] = []
    cases = [lambda name=name: zoo_case(name) for name in args.zoo]
    cases += [lambda p=program: tracr_case(p) for program in args.tracr]
    for geometry in args.geometries:
        seeds = {"gpt2": args.gpt2_seeds, "small1": args.small1_seeds}.get(geometry, args.seeds)
        for seed in seeds:
            for saturated in (False, True):
                cases.append(lambda g=geometry, s=seed, sat=saturated: planted_case(g, s, sat))
    for make in cases:
        case = make()
        found = run_case(case, args.tracr_ks if case.name.startswith("tracr") else args.ks, args.tol, args.cache,
                         args.methods)
        rows += found
        for r in found:
            print(f"{r['case']:>24} {r['method']:>16} k={r['k']:<3} recall {r['recall']:.2f} (verified "
                  f"{r['verified_recall']:.2f}) forwards {r['forwards']}/{r['exhaustive_forwards']} = "
                  f"{r['fraction']:.3f}, cost model {r['model_fraction']:.3f}", flush=True)
    if args.add_rows is not None:
        rows = json.loads(args.add_rows.read_text()) + rows
    write(rows, args)


def targets(rows: list[dict]) -> list[dict]:
    """Per group of cases and k, whether localize met the targets: recall@k >= 0.95 and forwards <= 10 % of
    the exhaustive sweep's, on average over the cases and in every case."""
    out = []
    for r in summary([r for r in rows if r["method"] == "localize"]):
        sel = [x for x in rows if x["method"] == "localize" and x["group"] == r["group"] and x["k"] == r["k"]]
        fixed = [x["fixed"] / x["exhaustive_forwards"] for x in sel]
        out.append({
            "group": r["group"], "k": r["k"], "cases": r["cases"],
            "recall": _verdict(r["recall"] >= 0.95, sum(x["recall"] >= 0.95 for x in sel), len(sel)),
            "recall_above_tol": _above_tol_verdict(sel),
            "resample_recall": _mean_or_dash([x.get("resample_recall") for x in sel]),
            "above_tol": _mean_or_dash([x.get("above_tol") for x in sel], "{:.0f}"),
            "fraction": _verdict(r["fraction"] <= 0.10, sum(x["fraction"] <= 0.10 for x in sel), len(sel)),
            "model_fraction": _verdict(r["model_fraction"] <= 0.10, sum(x["model_fraction"] <= 0.10 for x in sel),
                                       len(sel)),
            "fixed_model": f"{np.mean([_fixed_model(x) for x in sel]):.1%}",
            "fixed": f"{np.mean(fixed):.1%}",
            "budget": _verdict(np.mean([x["forwards"] for x in sel]) <= np.mean([x["budget"] for x in sel]),
                               sum(x["forwards"] <= x["budget"] for x in sel), len(sel)),
        })
    return out


def _above_tol_verdict(sel: list[dict]) -> str:
    """Recall@k of the sites at or above tol: met on average and in how many cases (``-`` where no case has one)."""
    got = [x["recall_above_tol"] for x in sel if x.get("recall_above_tol") is not None]
    return _verdict(np.mean(got) >= 0.95, sum(g >= 0.95 for g in got), len(got)) if got else "-"


def _mean_or_dash(values: list, fmt: str = "{:.2f}") -> str:
    got = [v for v in values if v is not None]
    return fmt.format(np.mean(got)) if got else "-"


def _fixed_model(row: dict) -> float:
    """The fixed part in cost-model forwards, as a share of the sweep's: estimates, baselines and the anchor."""
    parts = row["parts"]
    return sum(parts.get(p, 0.0) for p in ("estimates", "baselines", "layer")) / row["exhaustive_model_forwards"]


def profile(rows: list[dict]) -> list[dict]:
    """Per group, localize method and k: mean forwards by level and cost-model forwards by part, as shares of
    the sweep's, and the mean number of sites verified per level."""
    out = []
    sel_rows = [r for r in rows if r.get("level_forwards")]
    for group, method, k in dict.fromkeys((r["group"], r["method"], r["k"]) for r in sel_rows):
        sel = [r for r in sel_rows if (r["group"], r["method"], r["k"]) == (group, method, k)]
        row = {"group": group, "method": method, "k": k}
        for lv in PARTS[2:]:
            row[f"fwd_{lv}"] = _pct(np.mean([r["level_forwards"].get(lv, 0) / r["exhaustive_forwards"] for r in sel]))
        for part in PARTS:
            row[f"cm_{part}"] = _pct(np.mean([r["parts"].get(part, 0.0) / r["exhaustive_model_forwards"]
                                              for r in sel]))
        row["verified"] = " / ".join(f"{np.mean([r['level_verified'].get(lv, 0) for r in sel]):.0f}"
                                     for lv in PARTS[2:])
        row["rests"] = " / ".join(f"{np.mean([r.get('level_rests', {}).get(lv, 0) for r in sel]):.1f}"
                                  for lv in PARTS[2:])
        out.append(row)
    return out


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def _verdict(mean_ok: bool, cases_ok: int, cases: int) -> str:
    return f"{'met' if mean_ok else 'missed'} on average; {cases_ok}/{cases} cases"


def write(rows: list[dict], args) -> None:
    keys = ["group", "method", "k", "cases", "recall", "min_recall", "verified_recall", "fraction", "max_fraction",
            "model_fraction", "calls_fraction", "seconds_fraction", "planted"]
    heads = ["models", "method", "k", "cases", "recall@k (mean)", "recall@k (min)", "verified share of top-k",
             "forwards / exhaustive (mean)", "(max)", "cost-model forwards / exhaustive", "engine calls / exhaustive",
             "seconds / exhaustive", "planted heads found"]
    detail_keys = ["case", "method", "k", "recall", "verified_recall", "forwards", "exhaustive_forwards", "fraction",
                   "fixed", "model_fraction", "calls", "exhaustive_calls", "seconds", "exhaustive_seconds", "planted",
                   "planted_ranks"]
    detail_heads = ["case", "method", "k", "recall@k", "verified share", "forwards", "exhaustive", "fraction",
                    "fixed part", "cost-model fraction", "calls", "exhaustive calls", "seconds", "exhaustive seconds",
                    "planted found", "their ranks"]
    text = [
        "# Coarse-to-fine localisation: recall and forwards",
        "",
        f"`python benchmarks/localize.py` (tol {args.tol}; `cp.localize(..., tol, k)` with the same k as the "
        "recall). Methods: `AtP` and `AtP*` alone (one `attribution_patching` call over the (component, "
        "position) sites, plain and with GradDrop); `AtP + verify`, `localize(levels=['component_pos'])`, the "
        "same rule without the coarser levels; `localize`, the default (ranking by plain AtP); `localize (AtP*)`, "
        "`localize(estimator='atp*')`, the same rule ranking by AtP* (GradDrop), which was the default before. "
        "Recall@k: the share of the exhaustive sweep's k largest |effects| at the (component, position) "
        "level (every `head_out.L[pos=p,head=h]` and `mlp_out.L[pos=p]`) that are among the method's k largest "
        "(localize: exact where verified, the estimate elsewhere). Verified share: of those k, how many the "
        "method patched exactly. Forwards counted as `crosspatch.methods.localize` counts them (rows / prompts, a "
        "backward as two; the exhaustive sweep is one `activation_patching` call over both patterns: its clean "
        "and corrupt runs and one per site run). Two more counts of the same runs, measured by wrapping every "
        "engine call: engine calls (the sweep batches sites that share a start into one call on a CPU; "
        "localize's rounds batch their own sites the same way), and cost-model forwards (every call costed by "
        "the engine's batching model, blocks run x (overhead + token rows computed), a gradient call three "
        "times, in whole forwards of the prompts; a resumed run counts only the blocks and positions it "
        "computes, so a site late in the model or the sequence is cheap for both; rows joining a one-prompt run at "
        "their own block count from that block on, for both). Fixed part: the estimates, "
        "the clean and corrupt runs and the layer-level anchor, which localize spends before the estimates "
        "choose anything. Planted heads found: of the planted heads, how many have their strongest "
        "(component, position) site, by the exhaustive sweep, verified (their ranks in the sweep are in the "
        "last column of every case: a planted head's site ranked below k need not be). Seconds are wall clock "
        "on a shared 2-core machine, the exhaustive sweep's from the run that cached it: indicative only. "
        "Planted models (`small`, `gpt2`, `small1`): random GPT-2s with three planted heads, 6 layers x 8 heads x "
        "d 128 and GPT-2 small's 12 x 12 x 768, 8 prompts of 24 tokens corrupted at position 8; `small1` is the "
        "6-layer geometry on one prompt, where the sweep's and localize's verification forwards let their later "
        "sites join at their own block (`--no-verify-joins` measures localize verifying without). "
        "Zoo models: `ioi-gpt2-tiny` (2 layers x 4 heads) and `ioi-gpt2-6x16` (6 layers x 16 heads x d 128), "
        "trained here on IOI, on 16 pairs of held-out (test) names. Sites >= tol: how many of the sweep's "
        "sites reach tol (what localize promises to rank; below it the values are estimates); recall@k of those: "
        "the recall restricted to the top-k sites that reach tol. The sweep on a second draw of prompts (zoo models): "
        "the same sweep on 16 other pairs, its top k against this one's: how much of a top k is the model's rather "
        "than the sample's. "
        "Targets: recall >= 0.95 at <= 10 % of the exhaustive sweep's forwards, or at most the fixed part where "
        "that is larger; the same 10 % in cost-model forwards. The rule, the count, what the "
        "method can miss and a reading of these numbers: `docs/localize.md`.",
        "",
        f"Machine: {platform.machine()}, {platform.system()}, 1 torch thread, torch {torch.__version__}, "
        f"Python {sys.version.split()[0]}."
        + (" The cases were run in more than one process (`--add-rows`: rows of an earlier run of the same code "
           "written with this one's)." if getattr(args, "add_rows", None) else ""),
        "",
        "## Targets (localize)",
        "",
        table(targets(rows), ["group", "k", "cases", "recall", "above_tol", "recall_above_tol", "resample_recall",
                              "fraction", "fixed", "budget", "model_fraction", "fixed_model"],
              ["models", "k", "cases", "recall@k >= 0.95", "sites >= tol (mean)", "recall@k of those >= 0.95",
               "the sweep on a second draw of prompts: recall@k", "forwards <= 10 %", "fixed part / exhaustive",
               "forwards <= max(10 %, fixed part)", "cost-model forwards <= 10 %",
               "fixed part, cost model / exhaustive"]),
        "",
        "## Profile: where localize's forwards and computation go",
        "",
        "Mean over the cases, as shares of the exhaustive sweep's. Forwards by level (the layer level includes "
        "the clean and corrupt runs, made at its first round) and cost-model forwards by part: the estimates "
        "(AtP's gradient forward and backward and its source run), the baselines (the verifier's clean and "
        "corrupt runs), and the sites verified at each level (a site listed at two levels is charged to the "
        "first: `mlp_out.L` to the layer level, `mlp_out.L[pos=p]` to the (layer, position) level). Sites patched "
        "count the sites run (a site known unchanged, a position before the first difference, is 0 without a "
        "forward and not counted); rest tests are the parents' unverified children patched together, one forward "
        "each, counted among the forwards and the cost of the level.",
        "",
        table(profile(rows), ["group", "method", "k"] + [f"fwd_{lv}" for lv in PARTS[2:]]
              + [f"cm_{part}" for part in PARTS] + ["verified", "rests"],
              ["models", "method", "k"] + [f"fwd {lv}" for lv in PARTS[2:]] + [f"cost {part}" for part in PARTS]
              + ["sites patched per level", "rest tests per level"]),
        "",
        "## Summary",
        "",
        table(summary(rows), keys, heads),
        "",
        "## Every case",
        "",
        table(rows, detail_keys, detail_heads),
        "",
    ]
    args.out.write_text("\n".join(text))
    (args.cache / "rows.json").write_text(json.dumps(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
