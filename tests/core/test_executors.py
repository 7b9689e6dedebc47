"""Sharded runs in this process (LocalExecutor): the same Result as the plain run, bit for bit; shards
that cover the study once; the resume store, keyed by a description that survives round trips; a
failure reported by shard and resumed, for every kind of model source; and how the Ray executor starts
a cluster (against a stand-in: no Ray here)."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import warnings

import cloudpickle
import numpy as np
import pytest
import torch

import crosspatch as cp
from conftest import randomize, tiny_gpt2
from fake_zoo import fake_zoo  # noqa: F401  (a fixture)
from crosspatch.scale import ray_executor
from crosspatch.scale.dispatch import resolve_executor
from crosspatch.scale.executors import LocalExecutor, ShardError
from crosspatch.scale.model_source import ModelSource
from crosspatch.scale.ray_executor import RayExecutor
from crosspatch.scale.shard_store import KEY_FORMAT, ShardStore, study_key
from crosspatch.scale.sharding import ROW_MERGE_RTOL, ShardOutput, merge, plan_study, split
from sharding_cases import (
    SITES, FailOnPrompt, assert_same_result, fail_then_resume, failing_metric, make_prompts, model_source,
    per_prompt_metric, tensor_metric,
)


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
    assert_same_result(got, ref)  # bit-identical, prompt blocks too
    if rows_per_shard is None:
        assert "merge" not in got.metadata, "site blocks: the metadata is the local run's"
    else:  # per-prompt effects merged before the mean: the merge adds no rounding
        assert got.metadata["merge"]["row_blocks"] == -(-6 // rows_per_shard) and got.metadata["merge"]["merge_rtol"] == 0
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
    assert got.metadata["merge"]["merge_rtol"] == 0
    # Blocks of 4 and 2 prompts run forwards of 4 and 2 rows where the local run's hold 6: one value
    # differs by 8e-8, float32 rounding of those forwards (the merge itself adds none: merge_rtol 0).
    assert_same_result(got, ref, forwards_atol=1e-6)
    assert np.abs(ref.values).max() > 0.1  # the study measures something


@pytest.mark.parametrize("grad_drop,rows_per_shard", [(False, None), (False, 4), (True, None)])
def test_sharded_attribution_equals_local(model, prompts, tmp_path, grad_drop, rows_per_shard):
    clean, corrupt = prompts
    metric = per_prompt_metric()
    ref = cp.attribution_patching(model, clean, corrupt, SITES, metric, grad_drop=grad_drop, normalize=True)
    ex = LocalExecutor(rows_per_shard=rows_per_shard, sites_per_shard=3 if grad_drop else None, checkpoint_dir=tmp_path)
    got = cp.attribution_patching(model, clean, corrupt, SITES, metric, grad_drop=grad_drop, normalize=True, executor=ex)
    assert_same_result(got, ref)  # within the merge's stated bound where it states one
    if not grad_drop:  # AtP splits prompts by default and sums a block's products in its own order: bound stated
        assert got.metadata["merge"]["merge_rtol"] == ROW_MERGE_RTOL
    else:  # GradDrop splits sites only
        assert "merge" not in got.metadata


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
    assert study_key(plan(metric=tensor_metric()), ident) == study_key(plan(metric=tensor_metric()), ident)
    other_model = ModelSource(cp.wrap(tiny_gpt2())).identity()
    assert other_model != ident
    variants = [
        study_key(plan(clean=clean.flip(0)), ident),
        study_key(plan(sites="head_out.1[head=*]"), ident),
        study_key(plan(metric=cp.metrics.logit_diff(list(range(11, 17)), list(range(30, 36)))), ident),
        study_key(plan(metric=cp.metrics.kl_to_clean()), ident),
        study_key(plan(metric=cp.metrics.logit_diff(torch.arange(11, 17), torch.arange(30, 36))), ident),
        study_key(plan(normalize=True), ident),
        study_key(plan(options={"batch_size": 8, "direction": "noising"}), ident),
        study_key(plan(method="attribution_patching", options={}), ident),
        study_key(plan(), other_model),
    ]
    assert base not in variants and len(set(variants)) == len(variants)


def test_study_key_survives_pickle_round_trips(model, prompts):
    """A study planned on a Ray actor comes back unpickled: its key must be the one this process computes."""
    clean, corrupt = prompts
    threshold = 0.5
    metrics = {
        "tensor answers": tensor_metric(),
        "a closure": cp.metrics.Metric("mine", lambda out, ctx: out[:, -1, 3] * threshold),
        "a wrapped metric": cp.metrics.Metric("logit_diff", FailOnPrompt(tensor_metric(), 5, "flag", "log")),
    }
    ident = ModelSource(model).identity()
    for name, metric in metrics.items():
        study = plan_study(model, "activation_patching", clean, corrupt, SITES, metric, True, {"batch_size": 8})
        once = cloudpickle.loads(cloudpickle.dumps(study))
        twice = cloudpickle.loads(cloudpickle.dumps(once))
        assert study_key(study, ident) == study_key(once, ident) == study_key(twice, ident), name


def test_factory_identity_follows_its_code_and_closure():
    def factory(width):
        return lambda: tiny_gpt2(n_embd=width)

    same = ModelSource(factory(64)).identity()
    assert ModelSource(factory(64)).identity() == same
    assert ModelSource(cloudpickle.loads(cloudpickle.dumps(factory(64)))).identity() == same
    assert ModelSource(factory(32)).identity() != same
    assert ModelSource(make_model).identity() == ModelSource(make_model).identity()


def test_prompt_blocks_merge_to_the_local_means_bit_for_bit(model, prompts):
    """Per-prompt effects and baselines merge into the local run's [sites, prompts] means and its gap,
    (clean - corrupt) in the metric's dtype, averaged in float64; a prompt-weighted merge of block means
    would not be bit-identical on these numbers."""
    clean, corrupt = prompts
    study = plan_study(model, "activation_patching", clean, corrupt, SITES, per_prompt_metric(), True, {"batch_size": 16})
    shards = split(study, 2, rows_per_shard=2)
    n, n_sites = study.n, len(study.sites)
    gen = torch.Generator().manual_seed(0)
    effects = torch.randn(n_sites, n, generator=gen, dtype=torch.float64) * torch.logspace(-6, 1, n, dtype=torch.float64)
    c32 = (3 + torch.randn(n, generator=gen)).float()
    d32 = (-1e-3 * torch.rand(n, generator=gen)).float()  # c - d rounds in float32
    outputs = {}
    for shard in shards:
        (a, b), (r0, r1) = shard.sites, shard.rows
        block = effects[a:b, r0:r1]
        outputs[shard.index] = ShardOutput(
            block.mean(dim=1).tolist(), float(c32[r0:r1].double().mean()), float(d32[r0:r1].double().mean()), r1 - r0,
            False, {"method": "activation_patching"}, prompt_values=block.T.tolist(),
            prompt_clean=c32[r0:r1].double().tolist(), prompt_corrupt=d32[r0:r1].double().tolist(),
            metric_dtype="torch.float32",
        )
    gap = (c32 - d32).double().mean()  # as activation_patching computes them
    local = (effects.mean(dim=1) / gap).numpy()
    got = merge(study, shards, outputs)
    np.testing.assert_array_equal(got.values.reshape(-1), local)
    assert got.metadata["baseline"] == {"clean": float(c32.double().mean()), "corrupt": float(d32.double().mean())}
    assert got.metadata["merge"]["merge_rtol"] == 0

    for out in outputs.values():  # block means only (AtP's case): float64 sums in another order
        out.prompt_values = None
    weighted = merge(study, shards, outputs)
    assert not np.array_equal(weighted.values.reshape(-1), local), "the test needs numbers a weighted merge rounds"
    np.testing.assert_allclose(weighted.values.reshape(-1), local, rtol=0, atol=ROW_MERGE_RTOL * np.abs(local).max())
    assert weighted.metadata["merge"]["merge_rtol"] == ROW_MERGE_RTOL
    assert weighted.metadata["merge"]["gap"].startswith("per prompt")

    for out in outputs.values():  # baselines that could not be told apart: the gap of the mean baselines
        out.prompt_clean = out.prompt_corrupt = None
    from_means = merge(study, shards, outputs)
    assert from_means.metadata["merge"]["gap"].startswith("from the blocks' mean baselines")
    stated = 2**-24 * float((c32.double() - d32.double()).abs().mean() / gap.abs())  # the relative bound it states
    assert 1e-12 < np.abs(from_means.values.reshape(-1) / local - 1).max() <= stated + ROW_MERGE_RTOL


def make_model():
    """A module-level zero-argument factory."""
    return randomize(tiny_gpt2())


@pytest.mark.parametrize("source", ["module", "factory", "zoo"])
def test_a_failed_study_with_tensor_answers_names_the_shard_and_resumes(source, prompts, tmp_path, caplog, request):
    """The README's metric (tensor answers) resumes for every kind of model source: the failure names the
    shard and the cause, only the failed block runs again, the folder is gone once the study is merged."""
    clean, corrupt = prompts
    spec, local = model_source(source, request, "fake_zoo", make_model)
    metric, flag, log = failing_metric(tmp_path)
    ex = LocalExecutor(rows_per_shard=2, sites_per_shard=8, max_retries=1, checkpoint_dir=tmp_path / "ckpt")
    run = lambda: cp.activation_patching(spec, clean, corrupt, SITES, metric, batch_size=16, executor=ex)  # noqa: E731
    names = "4 site(s) head_out.0[head=0] .. head_out.1[head=1] (#0:4)" if source == "zoo" else \
        "8 site(s) head_out.0[head=0] .. head_out.1[head=3] (#0:8)"
    _, got = fail_then_resume(run, flag, log, caplog, re.escape(
        f"shard 2 ({names}, prompt rows 4:6) failed on all 2 attempts: RuntimeError: injected failure for prompt 5"))
    assert_same_result(got, cp.activation_patching(local, clean, corrupt, SITES, tensor_metric(), batch_size=16))


def test_a_merged_study_removes_folders_its_earlier_runs_left_under_the_old_key_format(model, prompts, tmp_path, caplog):
    """Format-1 keys were pickled bytes that changed on every run, so their folders never resume: a
    completed study removes those of the same method, model and sites (a factory as that format named
    it too), and keeps any other study's."""
    clean, corrupt = prompts
    root = tmp_path / "ckpt"

    def leftover(name, **about):
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "about.json").write_text(json.dumps({"method": "activation_patching", "sites": SITES, "shards": 3, **about}))
        (folder / "s0-8_r0-2.json").write_text("{}")

    module_id, (factory_old_id,) = ModelSource(model).identity(), ModelSource(make_model).older_identities()
    leftover("old-same-module", model=module_id)
    leftover("old-same-factory", model=factory_old_id)
    leftover("old-other-sites", model=module_id, sites="mlp_out.*")
    leftover("old-other-method", model=module_id, method="attribution_patching")
    leftover("old-other-model", model="zoo:ioi-gpt2-tiny")
    leftover("current-format", model=module_id, key_format=KEY_FORMAT)
    ex = LocalExecutor(rows_per_shard=3, checkpoint_dir=root)
    with caplog.at_level(logging.INFO, logger="crosspatch.scale.dispatch"):
        cp.activation_patching(model, clean, corrupt, SITES, tensor_metric(), batch_size=16, executor=ex)
        assert "old-same-module: an earlier run of this study left it under an older key format" in caplog.text
        assert sorted(p.name for p in root.iterdir()) == [
            "current-format", "old-other-method", "old-other-model", "old-other-sites", "old-same-factory"]
        cp.activation_patching(make_model, clean, corrupt, SITES, tensor_metric(), batch_size=16, executor=ex)
    assert sorted(p.name for p in root.iterdir()) == ["current-format", "old-other-method", "old-other-model", "old-other-sites"]


def test_a_study_that_cannot_be_described_warns_once_and_saves_nothing(model, prompts, tmp_path):
    """A metric holding a lock cannot be described, so no key can promise a resume: the study runs, says
    so once, keeps nothing on disk, and a failure says nothing was saved."""
    clean, corrupt = prompts
    lock, inner = threading.Lock(), per_prompt_metric()

    def locked(output, ctx):
        with lock:
            return inner(output, ctx)

    ex = LocalExecutor(rows_per_shard=3, max_retries=0, checkpoint_dir=tmp_path / "ckpt")
    run = lambda metric: cp.activation_patching(model, clean, corrupt, SITES, metric, batch_size=16, executor=ex)  # noqa: E731
    with pytest.warns(UserWarning, match=r"cannot resume after a failure: metric\.fn\.<closure lock> is a _thread\.lock"):
        got = run(cp.metrics.Metric("logit_diff", locked))
    assert_same_result(got, cp.activation_patching(model, clean, corrupt, SITES, per_prompt_metric(), batch_size=16))
    assert not (tmp_path / "ckpt").exists()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run(cp.metrics.Metric("logit_diff", locked))
    assert not [w for w in seen if "cannot resume" in str(w.message)], "said once"
    flag = tmp_path / "fail"
    flag.touch()
    failing = FailOnPrompt(cp.metrics.Metric("logit_diff", locked), 5, flag, tmp_path / "log")
    with pytest.warns(UserWarning, match=r"metric\.fn\.inner\.fn\.<closure lock>"):  # another metric: said again
        with pytest.raises(ShardError, match=r"this study cannot resume \(.*_thread\.lock.*\), so its 1 finished shard"):
            run(cp.metrics.Metric("logit_diff", failing))
    assert not (tmp_path / "ckpt").exists()


class _FakeRay:
    """Stands in for the ray module: records ``init`` and reports the nodes it is told."""

    def __init__(self, nodes=("127.0.0.1",)):
        self.inits, self.up, self.node_addresses, self.shutdowns = [], False, nodes, 0

    def is_initialized(self):
        return self.up

    def init(self, **options):
        self.inits.append(options)
        self.up = True

    def nodes(self):
        return [{"NodeManagerAddress": a} for a in self.node_addresses]

    def shutdown(self):
        self.up, self.shutdowns = False, self.shutdowns + 1


def test_ray_starts_a_local_cluster_on_loopback_and_joins_only_an_address_it_is_given(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    fake = _FakeRay()
    monkeypatch.setattr(ray_executor, "_ray", lambda: fake)
    assert RayExecutor(init_options={"num_cpus": 2}).connect() is fake
    assert fake.inits == [{"address": "local", "num_cpus": 2, "include_dashboard": False, "_node_ip_address": "127.0.0.1"}]
    RayExecutor().connect()
    assert len(fake.inits) == 1, "a running connection is used as it is"

    for given, env in (("ray://head:10001", None), (None, "10.0.0.5:6379")):
        fake = _FakeRay(nodes=("10.0.0.5",))
        monkeypatch.setattr(ray_executor, "_ray", lambda: fake)
        if env:
            monkeypatch.setenv("RAY_ADDRESS", env)
        RayExecutor(address=given, init_options={"runtime_env": {}}).connect()
        assert fake.inits == [{"address": given or env, "runtime_env": {}}], "the user's address, nothing added"
    monkeypatch.delenv("RAY_ADDRESS")

    fake = _FakeRay(nodes=("192.0.2.2",))  # a Ray that ignored the loopback node address
    monkeypatch.setattr(ray_executor, "_ray", lambda: fake)
    with pytest.raises(RuntimeError, match=r"registered its node at 192\.0\.2\.2, not 127\.0\.0\.1"):
        RayExecutor().connect()
    assert fake.shutdowns == 1 and not fake.up


def test_store_round_trips_exact_floats_and_skips_unreadable_files(tmp_path, caplog, model, prompts):
    clean, corrupt = prompts
    study = plan_study(model, "activation_patching", clean, corrupt, SITES, per_prompt_metric(), False, {"batch_size": 12})
    shards = split(study, 1, sites_per_shard=4)
    store = ShardStore(tmp_path, "k")
    out = ShardOutput([0.1 + 0.2, 1 / 3, float("nan")], 1e-17, -2.5, 6, False, {"method": "x"},
                      prompt_clean=[1 / 3, 0.1], prompt_corrupt=[2 / 3, 0.2], metric_dtype="torch.float32")
    store.save(shards[0], out, {"about": 1})
    (store.folder / f"{shards[1].tag}.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        loaded = store.load(shards)
    assert list(loaded) == [0]
    back = loaded[0]
    assert back.values[:2] == out.values[:2] and np.isnan(back.values[2])
    assert (back.clean, back.corrupt, back.rows) == (1e-17, -2.5, 6)
    assert (back.prompt_clean, back.prompt_corrupt, back.metric_dtype) == ([1 / 3, 0.1], [2 / 3, 0.2], "torch.float32")
    assert "unreadable saved shard" in caplog.text
    assert json.loads((store.folder / "about.json").read_text()) == {"about": 1}
    store.clear()
    assert not store.folder.exists()




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
