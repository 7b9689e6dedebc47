"""MIPS on recurrent networks: closed-form oracles for every stage and end to end.

Hand-set networks (tests/core/mips_nets.py) whose algorithm is known: a running sum (linear, in a
random basis) must come out as ``h += x``; a 2-state parity machine as ``h = h ^ x``. Every change of
basis must leave the outputs unchanged; the verifier must catch wrong programs.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from crosspatch.methods.mips import Alphabet, TaskInfo, extract_program, verify_program
from crosspatch.methods.mips.basis import change_basis, recurrence_matrices
from crosspatch.methods.mips.emit import ProgramSpec, emit
from crosspatch.methods.mips.fsm import Machine, explore, machine_from_data, minimise
from crosspatch.methods.mips.inputs import all_sequences, random_sequences, run_predict
from crosspatch.methods.mips.lattice import find_lattice, real_gcd
from crosspatch.methods.mips.normalise import is_toeplitz, normalise, quantise
from crosspatch.methods.mips.regress import fit_expression
from crosspatch.methods.mips.verify import compile_program
from crosspatch.zoo.algorithmic.rnn import RNNShape, TaskRNN
from mips_nets import PARITY_TASK, SUM_TASK, parity_rnn, parity_truth, running_sum_rnn

SLOW = os.environ.get("CROSSPATCH_SLOW") == "1"


def _random_rnn(f_hidden=(5,), g_hidden=(3,), seed=0, n=3, d=2, out=4) -> TaskRNN:
    torch.manual_seed(seed)
    net = TaskRNN(RNNShape(d, n, out, f_hidden=f_hidden, g_hidden=g_hidden))
    with torch.no_grad():
        net.h0.normal_()
        for p in net.parameters():
            p.mul_(1.5)
    return net.double()


# -- exact changes of basis ------------------------------------------------------------------------


@pytest.mark.parametrize("f_hidden,g_hidden", [((), ()), ((5,), (3,)), ((4, 4), ())])
def test_change_basis_keeps_outputs_and_maps_states(f_hidden, g_hidden):
    net = _random_rnn(f_hidden, g_hidden)
    rng = np.random.default_rng(1)
    a, c = rng.normal(size=(3, 3)) + 3 * np.eye(3), rng.normal(size=3)
    new = change_basis(net, a, c)
    x = torch.as_tensor(random_sequences(Alphabet.product((0, 1, 2), 2), 64, 9, 0), dtype=torch.float64)
    torch.testing.assert_close(new(x), net(x), atol=1e-10, rtol=1e-10)
    h_old, h_new = net.hidden_states(x).detach().numpy(), new.hidden_states(x).detach().numpy()
    np.testing.assert_allclose(h_new, (h_old - c) @ a.T, atol=1e-10)


@pytest.mark.parametrize("f_hidden", [(), (6,)])
def test_normalise_keeps_outputs_and_whitens(f_hidden):
    net = _random_rnn(f_hidden, (), seed=2)
    seqs = random_sequences(Alphabet.product((0, 1), 2), 300, 8, 0)
    norm = normalise(net, seqs)
    x = torch.as_tensor(seqs, dtype=torch.float64)
    torch.testing.assert_close(norm.rnn(x), net(x), atol=1e-8, rtol=1e-8)
    # the recorded map takes the original states to the normalised ones
    h = net.hidden_states(x).detach().numpy().reshape(-1, 3)
    np.testing.assert_allclose(norm.rnn.hidden_states(x).detach().numpy().reshape(-1, 3), (h - norm.c) @ norm.a.T, atol=1e-7)
    assert norm.steps[0].startswith("whitened")


def test_jordan_form_of_a_linear_recurrence():
    """A linear f with known eigenvalues (two real, one complex pair) comes out block-diagonal with them."""
    net = TaskRNN(RNNShape(1, 4, 2)).double()
    rng = np.random.default_rng(3)
    p = rng.normal(size=(4, 4))
    block = np.array([[0.5, 0, 0, 0], [0, -0.3, 0, 0], [0, 0, 0.6, 0.4], [0, 0, -0.4, 0.6]])
    with torch.no_grad():
        net.f[0].weight[:, :4] = torch.tensor(p @ block @ np.linalg.inv(p))
    seqs = random_sequences(Alphabet.product((0, 1), 1), 200, 10, 0)
    norm = normalise(net, seqs)
    w, _, _ = recurrence_matrices(norm.rnn)
    assert "transition matrix in real Jordan form" in norm.steps
    off = w - np.diag(np.diag(w))
    pairs = np.argwhere(np.abs(off) > 1e-8)
    assert len(pairs) == 2 and abs(pairs[0][0] - pairs[0][1]) == 1  # one 2x2 rotation block, adjacent axes
    np.testing.assert_allclose(sorted(off[tuple(pairs.T)]), [-0.4, 0.4], atol=1e-8)
    np.testing.assert_allclose(sorted(np.diag(w)), [-0.3, 0.5, 0.6, 0.6], atol=1e-8)
    torch.testing.assert_close(norm.rnn(torch.as_tensor(seqs, dtype=torch.float64)),
                               net(torch.as_tensor(seqs, dtype=torch.float64)), atol=1e-8, rtol=1e-8)


def test_toeplitz_detection():
    shift = np.eye(4, k=-1)
    assert is_toeplitz(shift) and is_toeplitz(2 * np.eye(3))
    bumped = shift.copy()
    bumped[2, 1] = 0.5
    assert not is_toeplitz(bumped)


def test_quantise_snaps_near_integers_and_keeps_predictions():
    net = parity_rnn().double()
    with torch.no_grad():
        net.f[0].weight.add_(0.01)  # still parity, but no longer integer weights
    seqs = all_sequences(PARITY_TASK.alphabet, 10)
    q = quantise(net, seqs)
    assert q.snapped == q.total == sum(p.numel() for p in net.parameters())
    assert torch.equal(q.rnn.f[0].weight, torch.ones(2, 2, dtype=torch.float64))
    np.testing.assert_array_equal(run_predict(q.rnn, seqs), run_predict(net, seqs))


def test_quantise_refuses_a_snap_that_changes_predictions():
    """A threshold at 0.6 (not 0.5) is needed: rounding its bias to 1/2 would flip outputs, so it stays."""
    net = TaskRNN(RNNShape(1, 1, 1, output_kind="value")).double()
    with torch.no_grad():
        net.f[0].weight[:] = torch.tensor([[0.0, 1.0]])
        net.f[0].bias.zero_()
        net.g[0].weight[:] = torch.tensor([[0.3]])
        net.g[0].bias[:] = torch.tensor([0.32])  # round(0.3 x + 0.32): 0 for x=0, 1 for x=1... and 3 for x=9
    seqs = all_sequences(Alphabet.product(range(10), 1), 1)
    q = quantise(net, seqs)
    np.testing.assert_array_equal(run_predict(q.rnn, seqs), run_predict(net, seqs))
    assert q.snapped < q.total


# -- lattice, machine, regression ------------------------------------------------------------------


def test_real_gcd():
    assert real_gcd(np.array([0.0, 0.7, 2.1, -1.4])) == pytest.approx(0.7)
    assert real_gcd(np.array([1.0, 1.5, 2.5])) == pytest.approx(0.5)
    assert real_gcd(np.array([1.0, np.sqrt(2)])) is None


def test_lattice_recovers_integer_coordinates_in_a_random_basis():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(2, 5))
    origin = rng.normal(size=5)
    z = rng.integers(-4, 9, size=(300, 2))
    points = origin + z @ basis + rng.normal(scale=1e-6, size=(300, 5))
    lat = find_lattice(points, origin)
    assert lat is not None and lat.dim == 2 and lat.residual < 1e-3
    np.testing.assert_allclose(lat.origin + lat.coords @ lat.basis, points, atol=1e-4)
    # the same lattice: the found basis is an integer, unimodular change of the true one
    change = np.linalg.lstsq(basis.T, lat.basis.T, rcond=None)[0]
    np.testing.assert_allclose(change, np.round(change), atol=1e-6)
    assert abs(round(np.linalg.det(np.round(change)))) == 1


def test_lattice_refuses_points_off_any_lattice():
    rng = np.random.default_rng(1)
    assert find_lattice(rng.normal(size=(200, 2)), np.zeros(2)) is None


def test_minimise_merges_equivalent_states():
    # states 1 and 2 behave the same (output 1, then 0 on any input): a 2-state machine
    m = Machine(next=[[1, 2], [0, 0], [0, 0]], out=[0, 1, 1])
    small = minimise(m)
    assert small.size == 2 and small.next == [[1, 1], [0, 0]] and small.out == [0, 1]


def test_explore_reads_the_parity_machine():
    m = minimise(explore(parity_rnn().double(), PARITY_TASK.alphabet))
    assert m.closed and m.size == 2 and m.next == [[0, 1], [1, 0]] and m.out == [0, 1]


def test_machine_read_from_data_clusters_noisy_states():
    """Parity plus a second hidden unit the output ignores, a leaky memory of the inputs
    (``w' = 0.9 w + 0.2 x``): the states seen are spread over hundreds of points, and their clustering
    still gives the 2-state machine."""
    net = TaskRNN(RNNShape(1, 2, 2, f_hidden=(3,))).double()
    with torch.no_grad():
        net.f[0].weight[:] = torch.tensor([[1.0, 0, 1], [1, 0, 1], [0, 0.9, 0.2]])  # reads (h, w, x)
        net.f[0].bias[:] = torch.tensor([0.0, -1.0, 0.0])
        net.f[2].weight[:] = torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 1.0]])
        net.f[2].bias.zero_()
        net.g[0].weight[:] = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
        net.g[0].bias[:] = torch.tensor([0.5, -0.5])
        net.h0.zero_()
    seqs = random_sequences(PARITY_TASK.alphabet, 500, 12, 0)
    states = net.hidden_states(torch.as_tensor(seqs, dtype=torch.float64)).detach().numpy().reshape(-1, 2)
    assert len(np.unique(np.round(states, 6), axis=0)) > 300
    m = minimise(machine_from_data(net, PARITY_TASK.alphabet, seqs))
    assert m.size == 2 and m.next == [[0, 1], [1, 0]] and m.out == [0, 1]


@pytest.mark.parametrize("rows,target,text", [
    ([[3, 1], [4, 0], [0, 2], [5, 5]], [4, 4, 2, 10], "h + x"),
    ([[0, 1], [1, 1], [1, 0], [0, 0]], [1, 0, 1, 0], "h ^ x"),
    ([[0, 2], [1, 2], [2, 2], [2, 1]], [2, 0, 1, 0], "(h + x) % 3"),
    ([[0, 5], [7, 2], [3, 3], [4, 1], [2, 6]], [5, 7, 3, 4, 6], "max(h, x)"),
])
def test_regression_finds_the_formula(rows, target, text):
    fit = fit_expression(np.array(rows), np.array(target), ["h", "x"])
    assert fit is not None and fit.text == text


def test_regression_gives_up_on_a_non_function():
    assert fit_expression(np.array([[0, 1], [0, 1]]), np.array([0, 1]), ["h", "x"]) is None


# -- emission and verification ---------------------------------------------------------------------


def test_table_program_runs_standalone():
    spec = ProgramSpec("t", ["h"], [0], ["x"], update_table={(0, 0): 0, (0, 1): 1, (1, 0): 1, (1, 1): 0},
                       output_table={0: 0, 1: 1})
    text = emit(spec)
    assert "import" not in text
    assert compile_program(text)([1, 1, 0, 1]) == parity_truth([1, 1, 0, 1])


def test_verifier_catches_a_wrong_program():
    net = parity_rnn()
    wrong = emit(ProgramSpec("wrong", ["h"], [0], ["x"], update=["h | x"], output="h"))
    ver = verify_program(wrong, net, PARITY_TASK.alphabet, parity_truth, length=8)
    assert ver.network_mode == "exhaustive" and ver.network_checked == 256
    # "h | x" agrees with parity exactly on inputs whose ones come before at most one 1: count them
    agree = sum(1 for s in all_sequences(PARITY_TASK.alphabet, 8)[..., 0].tolist()
                if [min(1, sum(s[: i + 1])) for i in range(8)] == parity_truth(s))
    assert ver.network_mismatches == 256 - agree > 0 and not ver.solved and ver.examples


def test_verifier_separates_network_from_truth():
    """A program equal to the network but not to the stated truth is not solved."""
    net = parity_rnn()
    right = emit(ProgramSpec("parity", ["h"], [0], ["x"], update=["h ^ x"], output="h"))
    ver = verify_program(right, net, PARITY_TASK.alphabet, lambda xs: [0] * len(xs), length=8)
    assert ver.matches_network and not ver.matches_truth and not ver.solved


def test_compile_program_refuses_imports():
    with pytest.raises(ValueError, match="standalone"):
        compile_program("import torch\ndef program(xs):\n    return xs\n")


# -- end to end ------------------------------------------------------------------------------------


def test_running_sum_comes_out_as_h_plus_equals_x(tmp_path):
    result = extract_program(running_sum_rnn(), SUM_TASK, tmp_path, progress=False)
    assert result.solved, result.reason
    assert result.route == "integer lattice"
    assert "        h += x\n" in result.program and "out.append(h)" in result.program
    assert result.verification.network_mode == "exhaustive"
    assert result.verification.network_checked == 2 ** 12
    assert result.normalised_equal and result.normalised_max_error < 1e-9
    assert {p.name for p in tmp_path.iterdir()} == {"program.py", "verification.json", "lattice.png"}


def test_running_sum_in_a_random_basis():
    """A 3-d hidden state with a random direction and offset: normalisation and the lattice undo them."""
    result = extract_program(running_sum_rnn(hidden_dim=3, seed=4), SUM_TASK, progress=False)
    assert result.solved, result.reason
    assert "        h += x\n" in result.program
    assert result.lattice["dim"] == 1


def test_parity_machine_comes_out_as_xor():
    result = extract_program(parity_rnn(), PARITY_TASK, progress=False)
    assert result.solved, result.reason
    assert result.route == "finite-state machine" and result.machine_states == 2
    assert "        h = h ^ x\n" in result.program


def test_unknown_truth_is_never_solved():
    result = extract_program(parity_rnn(), TaskInfo("parity", PARITY_TASK.alphabet, None), progress=False)
    assert result.program is not None and not result.solved and "no ground truth" in result.reason


@pytest.mark.skipif(not SLOW, reason="exhaustive check over 3**12 inputs; set CROSSPATCH_SLOW=1")
def test_running_sum_over_three_symbols_exhaustively():
    task = TaskInfo("sum", Alphabet.product((0, 1, 2), 1), SUM_TASK.truth)
    result = extract_program(running_sum_rnn(hidden_dim=2, seed=1), task, progress=False)
    assert result.solved and result.verification.network_checked == 3 ** 12
