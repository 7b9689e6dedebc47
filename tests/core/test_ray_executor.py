"""The Ray executor on a local two-CPU Ray cluster that this module starts (loopback only) and stops:
the same Result as the local run, a killed actor replaced and its shard retried, a persistent failure
reported by shard and resumed from the saved shards."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import ray

import conftest
import sharding_cases
import crosspatch as cp
from conftest import randomize, tiny_gpt2
from crosspatch.scale.executors import ShardError
from crosspatch.scale.ray_executor import RayExecutor, release_actors
from sharding_cases import SITES, FailOnPrompt, assert_same_result, make_prompts, per_prompt_metric

@pytest.fixture(scope="module", autouse=True)
def cluster():
    """One local cluster for the module: starting Ray costs seconds, so the tests share it."""
    assert not ray.is_initialized(), "another test left Ray running"
    # Workers cannot import the test modules: ship their classes and functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(conftest)
    ray.cloudpickle.register_pickle_by_value(sharding_cases)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    yield
    release_actors()
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.unregister_pickle_by_value(conftest)
    ray.cloudpickle.unregister_pickle_by_value(sharding_cases)


@pytest.fixture(scope="module")
def prompts():
    return make_prompts()


def make_model():
    """A picklable zero-argument factory, as a user would pass for a model built in code."""
    return randomize(tiny_gpt2())


def test_activation_patching_on_two_actors_equals_local(prompts, tmp_path):
    clean, corrupt = prompts
    import diffusers  # noqa: F401  # an optional library this process has imported and the workers have not
    ref = cp.activation_patching(cp.wrap(make_model()), clean, corrupt, SITES, per_prompt_metric(), normalize=True, batch_size=16)
    ex = RayExecutor(sites_per_shard=4, rows_per_shard=3, checkpoint_dir=tmp_path, keep_actors=True)
    got = cp.activation_patching(make_model, clean, corrupt, SITES, per_prompt_metric(), normalize=True, batch_size=16, executor=ex)
    assert_same_result(got, ref)
    assert not list(tmp_path.rglob("*.json")), "saved shards are removed after a successful merge"


def test_attribution_from_a_checkpoint_folder_equals_local(prompts, tmp_path):
    clean, corrupt = prompts
    from transformers import GPT2LMHeadModel

    make_model().save_pretrained(tmp_path / "ckpt")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "ckpt").eval()  # the metadata names the folder it came from
    ref = cp.attribution_patching(model, clean, corrupt, SITES, per_prompt_metric(), normalize=True)
    got = cp.attribution_patching(str(tmp_path / "ckpt"), clean, corrupt, SITES, per_prompt_metric(), normalize=True,
                                  executor=RayExecutor(actors=2, checkpoint_dir=tmp_path / "shards"))
    assert_same_result(got, ref)


class DieOnce:
    """Kills the worker process on the first call anywhere in the cluster (the marker file says who was first)."""

    def __init__(self, inner, marker):
        self.inner, self.marker, self.name = inner, str(marker), inner.name

    def __call__(self, output, ctx):
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return self.inner(output, ctx)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os._exit(1)  # the actor dies mid-shard, as on a lost node or an OOM kill


def test_a_killed_actor_is_replaced_and_its_shard_retried(prompts, tmp_path, caplog):
    clean, corrupt = prompts
    marker = tmp_path / "died"
    dying = cp.metrics.Metric("logit_diff", DieOnce(per_prompt_metric(), marker))
    ex = RayExecutor(sites_per_shard=4, max_retries=1, checkpoint_dir=tmp_path / "shards", keep_actors=True)
    with caplog.at_level(logging.WARNING, logger="crosspatch.scale.ray_executor"):
        got = cp.activation_patching(make_model, clean, corrupt, SITES, dying, batch_size=12, executor=ex)
    assert marker.exists() and int(marker.read_text()) != os.getpid(), "an actor process died"
    assert "failed on attempt 1 of 2" in caplog.text and "the actor died" in caplog.text
    ref = cp.activation_patching(cp.wrap(make_model()), clean, corrupt, SITES, per_prompt_metric(), batch_size=12)
    assert_same_result(got, ref)


def test_persistent_failure_names_the_shard_and_a_rerun_resumes(prompts, tmp_path, caplog):
    clean, corrupt = prompts
    flag, log = tmp_path / "fail", tmp_path / "calls.log"
    flag.touch()
    failing = cp.metrics.Metric("logit_diff", FailOnPrompt(per_prompt_metric(), 5, flag, log))
    ex = RayExecutor(rows_per_shard=2, sites_per_shard=8, max_retries=1, checkpoint_dir=tmp_path / "shards",
                     keep_actors=True)
    run = lambda: cp.activation_patching(make_model, clean, corrupt, SITES, failing, batch_size=16, executor=ex)  # noqa: E731
    with pytest.raises(ShardError, match=r"shard 2 \(8 site\(s\) .*prompt rows 4:6\) failed on all 2 attempts: "
                                          r"RuntimeError: injected failure for prompt 5") as info:
        run()
    saved = sorted(p.name for p in info.value.saved.glob("s*.json"))
    assert saved == ["s0-8_r0-2.json", "s0-8_r2-4.json"], "the finished shards are kept"
    calls_before = len(log.read_text().split())
    flag.unlink()
    with caplog.at_level(logging.INFO, logger="crosspatch"):
        got = run()
    assert "resuming activation_patching: 2 of 3 shards loaded" in caplog.text
    assert "reusing 2 running actor(s)" in caplog.text, "keep_actors: the next study finds the model loaded"
    assert set(log.read_text().split()[calls_before:]) == {"4"}, "only the failed block runs again"
    ref = cp.activation_patching(cp.wrap(make_model()), clean, corrupt, SITES, per_prompt_metric(), batch_size=16)
    assert_same_result(got, ref)


def test_actors_asking_for_what_the_cluster_lacks_are_refused(prompts, tmp_path):
    clean, corrupt = prompts
    with pytest.raises(ValueError, match=r"each actor asks for 1 GPU but the Ray cluster has 0"):
        cp.activation_patching(make_model, clean, corrupt, SITES, per_prompt_metric(),
                               executor=RayExecutor(num_gpus_per_actor=1, checkpoint_dir=tmp_path))
