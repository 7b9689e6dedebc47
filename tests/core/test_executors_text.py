"""A sharded study on text (a model with a tokenizer, prompts padded on the right) gives the local Result:
positions labelled with the clean prompt's tokens, the same skipped sites, the same values."""

from __future__ import annotations

import pytest
import torch

import crosspatch as cp
from crosspatch.scale.executors import LocalExecutor
from fake_zoo import fake_zoo  # noqa: F401  (fixture)
from sharding_cases import assert_same_result

pytest.importorskip("transformers")

CLEAN = [
    "When Mary and John went , John gave a drink to",  # shorter: the batch is padded on the right
    "When Mary and John went to the store , John gave a drink to",
    "When Anna and Paul went to the store , Paul gave a drink to",
]
CORRUPT = [CLEAN[0].replace(", John", ", Paul"), CLEAN[1].replace(", John", ", Paul"), CLEAN[2].replace(", Paul", ", John")]


@pytest.fixture(scope="module")
def m():
    from transformers import GPT2Config, GPT2LMHeadModel

    from crosspatch.adapters.transformers.zoo import word_tokenizer
    from crosspatch.zoo.tasks import IOITask

    tok = word_tokenizer(IOITask().vocabulary())
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=32, vocab_size=len(tok), initializer_range=0.2)
    return cp.wrap(GPT2LMHeadModel(config).eval(), tokenizer=tok)


@pytest.mark.parametrize("method", ["activation_patching", "attribution_patching"])
@pytest.mark.parametrize("sites_per_shard,rows_per_shard", [(4, None), (4, 1)])
def test_a_sharded_study_on_text_is_the_local_result(m, tmp_path, method, sites_per_shard, rows_per_shard):
    metric = cp.metrics.logit_diff([" Mary", " Mary", " Anna"], [" John", " John", " Paul"])
    run = getattr(cp, method)
    quiet = {"progress": False} if method == "activation_patching" else {}
    ref = run(m, CLEAN, CORRUPT, "resid_pre.*[pos=*]", metric, **quiet)
    assert ref.coords["pos"][:3] == ["0 When", "1 Mary", "2 and"]
    if method == "activation_patching":  # positions before the first that differs are skipped
        assert ref.skipped is not None and ref.skipped[:, :5].all() and not ref.skipped.all()
    ex = LocalExecutor(sites_per_shard=sites_per_shard, rows_per_shard=rows_per_shard, checkpoint_dir=tmp_path)
    got = run(m, CLEAN, CORRUPT, "resid_pre.*[pos=*]", metric, executor=ex, **quiet)
    # Prompt blocks run forwards of fewer rows (and their whole output), and without a batch_size a CPU
    # groups the sites of a block into forwards as that block's cost model says: both round differently
    # in the last float32 bits (about 1e-7); the merge adds none (metadata["merge"] says so).
    batched = "merge" in got.metadata or method == "activation_patching"
    assert_same_result(got, ref, forwards_atol=1e-6 if batched else 0.0)


def test_a_sharded_study_of_a_zoo_name_reads_text_with_its_tokenizer(fake_zoo, tmp_path):
    """Workers load a model named by the zoo together with its tokenizer, as ``cp.wrap(name)`` does."""
    from fake_zoo import FAKE

    metric = cp.metrics.logit_diff([" Mary", " Mary", " Anna"], [" John", " John", " Paul"])
    ref = cp.activation_patching(cp.wrap(FAKE), CLEAN, CORRUPT, "resid_pre.1[pos=*]", metric, progress=False)
    ex = LocalExecutor(sites_per_shard=4, checkpoint_dir=tmp_path / "shards")
    got = cp.activation_patching(FAKE, CLEAN, CORRUPT, "resid_pre.1[pos=*]", metric, executor=ex, progress=False)
    assert got.coords["pos"] == ref.coords["pos"]
    assert_same_result(got, ref, forwards_atol=1e-6)  # grouped into forwards per block (see above)
