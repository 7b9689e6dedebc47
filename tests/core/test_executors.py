"""Sharded runs in this process (LocalExecutor): the same Result as the plain run, shards that cover
the study once, the resume store, and a failure that is reported by shard and resumed. No Ray here."""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest

import crosspatch as cp
from conftest import randomize, tiny_gpt2
from crosspatch.scale.dispatch import resolve_executor
from crosspatch.scale.executors import LocalExecutor, ShardError
from crosspatch.scale.model_source import ModelSource
from crosspatch.scale.shard_store import ShardStore, study_key
from crosspatch.scale.sharding import ShardOutput, merge, plan_study, split
from sharding_cases import SITES, FailOnPrompt, assert_same_result, make_prompts, per_prompt_metric

@pytest.fixture(scope="module")
def model():
    return cp.wrap(randomize(tiny_gpt2()))


@pytest.fixture(scope="module")
def prompts():
    return make_prompts()


SPLITS = [(None, None), (3, None), (None, 2), (5, 4)]


@pytest.mark.parametrize("sites_per_shard,rows_per_shard", SPLITS)
@pytest.mark.parametrize("normalize", [False, True])
def test_sharded_activation_patching_equals_local(model, prompts, tmp_path, sites_per_shard, rows_per_shard, normalize):
    clean, corrupt = prompts
    metric = per_prompt_metric()
    ref = cp.activation_patching(model, clean, corrupt, SITES, metric, normalize=normalize, batch_size=16)
    ex = LocalExecutor(sites_per_shard=sites_per_shard, rows_per_shard=rows_per_shard, checkpoint_dir=tmp_path)
    got = cp.activation_patching(model, clean, corrupt, SITES, metric, normalize=normalize, batch_size=16, executor=ex)
    assert_same_result(got, ref)
    assert not list(tmp_path.rglob("*.json")), "a successful run leaves no saved shards behind"


def test_row_blocks_give_kl_to_clean_the_global_clean_output(prompts, tmp_path):
    """kl_to_clean indexes ctx.clean by prompt: in a row block that must be the block's own clean rows."""
    model = cp.wrap(randomize(tiny_gpt2(initializer_range=0.3)))  # peaked outputs: KLs well above rounding
    clean, corrupt = prompts
    corrupt = corrupt.clone()
    corrupt[:, -1] = (clean[:, -1] + 5) % 98 + 2  # the last position differs: a clear KL at pos=-1
    metric = cp.metrics.kl_to_clean()
    ref = cp.activation_patching(model, clean, corrupt, "resid_pre.1[pos=*]", metric, direction="noising")
    got = cp.activation_patching(model, clean, corrupt, "resid_pre.1[pos=*]", metric, direction="noising",
                                 executor=LocalExecutor(rows_per_shard=4, checkpoint_dir=tmp_path))
    assert_same_result(got, ref)
    assert np.abs(ref.values).max() > 0.1  # the study measures something


@pytest.mark.parametrize("grad_drop,rows_per_shard", [(False, None), (False, 4), (True, None)])
def test_sharded_attribution_equals_local(model, prompts, tmp_path, grad_drop, rows_per_shard):
    clean, corrupt = prompts
    metric = per_prompt_metric()
    ref = cp.attribution_patching(model, clean, corrupt, SITES, metric, grad_drop=grad_drop, normalize=True)
    ex = LocalExecutor(rows_per_shard=rows_per_shard, sites_per_shard=3 if grad_drop else None, checkpoint_dir=tmp_path)
    got = cp.attribution_patching(model, clean, corrupt, SITES, metric, grad_drop=grad_drop, normalize=True, executor=ex)
    assert_same_result(got, ref)


def test_graddrop_refuses_to_split_prompts(model, prompts, tmp_path):
    clean, corrupt = prompts
    with pytest.raises(ValueError, match="GradDrop.*rows_per_shard=None"):
        cp.attribution_patching(model, clean, corrupt, SITES, per_prompt_metric(), grad_drop=True,
                                executor=LocalExecutor(rows_per_shard=2, checkpoint_dir=tmp_path))


@pytest.mark.parametrize("method,options", [("activation_patching", {"batch_size": 12}), ("attribution_patching", {})])
@pytest.mark.parametrize("workers,sites_per_shard,rows_per_shard", [(1, None, None), (2, None, None), (3, 5, 4), (2, 1, 1)])
def test_shards_cover_every_site_and_prompt_once(model, prompts, method, options, workers, sites_per_shard, rows_per_shard):
    clean, corrupt = prompts
    study = plan_study(model, method, clean, corrupt, SITES, per_prompt_metric(), False, options)
    shards = split(study, workers, sites_per_shard, rows_per_shard)
    covered = np.zeros((len(study.sites), study.n), dtype=int)
    for i, shard in enumerate(shards):
        assert shard.index == i
        covered[shard.sites[0] : shard.sites[1], shard.rows[0] : shard.rows[1]] += 1
    assert (covered == 1).all()
    assert len({s.tag for s in shards}) == len(shards)
    if method == "activation_patching":  # a site block starts where a local forward starts
        rows = shards[0].rows[1] - shards[0].rows[0]
        per_forward = max(1, options["batch_size"] // rows)
        assert all(s.sites[0] % per_forward == 0 for s in shards)


def test_merge_names_a_missing_shard(model, prompts):
    clean, corrupt = prompts
    study = plan_study(model, "activation_patching", clean, corrupt, SITES, per_prompt_metric(), False, {})
    shards = split(study, 2)
    with pytest.raises(ValueError, match=r"no output, e\.g\. shard 0 \(.*head_out\.0\[head=0\]"):
        merge(study, shards, {})


def test_study_key_changes_with_what_decides_the_numbers(model, prompts):
    clean, corrupt = prompts
    plan = lambda **kw: plan_study(  # noqa: E731
        model, kw.get("method", "activation_patching"), kw.get("clean", clean), corrupt, kw.get("sites", SITES),
        kw.get("metric", per_prompt_metric()), kw.get("normalize", False), kw.get("options", {"batch_size": 8}),
    )
    ident = ModelSource(model).identity()
    base = study_key(plan(), ident)
    assert study_key(plan(), ident) == base  # same arguments, same key (a fresh metric object too)
    other_model = ModelSource(cp.wrap(tiny_gpt2())).identity()
    assert other_model != ident
    variants = [
        study_key(plan(clean=clean.flip(0)), ident),
        study_key(plan(sites="head_out.1[head=*]"), ident),
        study_key(plan(metric=cp.metrics.logit_diff(list(range(11, 17)), list(range(30, 36)))), ident),
        study_key(plan(metric=cp.metrics.kl_to_clean()), ident),
        study_key(plan(normalize=True), ident),
        study_key(plan(options={"batch_size": 8, "direction": "noising"}), ident),
        study_key(plan(method="attribution_patching", options={}), ident),
        study_key(plan(), other_model),
    ]
    assert base not in variants and len(set(variants)) == len(variants)


def test_store_round_trips_exact_floats_and_skips_unreadable_files(tmp_path, caplog, model, prompts):
    clean, corrupt = prompts
    study = plan_study(model, "activation_patching", clean, corrupt, SITES, per_prompt_metric(), False, {"batch_size": 12})
    shards = split(study, 1, sites_per_shard=4)
    store = ShardStore(tmp_path, "k")
    out = ShardOutput([0.1 + 0.2, 1 / 3, float("nan")], 1e-17, -2.5, 6, False, {"method": "x"})
    store.save(shards[0], out, {"about": 1})
    (store.folder / f"{shards[1].tag}.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        loaded = store.load(shards)
    assert list(loaded) == [0]
    back = loaded[0]
    assert back.values[:2] == out.values[:2] and np.isnan(back.values[2])
    assert (back.clean, back.corrupt, back.rows) == (1e-17, -2.5, 6)
    assert "unreadable saved shard" in caplog.text
    assert json.loads((store.folder / "about.json").read_text()) == {"about": 1}
    store.clear()
    assert not store.folder.exists()


def test_persistent_failure_names_the_shard_and_a_rerun_resumes(model, prompts, tmp_path, caplog):
    clean, corrupt = prompts
    flag, log = tmp_path / "fail", tmp_path / "calls.log"
    flag.touch()
    metric = cp.metrics.Metric("logit_diff", FailOnPrompt(per_prompt_metric(), 5, flag, log))
    ex = LocalExecutor(rows_per_shard=2, sites_per_shard=8, max_retries=1, checkpoint_dir=tmp_path / "ckpt")
    run = lambda: cp.activation_patching(model, clean, corrupt, SITES, metric, batch_size=16, executor=ex)  # noqa: E731
    with pytest.raises(ShardError, match=r"shard 2 \(8 site\(s\) head_out\.0\[head=0\] \.\. head_out\.1\[head=3\] "
                                          r"\(#0:8\), prompt rows 4:6\) failed on all 2 attempts: "
                                          r"RuntimeError: injected failure for prompt 5") as info:
        run()
    assert "2 of 3 shards are saved" in str(info.value)
    saved = sorted(p.name for p in info.value.saved.glob("s*.json"))
    assert saved == ["s0-8_r0-2.json", "s0-8_r2-4.json"]
    calls_before = len(log.read_text().split())
    flag.unlink()
    with caplog.at_level(logging.INFO, logger="crosspatch.scale.dispatch"):
        got = run()
    assert "resuming activation_patching: 2 of 3 shards loaded" in caplog.text
    assert set(log.read_text().split()[calls_before:]) == {"4"}, "only the block of rows 4:6 runs again"
    ref = cp.activation_patching(model, clean, corrupt, SITES, per_prompt_metric(), batch_size=16)
    assert_same_result(got, ref)
    assert not info.value.saved.exists(), "the saved shards are removed once the study is merged"


def test_a_failing_shard_is_retried(model, prompts, tmp_path):
    clean, corrupt = prompts

    class FailOnce:
        name = "logit_diff"

        def __init__(self):
            self.calls, self.inner = 0, per_prompt_metric()

        def __call__(self, output, ctx):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("transient")
            return self.inner(output, ctx)

    metric = FailOnce()
    got = cp.activation_patching(model, clean, corrupt, SITES, cp.metrics.Metric("logit_diff", metric),
                                 executor=LocalExecutor(max_retries=1, checkpoint_dir=tmp_path))
    ref = cp.activation_patching(model, clean, corrupt, SITES, per_prompt_metric())
    assert_same_result(got, ref)
    assert metric.calls > 1


def test_executor_names_are_checked():
    assert isinstance(resolve_executor("local"), LocalExecutor)
    with pytest.raises(ValueError, match="executor must be 'local', 'ray' or an Executor"):
        resolve_executor("dask")
    with pytest.raises(ValueError, match="max_retries must be an int >= 0"):
        LocalExecutor(max_retries=-1)
    with pytest.raises(TypeError, match="zoo name, a local checkpoint folder, a zero-argument factory"):
        ModelSource(3)


def test_missing_ray_names_the_extra(monkeypatch, model, prompts):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    clean, corrupt = prompts
    with pytest.raises(ImportError, match=r'pip install "crosspatch\[ray\]"'):
        cp.activation_patching(model, clean, corrupt, SITES, per_prompt_metric(), executor="ray")


def test_core_does_not_import_ray():
    import subprocess

    code = ("import sys, crosspatch as cp, crosspatch.executors, crosspatch.ray_executor, crosspatch.sharding; "
            "cp.activation_patching; assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
