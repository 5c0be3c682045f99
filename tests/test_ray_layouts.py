"""`--ray` on checkpoints read through converted copies (DeepSpeed ZeRO): the workers read one copy per
checkpoint, made once across the cluster, and the numbers are those of the single-process ranking."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptsel.cli import main

ray = pytest.importorskip("ray", reason="ray is in the dev extra; CI installs it")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

FAST = ["--max-examples", "6", "-k", "2", "--max-new-tokens", "24", "--quiet", "--json"]


def _counting_hook(log: str):
    """A function that makes every conversion of this process append a line to ``log``: run in each Ray worker
    as it starts (Ray's worker_process_setup_hook) and in this process, so conversions anywhere are counted."""

    def hook():
        import ckptsel.formats.zero as zero

        original = zero.converted_copy
        if getattr(original, "counting", False):
            return

        def counting(ckpt, cache_dir, convert, *, what):
            def counted(folder):
                import ray

                task = ray.get_runtime_context().get_task_name() if ray.is_initialized() else None
                with open(log, "a") as fh:
                    fh.write(f"{os.getpid()} {ckpt.path.name} {task}\n")
                convert(folder)

            return original(ckpt, cache_dir, counted, what=what)

        counting.counting = True
        zero.converted_copy = counting

    return hook


@pytest.fixture
def conversions(tmp_path, monkeypatch):
    """A local Ray (2 CPUs: two tasks at once) whose workers, and this process, count conversions into a file;
    yields a function returning (process, checkpoint name, Ray task name) of each conversion so far."""
    import ckptsel.formats.zero as zero

    log = tmp_path / "conversions.log"
    log.touch()
    hook = _counting_hook(str(log))
    monkeypatch.setattr(zero, "converted_copy", zero.converted_copy)  # restored after the test
    hook()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"worker_process_setup_hook": hook})
    yield lambda: [line.split() for line in log.read_text().splitlines()]
    ray.shutdown()


def _rank(run: Path, cache: Path, *extra) -> dict:
    args = ["rank", str(run), "--data", str(run / "train.jsonl"), "--recipe", str(run / "recipe.yaml"),
            "--cache-dir", str(cache), "--allow-pickle", *FAST, *extra]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    out.pop("cache")
    return out


def test_ranking_a_zero_run_on_ray_converts_each_checkpoint_once_and_gives_the_single_process_numbers(
        zero_stack, tmp_path, conversions):
    run = shutil.copytree(zero_stack / "zero2", tmp_path / "zero")
    spread = _rank(run, tmp_path / "cache-ray", "--ray")
    made = conversions()
    assert sorted(name for _, name, _ in made) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert str(os.getpid()) not in {pid for pid, _, _ in made}  # the workers converted, not this process
    assert {task for _, _, task in made} == {"prepare_copy"}  # one item each before any measuring
    copies = sorted(p.name for p in (tmp_path / "cache-ray" / "converted").iterdir() if p.is_dir())
    assert copies == sorted(c["fingerprint"] for c in spread["checkpoints"])

    single = _rank(run, tmp_path / "cache-one")  # in this process, into a cache of its own
    assert len(conversions()) == 6
    assert spread == single  # field by field
    assert len({c["target_nll"] for c in spread["checkpoints"]}) == 3

    again = _rank(run, tmp_path / "cache-ray", "--ray", "-k", "3")  # measured anew on Ray: the copies are read
    assert len(conversions()) == 6 and len(again["checkpoints"]) == 3

    verified = CliRunner().invoke(main, [  # verify's Ray workers read the same copies
        "verify", str(run), "--test-file", str(run / "train.jsonl"), "--recipe", str(run / "recipe.yaml"), "--limit",
        "2", "-k", "1", "--max-new-tokens", "8", "--cache-dir", str(tmp_path / "cache-ray"), "--allow-pickle", "--ray",
        "--json", "-q"], catch_exceptions=False)
    assert verified.exit_code == 0, verified.output
    rows = json.loads(verified.stdout)["verifications"][0]["checkpoints"]
    assert [r["error"] for r in rows] == [None] * 3 and all(r["n"] == 2 for r in rows)
    assert len(conversions()) == 6
