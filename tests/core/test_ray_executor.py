"""The Ray executor on a local two-CPU Ray cluster that this module starts through the executor itself
and stops: no socket of that cluster listens off loopback; the same Result as the local run; a killed
actor replaced and its shard retried; a study with tensor answers that fails part-way names the shard
and resumes from its saved shards, for a factory, a zoo name and an in-process model."""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from pathlib import Path

import pytest
import ray

import conftest
import fake_zoo
import sharding_cases
import crosspatch as cp
from conftest import randomize, tiny_gpt2
from crosspatch.scale.ray_executor import RayExecutor, release_actors
from sharding_cases import (
    SITES, assert_same_result, fail_then_resume, failing_metric, make_prompts, model_source, per_prompt_metric,
    tensor_metric,
)

_BY_VALUE = (conftest, sharding_cases, fake_zoo)


def _register_fake_zoo():
    """Runs in every Ray worker as it starts: the test's zoo model, as a plugin would register it."""
    from crosspatch.plugins.registry import get_registry

    get_registry().register(fake_zoo.plugin(), "fake-zoo")


@pytest.fixture(scope="module")
def zoo_cache(tmp_path_factory):
    """The crosspatch cache the workers build the test's zoo model in; the driver's local run uses it too,
    so both load the same folder (the Result's metadata names it)."""
    return tmp_path_factory.mktemp("zoo-cache")


@pytest.fixture
def driver_zoo(zoo_cache, monkeypatch):
    from crosspatch.plugins.registry import get_registry, reset_registry

    monkeypatch.setenv("CROSSPATCH_CACHE", str(zoo_cache))
    reset_registry()
    get_registry().register(fake_zoo.plugin(), "fake-zoo")
    yield
    reset_registry()


@pytest.fixture(scope="module", autouse=True)
def cluster(zoo_cache):
    """One local cluster for the module, started as a user's first study starts it (no address: this
    machine only); starting Ray costs seconds, so the tests share it."""
    assert not ray.is_initialized(), "another test left Ray running"
    address = os.environ.pop("RAY_ADDRESS", None)
    # Workers cannot import the test modules: ship their classes and functions by value.
    for module in (sys.modules[__name__], *_BY_VALUE):
        ray.cloudpickle.register_pickle_by_value(module)
    RayExecutor(init_options=dict(
        num_cpus=2, log_to_driver=False, configure_logging=False,
        runtime_env={"worker_process_setup_hook": _register_fake_zoo, "env_vars": {"CROSSPATCH_CACHE": str(zoo_cache)}},
    )).connect()
    yield
    release_actors()
    ray.shutdown()
    for module in (sys.modules[__name__], *_BY_VALUE):
        ray.cloudpickle.unregister_pickle_by_value(module)
    if address is not None:
        os.environ["RAY_ADDRESS"] = address


@pytest.fixture(scope="module")
def prompts():
    return make_prompts()


def make_model():
    """A picklable zero-argument factory, as a user would pass for a model built in code."""
    return randomize(tiny_gpt2())


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def _proc_sockets(pids: list[int]) -> list[tuple[int, str, int]]:
    """Listening TCP and bound UDP sockets of ``pids``: /proc/net/{tcp,udp}[6] by inode, matched to the
    processes' open files."""
    by_inode: dict[str, tuple[str, int]] = {}
    for name in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if name.startswith("tcp") and state != "0A":  # 0A: LISTEN
                continue
            host, port = local.split(":")
            raw = bytes.fromhex(host)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is little-endian
            by_inode[inode] = (str(ipaddress.ip_address(raw)), int(port, 16))
    found = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:  # closed meanwhile
                continue
            if link.startswith("socket:[") and link[8:-1] in by_inode:
                found.append((pid, *by_inode[link[8:-1]]))
    return found


def _listening_sockets() -> tuple[list[tuple[int, str, int]], str]:
    """Every listening TCP / bound UDP socket of this process and the Ray processes it started."""
    try:
        import psutil
    except ImportError:
        if not Path("/proc/net/tcp").exists():
            pytest.skip("neither psutil nor /proc/net/tcp is available to list the cluster's sockets")
        return _proc_sockets(_descendants(os.getpid())), "/proc"
    me = psutil.Process()
    found = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr):  # SOCK_DGRAM bound
                found.append((proc.pid, c.laddr.ip, c.laddr.port))
    return found, "psutil"


def _loopback(host: str) -> bool:
    address = ipaddress.ip_address(host.split("%")[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def test_the_started_cluster_listens_on_loopback_only():
    """GCS, raylet, agents and every worker: a socket on 0.0.0.0, :: or the machine's address would let
    anyone who reaches this machine run code in the cluster."""

    @ray.remote(num_cpus=0)
    class Probe:
        def pid(self):
            return os.getpid()

    probe = Probe.remote()
    worker = ray.get(probe.pid.remote())  # a worker process with its own server
    try:
        sockets, how = _listening_sockets()
        from_proc = _proc_sockets(_descendants(os.getpid())) if Path("/proc/net/tcp").exists() else sockets
    finally:
        ray.kill(probe)
    assert {port for _, _, port in from_proc} == {port for _, _, port in sockets}, f"/proc and psutil agree: {sorted(from_proc)} {sorted(sockets)}"
    assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
    outward = [s for s in sockets if not _loopback(s[1])]
    assert not outward, f"listening off loopback ({how}): {outward}"
    assert len(sockets) >= 4 and worker in {pid for pid, _, _ in sockets}, f"found too few to prove anything: {sockets}"


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


@pytest.mark.parametrize("source", ["factory", "zoo", "module"])
def test_a_study_with_tensor_answers_fails_by_shard_and_resumes(source, prompts, tmp_path, caplog, request):
    """The README's metric (tensor answers) comes back from an actor unpickled: its study key must not
    change, so a rerun loads the saved shards and runs only the failed block."""
    clean, corrupt = prompts
    spec, local = model_source(source, request, "driver_zoo", make_model)
    failing, flag, log = failing_metric(tmp_path)
    ex = RayExecutor(rows_per_shard=2, sites_per_shard=8, max_retries=1, checkpoint_dir=tmp_path / "shards",
                     keep_actors=True)
    run = lambda: cp.activation_patching(spec, clean, corrupt, SITES, failing, batch_size=16, executor=ex)  # noqa: E731
    _, got = fail_then_resume(run, flag, log, caplog, r"shard 2 \(\d site\(s\) .*prompt rows 4:6\) failed on all 2 "
                                                      r"attempts: RuntimeError: injected failure for prompt 5")
    assert "reusing 2 running actor(s)" in caplog.text, "keep_actors: the next study finds the model loaded"
    assert_same_result(got, cp.activation_patching(local, clean, corrupt, SITES, tensor_metric(), batch_size=16))


def test_actors_asking_for_what_the_cluster_lacks_are_refused(prompts, tmp_path):
    clean, corrupt = prompts
    with pytest.raises(ValueError, match=r"each actor asks for 1 GPU but the Ray cluster has 0"):
        cp.activation_patching(make_model, clean, corrupt, SITES, per_prompt_metric(),
                               executor=RayExecutor(num_gpus_per_actor=1, checkpoint_dir=tmp_path))
