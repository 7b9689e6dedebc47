"""Device synchronisations of a sweep, AtP and EAP: a constant per call, none per site.

Every read of a tensor's value on the host (``item``, ``cpu``, ``tolist``, ``numpy``, ``bool``, ``int``,
``float``, ``index``) would wait for an accelerator; on a CPU they are counted by patching those methods.
AtP and EAP read a constant number of values whatever the number of sites (here 24 and 13 measured;
asserted <= 32 and <= 16) and the same for 8 and 16 positions. Activation patching's own code reads a
constant (<= 12) too; per forward, outside this module's files, the metric validates its token ids
(``crosspatch.results.metrics._per_prompt``, 7 reads for ``logit_diff``) and the engine checks a resumed
run's output positions (``execute``, 1 read): at most 8 per forward, asserted, never per site.
"""

from __future__ import annotations

import collections
import traceback

import pytest
import torch

import crosspatch as cp
from conftest import randomize, tiny_gpt2
from crosspatch.methods.attribution import attribution_patching
from crosspatch.methods.edges import eap

READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")
PER_FORWARD_FILES = ("metrics.py", "forward.py")


@pytest.fixture(scope="module")
def m():
    return cp.wrap(randomize(tiny_gpt2()))


def _pair(length):
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(1, 100, (3, length), generator=g)
    corrupt = clean.clone()
    corrupt[:, length // 2] = corrupt[:, length // 2] % 99 + 1
    answer = clean[:, -1]
    return clean, corrupt, cp.metrics.logit_diff(answer, answer % 99 + 1)


def _count(fn, model):
    """``(result, {origin file: host reads}, forwards)`` of one call."""
    counts = collections.Counter()
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name):
        original = saved[name]

        def read(self, *args, **kwargs):
            counts[traceback.extract_stack(limit=2)[0].filename.rsplit("/", 1)[-1]] += 1
            return original(self, *args, **kwargs)

        return read

    forwards = []
    hook = model.transformer.register_forward_pre_hook(lambda *a: forwards.append(1))
    for name in READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        out = fn()
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
        hook.remove()
    return out, counts, len(forwards)


@pytest.mark.parametrize("method,most", [("atp", 32), ("eap", 16)])
def test_gradient_methods_read_a_constant_number_of_values(m, method, most):
    totals = []
    for length in (8, 16):
        clean, corrupt, metric = _pair(length)
        call = (lambda: attribution_patching(m, clean, corrupt, "head_out.*[head=*]", metric)) if method == "atp" \
            else (lambda: eap(m, clean, corrupt, metric))
        _, counts, _ = _count(call, m.module)
        totals.append(sum(counts.values()))
    assert totals[0] == totals[1] <= most, totals


def test_activation_patching_reads_per_call_and_per_forward_never_per_site(m):
    own, per_forward, sites = [], [], []
    for length in (8, 16):
        clean, corrupt, metric = _pair(length)
        result, counts, forwards = _count(
            lambda: cp.activation_patching(m, clean, corrupt, "resid_pre.*[pos=*]", metric, progress=False), m.module)
        outside = sum(v for k, v in counts.items() if k in PER_FORWARD_FILES)
        own.append(sum(counts.values()) - outside)
        per_forward.append(outside / forwards)
        sites.append(result.metadata["sites_run"])
    assert sites[1] > sites[0]  # more sites run ...
    assert own[0] == own[1] <= 12, own  # ... and the same reads of the method's own
    assert max(per_forward) <= 8, per_forward
