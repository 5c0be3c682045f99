"""`--ray`: checkpoints measured as tasks on a real local Ray cluster give the single-process results,
survive a worker killed mid-task, and a killed driver's rerun measures only what is missing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from ckptsel.cli import main

ray = pytest.importorskip("ray", reason="ray is in the dev extra; CI installs it")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

FAST = ["--max-examples", "6", "-k", "2", "--quiet"]


def _args(run, cache, *extra):
    return ["rank", str(run), "--data", str(run / "train.jsonl"), "--recipe", str(run / "recipe.yaml"),
            "--cache-dir", str(cache), *FAST, "--json", *extra]


def _without_cache(out: dict) -> dict:
    out = dict(out)
    out.pop("cache")
    return out


@pytest.fixture(scope="module")
def reference(learning_run, tmp_path_factory):
    """The single-process ranking of the learning run (its JSON)."""
    cache = tmp_path_factory.mktemp("ray-ref")
    result = CliRunner().invoke(main, _args(learning_run, cache))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the in-process tests of this module (2 CPUs: two tasks at once)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}


def test_rank_with_ray_gives_the_single_process_json(learning_run, reference, local_ray, tmp_path):
    result = CliRunner().invoke(main, _args(learning_run, tmp_path, "--ray"))
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["cache"] == {"measured": reference["cache"]["measured"], "from_cache": 0}
    assert _without_cache(out) == _without_cache(reference)  # field by field
    again = CliRunner().invoke(main, _args(learning_run, tmp_path, "--ray"))
    assert json.loads(again.stdout)["cache"]["measured"] == 0


def test_a_lora_run_on_ray_groups_adapters_by_base(lab_lora_run, local_ray, tmp_path):
    single = CliRunner().invoke(main, _args(lab_lora_run, tmp_path / "one"))
    spread = CliRunner().invoke(main, _args(lab_lora_run, tmp_path / "ray", "--ray"))
    assert single.exit_code == spread.exit_code == 0, spread.output
    assert _without_cache(json.loads(spread.stdout)) == _without_cache(json.loads(single.stdout))


def test_a_sweep_on_ray_measures_its_runs_at_once_with_the_single_process_json(learning_run, lab_lora_run,
                                                                              local_ray, tmp_path):
    """Two runs in one sweep: measured concurrently (one driver thread each), same JSON as one process."""
    sweep = tmp_path / "sweep"
    shutil.copytree(learning_run, sweep / "full")
    shutil.copytree(lab_lora_run, sweep / "lora")
    args = ["rank", str(sweep), "--data-per-run", "train.jsonl", "--recipe", str(learning_run / "recipe.yaml"),
            *FAST, "--json"]
    single = CliRunner().invoke(main, [*args, "--cache-dir", str(tmp_path / "one")])
    spread = CliRunner().invoke(main, [*args, "--cache-dir", str(tmp_path / "ray"), "--ray"])
    assert single.exit_code == spread.exit_code == 0, spread.output
    one, many = json.loads(single.stdout), json.loads(spread.stdout)
    assert [r["name"] for r in one["runs"]] == ["full", "lora"]
    assert many["cache"] == one["cache"]
    assert _without_cache(many) == _without_cache(one)


def test_checkpoints_saved_since_the_last_rank_are_measured_on_ray(learning_run, local_ray, tmp_path):
    """A run ranked at three checkpoints, then on Ray once it has saved one more, with the
    alternative-solution set fixed at the first rank (stored in the result store): the new
    checkpoint is measured and the rest read from the store, as without Ray. (The lab sweep
    stopped here with a KeyError: the Ray path never took the stored set's series.)"""
    import sqlite3

    run = tmp_path / "run"
    run.mkdir()
    for name in ("train.jsonl", "recipe.yaml"):
        shutil.copy(learning_run / name, run / name)
    steps = sorted(learning_run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for ckpt in steps[:3]:
        shutil.copytree(ckpt, run / ckpt.name)
    assert CliRunner().invoke(main, _args(run, tmp_path / "cache")).exit_code == 0
    # The tiny run's samples give no alternative solution, so the set stays open: fix it as a run
    # that had found them at its first checkpoint would have.
    from ckptsel import store_keys
    from ckptsel.proxies import Harvest
    from ckptsel.recipes import load_recipe

    db = sqlite3.connect(tmp_path / "cache" / "results.sqlite3")
    ((settings,),) = db.execute("SELECT DISTINCT settings FROM series").fetchall()
    ((anchor,),) = db.execute("SELECT fingerprint FROM checkpoints WHERE path = ?",
                              (str(run / steps[0].name),)).fetchall()
    key = store_keys.alt_harvest(settings, anchor, load_recipe(run / "recipe.yaml").proxies)
    assert not db.execute("SELECT 1 FROM kv WHERE key = ?", (key,)).fetchall()  # never fixed by itself
    fixed = Harvest(sources=[anchor], found={anchor: {}}, fixed=True)
    db.execute("INSERT INTO kv (key, value, updated) VALUES (?, ?, 0)", (key, json.dumps(fixed.to_json())))
    db.commit()
    db.close()
    for ckpt in steps[3:]:
        shutil.copytree(ckpt, run / ckpt.name)
    single = tmp_path / "single"
    shutil.copytree(tmp_path / "cache", single)
    on_ray = CliRunner().invoke(main, _args(run, tmp_path / "cache", "--ray"))
    alone = CliRunner().invoke(main, _args(run, single))
    assert on_ray.exit_code == alone.exit_code == 0, on_ray.output
    out = json.loads(on_ray.stdout)
    assert out["cache"]["measured"] == len(steps) - 3
    assert _without_cache(out) == _without_cache(json.loads(alone.stdout))


def test_verify_with_ray_measures_what_lm_eval_measures_in_process(learning_run, local_ray, tmp_path):
    args = ["verify", str(learning_run), "--test-file", str(learning_run / "test.jsonl"), "--recipe",
            str(learning_run / "recipe.yaml"), "--greedy", "--limit", "4", "--device", "cpu", "--json", "-q"]
    single = CliRunner().invoke(main, [*args, "--cache-dir", str(tmp_path / "one")])
    spread = CliRunner().invoke(main, [*args, "--cache-dir", str(tmp_path / "ray"), "--ray"])
    assert single.exit_code == spread.exit_code == 0, spread.output
    one, many = (json.loads(r.stdout)["verifications"][0]["checkpoints"] for r in (single, spread))
    assert [c["accuracy"] for c in many] == [c["accuracy"] for c in one] and len(one) == 4
    assert not any(c["from_cache"] for c in many)


def test_groups_split_a_base_over_the_slots():
    from ckptsel.collect import _groups
    from ckptsel.discover import Checkpoint
    from ckptsel.formats import PEFT_ADAPTER, SAFETENSORS

    ckpts = [Checkpoint(path=f"/r/checkpoint-{i}", format=PEFT_ADAPTER, base_model="/base") for i in range(5)]
    ckpts.append(Checkpoint(path="/full", format=SAFETENSORS))
    assert _groups(list(range(6)), ckpts, slots=2) == [[5], [0, 1, 2], [3, 4]]
    assert _groups(list(range(6)), ckpts, slots=8) == [[5], [0], [1], [2], [3], [4]]


def _store_is_whole(cache, out: dict, n_examples: int) -> None:
    from ckptsel.store import Store

    with Store.open(cache) as store:
        for row in out["checkpoints"]:
            for kind in ("score", "sample"):
                assert store.count(row["fingerprint"], out["settings_key"], kind) == n_examples


def test_a_worker_killed_mid_task_is_retried_and_nothing_is_lost(learning_run, reference, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "ckptsel", *_args(learning_run, tmp_path, "--ray")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    killed = None
    deadline = time.time() + 240
    try:
        while killed is None and proc.poll() is None and time.time() < deadline:
            ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
            busy = [int(line.split()[0]) for line in ps.splitlines() if "ray::measure_items" in line]
            if busy:
                killed = busy[0]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert killed is not None, "no task was seen running"
    assert proc.returncode == 0, err
    ranked = json.loads(out)
    assert _without_cache(ranked) == _without_cache(reference)
    _store_is_whole(tmp_path, ranked, reference["n_examples"])


def test_a_killed_driver_reruns_only_what_is_missing(learning_run, reference, tmp_path):
    from ckptsel.store import Store

    run = tmp_path / "run"
    shutil.copytree(learning_run, run)
    proc = subprocess.Popen([sys.executable, "-m", "ckptsel", *_args(run, tmp_path / "cache", "--ray")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), start_new_session=True)
    deadline = time.time() + 240
    seen = 0
    try:
        while proc.poll() is None and time.time() < deadline and seen == 0:
            if (tmp_path / "cache").exists():
                try:
                    with Store.open(tmp_path / "cache") as store:
                        seen = len(store.checkpoints())
                except Exception:  # the store is being created
                    pass
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    assert seen >= 1, "the driver finished no checkpoint before the deadline"
    rerun = CliRunner().invoke(main, _args(run, tmp_path / "cache"))
    assert rerun.exit_code == 0, rerun.output
    out = json.loads(rerun.stdout)
    assert out["cache"]["measured"] < len(out["checkpoints"])  # what the killed driver stored is kept
    expected = _without_cache(reference)
    got = _without_cache(out)
    for row in expected["checkpoints"] + got["checkpoints"]:
        row["path"] = row["path"].rsplit("/", 1)[-1]  # the copy lives elsewhere
    expected["recommended"]["path"] = expected["recommended"]["path"].rsplit("/", 1)[-1]
    got["recommended"]["path"] = got["recommended"]["path"].rsplit("/", 1)[-1]
    for r in expected["runs"] + got["runs"]:
        r["path"] = None
        r["recommended"]["path"] = r["recommended"]["path"].rsplit("/", 1)[-1]
    assert got == expected
    _store_is_whole(tmp_path / "cache", out, reference["n_examples"])


def test_without_ray_installed_it_is_one_line_saying_what_to_install(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    result = CliRunner().invoke(main, _args(tiny_run, tmp_path, "--ray"))
    assert result.exit_code == 2
    assert "pip install 'ckptsel[ray]'" in result.output and "Traceback" not in result.output
