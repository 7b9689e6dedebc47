"""Measure which transformers model types crosspatch serves, and how: ``make coverage``.

For every model type in transformers' causal-LM, masked-LM, seq2seq and image-classification auto
mappings it builds a tiny random model from the config class
(:mod:`crosspatch.adapters.transformers.tiny`), wraps it, runs ``crosspatch.testing.verify`` and
records the exact, approximate, unavailable and failing site families, or why the type could not be
built or wrapped. Types the transformers adapter cannot serve are tried with the generic adapter
(module-level sites). Every type of the image-text-to-text mapping (task ``image-text-to-text``) is
built the same way (:func:`crosspatch.adapters.vlm.tiny.tiny_vlm`) and verified with the vlm adapter on
that adapter's example inputs (an image per row), when it claims the type. Each type runs in a worker
process with a time limit. Writes docs/coverage.md and a JSON file beside it.

    python tools/coverage.py [--tasks causal-lm,masked-lm] [--types gemma2,opt] [--timeout 120] [--log rows.jsonl]
    python tools/coverage.py --from-log rows.jsonl[,more.jsonl]   # the tables from measured rows
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PER_HEAD = "head_out"
VLM = "image-text-to-text"
OUTCOMES = ("per-head", "module-level", "failing", "not built", "not wrapped")
VLM_OUTCOMES = ("per-head", "heads not all exact", "failing", "not run", "not built", "not wrapped")


def measure(model_type: str, task: str) -> dict:
    """Build, wrap and verify one type (in a worker process)."""
    if task == VLM:
        return measure_vlm(model_type)
    warnings.simplefilter("ignore")
    import torch
    import transformers

    from crosspatch.adapters.transformers.tiny import tiny_model
    from crosspatch.testing import verify

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    start = time.perf_counter()
    row = {"type": model_type, "task": task}
    try:
        model = tiny_model(model_type, task)
    except Exception as exc:
        return {**row, "outcome": "not built", "why": _one_line(exc), "seconds": round(time.perf_counter() - start, 2)}
    inputs = _inputs(model, task)
    try:
        with torch.no_grad():
            model(**inputs) if isinstance(inputs, dict) else model(inputs)
    except Exception as exc:
        why = f"builds but does not run on a CPU from the shrunk config ({_one_line(exc)})"
        return {**row, "outcome": "not built", "why": why, "seconds": round(time.perf_counter() - start, 2)}
    for adapter in ("transformers", "generic"):
        try:
            result = verify(model, inputs, adapter=adapter, cuda=False)
        except Exception as exc:
            row[f"{adapter}_error"] = _one_line(exc)
            continue
        fams = {f.family: f.status for f in result.families}
        exact = sorted(f for f, s in fams.items() if s == "exact")
        row.update(
            adapter=adapter, ok=result.ok, exact=exact,
            approximate=sorted(f for f, s in fams.items() if s == "approximate"),
            unavailable={f.family: f.note for f in result.families if f.status == "unavailable"},
            failed={f.family: f.note for f in result.families if f.status == "failed"},
            general=result.general,
        )
        row["outcome"] = _outcome(row)
        break
    else:
        row["outcome"] = "not wrapped"
        row["why"] = row.get("transformers_error") or row.get("generic_error")
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def measure_vlm(model_type: str) -> dict:
    """Build one image-text-to-text type and verify it with the vlm adapter on its example inputs (in a worker)."""
    warnings.simplefilter("ignore")
    import torch
    import transformers

    from crosspatch.adapters.vlm import VLMAdapter
    from crosspatch.adapters.vlm.tiny import tiny_vlm
    from crosspatch.testing import verify

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    start = time.perf_counter()
    row: dict = {"type": model_type, "task": VLM}

    def done(**fields) -> dict:
        return {**row, **fields, "seconds": round(time.perf_counter() - start, 2)}

    try:
        model = tiny_vlm(model_type)
    except Exception as exc:
        return done(outcome="not built", why=_one_line(exc))
    adapter = VLMAdapter()
    if not adapter.matches(model):
        parts = ", ".join(name for name, _ in getattr(model, "model", model).named_children())
        return done(outcome="not wrapped", why=f"{type(model).__name__} ({parts}) is not a layout the vlm adapter serves "
                    "(a CLIP- or SigLIP-style tower, a projector and a language model; or Qwen2-VL's)")
    try:
        adapter.catalog(model)
    except Exception as exc:
        return done(outcome="not run", why=f"the vlm adapter refuses it: {_one_line(exc)}")
    try:
        inputs = adapter.example_inputs(model)
        if "image_sizes" in inputs:  # anyres (LLaVA-NeXT): the tower's families over the whole image and its crops
            adapter = VLMAdapter(images_per_row=int(inputs["pixel_values"].shape[1]))
        with torch.no_grad():
            adapter.forward(model, adapter.prepare(model, inputs))
    except Exception as exc:
        return done(outcome="not run", why=f"the vlm adapter's example inputs (one image per row) do not run: {_one_line(exc)}")
    try:
        result = verify(model, inputs, adapter=adapter, cuda=False)
    except Exception as exc:
        return done(outcome="failing", why=f"verify raised {_one_line(exc)}")
    fams = {f.family: f.status for f in result.families}
    row.update(
        adapter="vlm", ok=result.ok, exact=sorted(f for f, st in fams.items() if st == "exact"),
        approximate=sorted(f for f, st in fams.items() if st == "approximate"),
        unavailable={f.family: f.note for f in result.families if f.status == "unavailable"},
        failed={f.family: f.note for f in result.families if f.status == "failed"},
        general=result.general,
        dead_ends=sorted(f.family for f in result.families if f.status == "exact" and "dead end" in f.note),
    )
    return done(outcome=_outcome(row))


def _outcome(row: dict) -> str:
    """per-head: the transformers adapter serves exact per-head writes (``head_out``, or every stack's
    ``encoder.head_out`` / ``decoder.head_out`` ...) and nothing fails; else module-level, or failing."""
    heads = [f for f in row["exact"] + row["approximate"] + list(row["unavailable"]) + list(row["failed"])
             if f == PER_HEAD or f.endswith("." + PER_HEAD)]
    per_head = (row["adapter"] in ("transformers", "vlm") and row["ok"] and bool(heads)
                and all(f in row["exact"] for f in heads))
    if row["adapter"] == "vlm":  # a VLM's heads: the language model's head_out and the tower's vision.head_out
        per_head = per_head and {PER_HEAD, "vision." + PER_HEAD} <= set(heads)
        return "per-head" if per_head else ("heads not all exact" if row["ok"] else "failing")
    return "per-head" if per_head else ("module-level" if row["ok"] else "failing")


def _inputs(model, task: str):
    """Two examples: token ids (source and target ids for an encoder-decoder), or images of the config's size."""
    import torch

    config = model.config
    gen = torch.Generator().manual_seed(0)
    if task == "image-classification":
        size = getattr(config, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        return {"pixel_values": torch.randn(2, getattr(config, "num_channels", 3), size, size, generator=gen)}
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", 100)
    ids = torch.randint(0, min(vocab, 1000), (2, 8), generator=gen)
    if getattr(config, "is_encoder_decoder", False):  # source ids, and target ids from the decoder's start token
        from crosspatch.adapters.transformers.seq2seq import _start_token as start_token

        target = torch.randint(0, min(vocab, 1000), (2, 6), generator=gen)
        target[:, 0] = start_token(model)
        return {"input_ids": ids, "decoder_input_ids": target}
    return ids


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: " + " ".join(str(exc).split())[:240]


def _run_all(jobs: list[tuple[str, str]], timeout: float, log: Path | None = None) -> list[dict]:
    """Every job in a worker process; each row is also appended to ``log`` (JSON lines) as it is measured,
    so a run stopped early keeps what it measured (``--from-log`` writes the tables from it)."""
    rows = []
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(1, maxtasksperchild=20)
    try:
        for i, (model_type, task) in enumerate(jobs, 1):
            pending = pool.apply_async(measure, (model_type, task))
            try:
                row = pending.get(timeout)
            except mp.TimeoutError:
                pool.terminate()
                pool = ctx.Pool(1, maxtasksperchild=20)
                row = {"type": model_type, "task": task, "outcome": "not built", "why": f"over {timeout:.0f} s on a CPU", "seconds": timeout}
            except Exception as exc:  # the worker died (a crash inside a kernel)
                pool.terminate()
                pool = ctx.Pool(1, maxtasksperchild=20)
                row = {"type": model_type, "task": task, "outcome": "not built", "why": _one_line(exc), "seconds": None}
            rows.append(row)
            if log is not None:
                with log.open("a") as f:
                    f.write(json.dumps(row, sort_keys=True) + "\n")
            print(f"[{i}/{len(jobs)}] {task} {model_type}: {row['outcome']}", file=sys.stderr, flush=True)
    finally:
        pool.terminate()
    return rows


VLM_NOTE = (
    "Vision-language models, verified with the vlm adapter (`crosspatch.adapters.vlm`) on its example inputs: "
    "one image per row at the vision config's size (LLaVA-NeXT: one tower size high and two wide, its whole "
    "image and two crops, with `images_per_row=3` so that the tower is served over them), the image tokens, then "
    "text. *per-head*: the conformance "
    "suite and the oracles pass, and both the language model's `head_out` and the vision tower's "
    "`vision.head_out` are exact; *heads not all exact*: everything served passes, but a head family is not "
    "served; *failing*: a served family fails a check; *not run*: the vlm adapter claims the layout but refuses "
    "the model (the reason is given), or its example inputs do not run it (multi-crop inputs, a different "
    "image-token layout ...); *not built*: "
    "the tiny model could not be built from the shrunk config; *not wrapped*: the vlm adapter does not claim "
    "the layout (no other adapter is tried: the inputs such a model runs on are its own)."
)


def _markdown(rows: list[dict], tasks: list[str]) -> str:
    lines = ["# Coverage of transformers model types", "",
             "Measured by `make coverage` (`tools/coverage.py`): every model type of transformers' auto mappings for "
             f"{', '.join(tasks)}, built as a tiny random model from its config class, wrapped and verified "
             "(`crosspatch verify`: the conformance suite and the adapter's per-family oracles). "
             "*per-head*: served by the transformers adapter with exact per-head sites (`head_out` exact, nothing failing); "
             "*module-level*: served by the generic adapter (`module.<path>` sites) or by the transformers adapter "
             "without exact heads; *failing*: a claimed family fails a check; *not built*: the tiny model could not be "
             "built or run on a CPU here; *not wrapped*: no adapter served it.", ""]
    for task in tasks:
        mine = [r for r in rows if r["task"] == task]
        count = {k: sum(r["outcome"] == k for r in mine) for k in (VLM_OUTCOMES if task == VLM else OUTCOMES)}
        lines += [f"## {task}: {len(mine)} types", ""]
        if task == VLM:
            lines += [VLM_NOTE, ""]
        lines += [ ", ".join(f"{v} {k}" for k, v in count.items()), "",
                  "| type | outcome | exact families | not served / failing | seconds |", "|---|---|---|---|---|"]
        for r in sorted(mine, key=lambda r: r["type"]):
            exact = ", ".join(r.get("exact", [])) if r["outcome"] in ("per-head", "failing", "heads not all exact") else (
                f"{len(r.get('exact', []))} module families" if r.get("exact") else "")
            issues = {**r.get("unavailable", {}), **r.get("failed", {})}
            why = r.get("why") or "; ".join(f"{k}: {v}" for k, v in issues.items())
            if r.get("dead_ends"):  # exact, but a write there does not reach the output here
                why += ("; " if why else "") + f"writes do not reach the output: {', '.join(r['dead_ends'])}"
            if r.get("adapter") == "generic" and r.get("transformers_error"):
                why = f"transformers adapter: {r['transformers_error']}" + (f"; {why}" if why else "")
            lines.append(f"| {r['type']} | {r['outcome']} | {exact} | {why.replace('|', '/')} | {r.get('seconds', '')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=f"causal-lm,masked-lm,seq2seq-lm,image-classification,{VLM}")
    parser.add_argument("--types", default=None, help="only these model types (comma-separated)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per type")
    parser.add_argument("--out", default=str(REPO / "docs" / "coverage.md"))
    parser.add_argument("--log", default=None, help="append each measured row to this JSON-lines file as it comes")
    parser.add_argument("--from-log", default=None,
                        help="write the tables from JSON-lines files (comma-separated; a later row of a type replaces "
                             "an earlier one) instead of measuring")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    if args.from_log:
        found: dict[tuple[str, str], dict] = {}
        for name in args.from_log.split(","):
            for line in Path(name).read_text().splitlines():
                row = json.loads(line)
                if "adapter" in row and "ok" in row:  # measured: the outcome by the rule above
                    row["outcome"] = _outcome(row)
                found[(row["task"], row["type"])] = row
        rows = [r for r in found.values() if r["task"] in tasks]
    else:
        from crosspatch.adapters.transformers.tiny import model_types
        from crosspatch.adapters.vlm.tiny import vlm_types

        only = set(args.types.split(",")) if args.types else None
        jobs = [(t, task) for task in tasks for t in (vlm_types() if task == VLM else model_types(task))
                if only is None or t in only]
        rows = _run_all(jobs, args.timeout, Path(args.log) if args.log else None)
    out = Path(args.out)
    out.write_text(_markdown(rows, tasks))
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1, sort_keys=True))
    for task in tasks:
        mine = [r for r in rows if r["task"] == task]
        second = "heads not all exact" if task == VLM else "module-level"
        print(f"{task}: {sum(r['outcome'] == 'per-head' for r in mine)} per-head, "
              f"{sum(r['outcome'] == second for r in mine)} {second} of {len(mine)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
