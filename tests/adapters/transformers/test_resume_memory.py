"""Resumed runs keep no batch-sized keys and values: each block's are freed once the block is done.

A run resumed at position ``p`` of a batch of ``times`` copies of the prefix's rows gets a cache of
the prefix's keys and values of positions ``..p``. Tiling them to the batch, and keeping every
block's concatenation with the new positions until the forward ends, would hold all blocks' full
keys and values at once; here the cache must hold nothing with the batch's row count, no tensor of
a block's full keys/values may outlive the block, and the result must still equal the full run
(also with sliding windows shorter than the resumed position, whose prefix must keep every position,
and for a run on its own inputs).
"""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import padded_prompts, tiny_gpt2, tiny_llama, tiny_neox
from transformers.cache_utils import Cache

import crosspatch as cp
from crosspatch.engine.adapter import repeat_rows
from crosspatch.engine.forward import Bound, execute
from crosspatch.engine.resume import Resume

LENGTH, ROWS, TIMES = 10, 3, 3

MODELS = {
    "gpt2": lambda: tiny_gpt2(n_layer=3),
    "llama": lambda: tiny_llama(num_hidden_layers=3),
    "neox": lambda: tiny_neox(False),
    # Windows shorter than the resumed position: the cache keeps only the window's last positions.
    "mistral-window": lambda: tiny_llama("mistral", num_hidden_layers=3, sliding_window=3),
    # Block 0 full attention, blocks 1.. sliding: one cache mixing both kinds of entries. (Only from
    # block 0: transformers picks a block's mask by its index in the block list, which a run resumed
    # at a later block shortens.)
    "qwen2-hybrid": lambda: tiny_llama(
        "qwen2", num_hidden_layers=3, use_sliding_window=True, sliding_window=3, max_window_layers=1
    ),
}


def prompts(seed: int, pad: str | None) -> dict:
    return padded_prompts(seed, ROWS, LENGTH, pad)


def _blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    base = model.base_model
    return base.h if hasattr(base, "h") else base.layers


def _caches(args, kwargs) -> list[Cache]:
    return [v for v in (*args, *kwargs.values()) if isinstance(v, Cache)]


def _kept_tensors(cache: Cache) -> list[torch.Tensor]:
    kept = [getattr(layer, field, None) for layer in cache.layers for field in ("keys", "values")]
    return [t for t in kept if isinstance(t, torch.Tensor)]


STARTS = [(name, layer, pos) for name in MODELS for layer, pos in [(0, 4), (1, 2), (1, 7)]
          if not (name == "qwen2-hybrid" and layer)]


@pytest.mark.parametrize("name,layer,pos", STARTS)
@pytest.mark.parametrize("pad", [None, "right", "left"])
def test_resumed_cache_keeps_nothing_tiled_and_equals_the_full_run(name, layer, pos, pad):
    model = MODELS[name]()
    m = cp.wrap(model)
    base_in = m.adapter.prepare(model, prompts(0, pad))
    site = cp.Site.parse(f"resid_pre.{layer}[pos={pos}]")
    source = execute(model, m.adapter, m.catalog, m.adapter.prepare(model, prompts(1, pad)), capture=[site.key])
    prefix = execute(model, m.adapter, m.catalog, base_in, keep_prefix=True).prefix
    inputs = repeat_rows(base_in, TIMES)
    rows = ROWS * TIMES
    bounds = [Bound(site, cp.Patch(source.cache), slice(ROWS, 2 * ROWS))]
    full = execute(model, m.adapter, m.catalog, inputs, bounds).output

    seen: list[list[tuple[int, ...]]] = []

    def inspect_cache(module, args, kwargs, output):
        for cache in _caches(args, kwargs):
            seen.append([tuple(t.shape) for t in _kept_tensors(cache)])

    handle = _blocks(model)[-1].register_forward_hook(inspect_cache, with_kwargs=True)
    try:
        run = execute(model, m.adapter, m.catalog, inputs, bounds, resume=Resume(prefix, layer, pos))
    finally:
        handle.remove()

    assert seen, "the last block saw no cache"
    for shapes in seen:
        assert shapes, "the cache holds no prefix keys/values"
        assert all(shape[0] != rows for shape in shapes), f"tiled or concatenated keys/values kept: {shapes}"
    assert run.raw.get("cache") is None  # the output keeps no cache either
    real = inputs["attention_mask"].bool()
    assert (full[ROWS : 2 * ROWS] - full[:ROWS])[real[:ROWS]].abs().max() > 1e-6  # the patch changes the output
    torch.testing.assert_close(run.output[real], full[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("layer", [0, 1])
def test_no_block_keys_values_outlive_the_block(name, layer):
    """When the last block is done, no earlier block's full ``[rows, heads, length, d_head]`` keys/values are alive."""
    model = MODELS[name]()
    m = cp.wrap(model)
    pos = 4
    base_in = m.adapter.prepare(model, prompts(0, None))
    prefix = execute(model, m.adapter, m.catalog, base_in, keep_prefix=True).prefix
    inputs = repeat_rows(base_in, TIMES)
    rows = ROWS * TIMES
    keys = prefix.keys_values[0][0]
    full_shape = (rows, keys.shape[1], LENGTH, keys.shape[3])
    alive: list[int] = []

    def count_full_keys_values(module, args, output):
        gc.collect()
        tensors = (o for o in gc.get_objects() if issubclass(type(o), torch.Tensor))
        alive.append(sum(1 for t in tensors if tuple(t.shape) == full_shape))

    handle = _blocks(model)[-1].register_forward_hook(count_full_keys_values)
    try:
        run = execute(model, m.adapter, m.catalog, inputs, resume=Resume(prefix, layer, pos))
    finally:
        handle.remove()
    assert alive == [0]
    torch.testing.assert_close(run.output, repeat_rows({"x": prefix.output}, TIMES)["x"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama", "mistral-window"])
def test_a_run_on_its_own_inputs_embeds_them_after_the_shared_positions(name):
    """``own_inputs``: rows whose tokens differ from the prefix's from ``pos`` on equal their own full run."""
    model = MODELS[name]()
    m = cp.wrap(model)
    pos = 4
    base_in = m.adapter.prepare(model, prompts(0, "left"))
    prefix = execute(model, m.adapter, m.catalog, base_in, keep_prefix=True).prefix
    other = dict(base_in, input_ids=base_in["input_ids"].clone())
    other["input_ids"][:, pos:] = prompts(1, None)["input_ids"][:, pos:]
    full = execute(model, m.adapter, m.catalog, other).output
    run = execute(model, m.adapter, m.catalog, other, resume=Resume(prefix, 0, pos, own_inputs=True))
    real = other["attention_mask"].bool()
    assert (full - prefix.output)[real].abs().max() > 1e-3
    torch.testing.assert_close(run.output[real], full[real], rtol=0, atol=1e-5)


def test_a_model_mixing_attention_kinds_resumes_from_block_0_only():
    model = MODELS["qwen2-hybrid"]()
    m = cp.wrap(model)
    assert not m.adapter.can_resume(model)  # sweeps run whole
    base_in = m.adapter.prepare(model, prompts(0, None))
    prefix = execute(model, m.adapter, m.catalog, base_in, keep_prefix=True).prefix
    with pytest.raises(ValueError, match="resume at block 1: this model's blocks mix attention kinds"):
        execute(model, m.adapter, m.catalog, base_in, resume=Resume(prefix, 1, 2))
