"""Decompiling a transformer trained here (zoo ``bit-shift-right-2-transformer``: trains for a few minutes
on first use, so only with CROSSPATCH_SLOW=1): the emitted program equals the network and the task's
answer on every input of lengths 1..8, and reads the task's algorithm off the head: copy the token two
positions back."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from crosspatch.methods.decompile import extract_program
from crosspatch.zoo.algorithmic.tasks import get_algorithmic_task

pytestmark = pytest.mark.skipif(not os.environ.get("CROSSPATCH_SLOW"), reason="trains a zoo transformer (CROSSPATCH_SLOW=1)")


def test_bit_shift_right_2_decompiles_to_a_copy_two_back(tmp_path):
    report = extract_program("bit-shift-right-2-transformer", out=tmp_path, progress=False, ablation_steps=20)
    v = report.verification
    assert v.sequences == sum(2**n for n in range(1, 9))
    assert report.decompiles and v.model_sequences == v.sequences
    assert v.truth_sequences == v.sequences  # and it is the task's answer everywhere
    heads = [op for op in report.program.operations if op.node.startswith("head_out")]
    assert any((op.keys, op.queries, op.predicate, op.value) == ("indices", "indices-2", "EQ", "tokens") for op in heads)
    task = get_algorithmic_task("bit-shift-right-2")
    seq = [1, 0, 1, 1, 0]
    code = f"import runpy; print(runpy.run_path({str(tmp_path / 'program.py')!r})['program']({seq!r}))"
    done = subprocess.run([sys.executable, "-S", "-I", "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == repr(task.truth(seq))
