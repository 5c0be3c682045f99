"""--ray on a simulated multi-node cluster (Ray's own ``ray.cluster_utils.Cluster``: a head and
worker nodes, each a real raylet on this machine): a worker node lost mid-run -- its task is
retried on a node added meanwhile -- leaves the result and stdout exactly those of a
single-process run, for ``rank --json``, ``gate --json`` and ``verify --ray --json``.

The head node has no CPUs, so every task runs on a worker node: the run can only finish on the
node added after the first one was removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from ckptsel.cli import main

ray = pytest.importorskip("ray", reason="ray is in the dev extra; CI installs it")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

FAST = ["--max-examples", "6", "-k", "2", "--quiet"]


def _argv(command: str, run, cache) -> list[str]:
    common = ["--recipe", str(run / "recipe.yaml"), "--cache-dir", str(cache), "--json"]
    if command == "verify":
        return ["verify", str(run), "--test-file", str(run / "test.jsonl"), "--greedy", "--limit", "4",
                "--device", "cpu", "-q", *common]
    return [command, str(run), "--data", str(run / "train.jsonl"), *FAST, *common]


def _comparable(command: str, out: dict) -> dict:
    """The parts of a command's JSON that must not depend on where it ran."""
    out = dict(out)
    out.pop("cache", None)
    if command == "verify":
        return {"accuracies": [c["accuracy"] for v in out["verifications"] for c in v["checkpoints"]]}
    return out


def _running_tasks() -> int:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return sum("ray::" in line and ("measure_items" in line or "evaluate" in line) for line in ps.splitlines())


def _announce_node_death(cluster, until: threading.Event) -> threading.Thread:
    """What a dying node's agent publishes to every driver when it finds its raylet gone, whenever
    it gets to it (the driver's error listener prints it to stdout, unless ckptsel keeps it off).
    The agent does not always get to it before it is killed too, and when it does the moment
    varies, so the test sends it itself, every 50 ms until the command has exited: the message
    arrives during the measurement, while the JSON is written and during Ray's shutdown."""
    from ray._private import ray_constants
    from ray._private.utils import publish_error_to_driver
    from ray._raylet import GcsClient

    gcs = GcsClient(address=cluster.gcs_address)

    def announce():
        n = 0
        while not until.is_set():
            n += 1
            message = (f"Raylet is terminated. Termination is unexpected. ({n}) Possible reasons include: (1) SIGKILL "
                       "by the user or system OOM killer. Last 20 lines of the Raylet logs:\n    ...")
            publish_error_to_driver(ray_constants.RAYLET_DIED_ERROR, message, gcs_client=gcs)
            time.sleep(0.05)

    thread = threading.Thread(target=announce, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    yield cluster
    cluster.shutdown()


@pytest.mark.parametrize("command", ["rank", "gate", "verify"])
def test_a_node_lost_mid_run_leaves_the_single_process_result_and_clean_json(command, learning_run, cluster,
                                                                            tmp_path):
    single = CliRunner().invoke(main, _argv(command, learning_run, tmp_path / "single"))
    assert single.exit_code in (0, 1), single.output  # gate: 1 is a verdict, not an error

    first = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    argv = [*_argv(command, learning_run, tmp_path / "cluster"), "--ray", cluster.address, "--ray-cpus", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    proc = subprocess.Popen([sys.executable, "-m", "ckptsel", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    exited = threading.Event()
    try:
        deadline = time.time() + 180
        while _running_tasks() == 0 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the command ended before a task ran on the worker node"
        cluster.remove_node(first)  # as a preempted machine: its raylet and workers die at once
        announcer = _announce_node_death(cluster, until=exited)
        time.sleep(1.0)
        cluster.add_node(num_cpus=1)  # the only node left with CPUs: the run finishes here or not at all
        out, err = proc.communicate(timeout=300)
    finally:
        exited.set()
        if proc.poll() is None:
            proc.kill()
    announcer.join()
    assert proc.returncode == single.exit_code, err
    assert "Raylet is terminated" in err  # Ray's message reached the user, on stderr
    document = json.loads(out)  # exactly one JSON document: nothing of Ray's before or after it
    assert _rounded(_comparable(command, document)) == _rounded(_comparable(command, json.loads(single.stdout)))


def test_the_head_node_lost_ends_with_one_line_and_a_rerun_measures_only_the_rest(learning_run, tmp_path):
    """The head (here also the driver's own node) cannot be survived: exit 2, one line saying to
    rerun, nothing on stdout; what came back before is stored, so the rerun loads fewer checkpoints."""
    from ray.cluster_utils import Cluster

    from ckptsel.store import Store

    # All 24 examples, so that each checkpoint takes a while and the head goes while the run is mid-way.
    every = ["--max-examples", "24"]
    single = CliRunner().invoke(main, [*_argv("rank", learning_run, tmp_path / "single"), *every])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cache = tmp_path / "cluster"
    argv = [*_argv("rank", learning_run, cache), *every, "--ray", cluster.address, "--ray-cpus", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    proc = subprocess.Popen([sys.executable, "-m", "ckptsel", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        deadline, stored = time.time() + 180, 0
        while stored == 0 and proc.poll() is None and time.time() < deadline:
            if (cache / "results.sqlite3").exists():
                with Store.open(cache) as store:
                    stored = len(store.checkpoints())
            time.sleep(0.05)
        assert stored >= 1 and proc.poll() is None, "no checkpoint was stored before the run ended"
        cluster.remove_node(cluster.head_node)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.shutdown()
    assert proc.returncode == 2, err
    assert out == ""
    ours = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(ours) == 1 and "rerun the same command to measure only the rest" in ours[0]
    rerun = CliRunner().invoke(main, [*_argv("rank", learning_run, cache), *every])
    assert rerun.exit_code == 0, rerun.output
    again = json.loads(rerun.stdout)
    assert 0 < again["cache"]["from_cache"] and again["cache"]["measured"] < len(again["checkpoints"])
    # The checkpoints measured on Ray before the head went and those measured here agree to ~1e-9
    # (a perturbed-prompt NLL measured in a Ray worker differed from the in-process one in the 10th
    # digit once): compared to 6 significant digits.
    assert _rounded(_comparable("rank", again)) == _rounded(_comparable("rank", json.loads(single.stdout)))


def _rounded(value):
    """``value`` with every float rounded to 6 significant digits (nested dicts and lists)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value
