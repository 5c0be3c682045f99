"""Bad inputs, as a hostile user gives them: every case ends in its documented exit code with one
line naming the file, line or field at fault, no traceback, and the inputs byte-identical. Checkpoints
that are converted into the cache (FSDP, DeepSpeed ZeRO) leave no partial copy there when they fail.

Exit codes (ckptsel.cli): 2 usage or input error, 3 some checkpoints could not be measured,
4 internal error; 0 where the input is only suspicious and a warning names it. The cases marked
``# issue 19`` crashed with a traceback and exit 1, or answered silently or with the wrong
code, before the robustness work.

Outputs that cannot be written are tested on real filesystems: a read-only tmpfs, a tmpfs
that runs out of inodes, a nearly full tmpfs, and a file-size limit (``ulimit -f``). Mounting
needs root; where it is not permitted those cases are skipped (the file-size case is not).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptsel.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")

FAST = ["--max-examples", "2", "-k", "1", "-q"]


def tree_hash(root: Path) -> str:
    """Names, sizes and contents of every file under ``root``."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@pytest.fixture(scope="module")
def warm_cache(tiny_run, tmp_path_factory):
    """A result store holding tiny_run measured with FAST: the cases rank from it without loading a model."""
    cache = tmp_path_factory.mktemp("warm-cache")
    result = CliRunner().invoke(main, ["rank", str(tiny_run), "--data", str(tiny_run / "train.jsonl"), "--recipe",
                                       str(tiny_run / "recipe.yaml"), "--cache-dir", str(cache), *FAST])
    assert result.exit_code == 0, result.output
    return cache


class Tools:
    """What a case builds its inputs with: everything under ``inputs`` is hashed before and after."""

    def __init__(self, tiny_run: Path, tmp: Path, warm_cache: Path):
        self.tiny_run, self.tmp = tiny_run, tmp
        self.inputs = tmp / "in"
        self.inputs.mkdir()
        self.out = tmp / "out"
        self.out.mkdir()
        self.cache = tmp / "cache"
        shutil.copytree(warm_cache, self.cache)
        self.env: dict[str, str] = {}
        self.subprocess = False  # run `python -m ckptsel` in a child process (for resource limits)
        self.limit_fsize: int | None = None
        self._mounts: list[Path] = []
        self._children: list[subprocess.Popen] = []
        self.request = None  # pytest's, for the training-stack fixtures (built only when a case asks)

    # -- inputs
    def run(self, name: str = "run") -> Path:
        run = self.inputs / name
        shutil.copytree(self.tiny_run, run)
        return run

    def stack(self, fixture: str, layout: str) -> Path:
        """A copy of a layout a training stack wrote (conftest.py's ``fsdp_stack``, ``zero_stack``), named ``run``."""
        run = self.inputs / "run"
        shutil.copytree(self.request.getfixturevalue(fixture) / layout, run)
        return run

    def jsonl(self, name: str, rows: list) -> Path:
        path = self.inputs / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        return path

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in (self.tiny_run / "train.jsonl").read_text().splitlines()]

    def recipe(self) -> str:
        return str(self.tiny_run / "recipe.yaml")

    def rank(self, run: Path, data: Path | None = None, *extra, command: str = "rank") -> list[str]:
        data = data or run / "train.jsonl"
        return [command, str(run), "--data", str(data), "--recipe", self.recipe(), "--cache-dir", str(self.cache),
                *FAST, *extra]

    # -- filesystems the test really fills
    def mount(self, name: str, options: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        where = self.tmp / name
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                              check=False)
        if done.returncode != 0:
            pytest.skip(f"mount not permitted here: {done.stderr.decode().strip()}")
        self._mounts.append(where)
        return where

    def hold_store_lock(self) -> None:
        self._children.append(hold_lock(self.cache / "results.sqlite3"))

    def close(self) -> None:
        for child in self._children:
            child.kill()
            child.wait()
        for where in self._mounts:
            subprocess.run(["umount", "-l", str(where)], check=False)


def hold_lock(store: Path) -> subprocess.Popen:
    """Another process takes the store's write lock (BEGIN EXCLUSIVE) and keeps it until killed."""
    code = ("import sqlite3, sys, time\n"
            "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "db.execute('BEGIN EXCLUSIVE')\nprint('locked', flush=True)\ntime.sleep(120)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(store)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def truncate_to(path: Path, fraction: float) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * fraction)])


def truncate_weights(ckpt: Path) -> None:
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def reshape_config(ckpt: Path, **changes) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, **changes}))


def other_architecture(ckpt: Path, hidden_size: int = 64) -> None:
    """Replace a checkpoint by a model of another width (its tokenizer and trainer state kept)."""
    import torch  # noqa: F401
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((ckpt / "config.json").read_text())
    for name in ("model.safetensors", "config.json"):
        (ckpt / name).unlink()
    keep = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}
    LlamaForCausalLM(LlamaConfig(**{**keep, "hidden_size": hidden_size, "head_dim": hidden_size // 2})
                     ).save_pretrained(ckpt)


# --------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Tools], list[str]]
    code: int
    expect: str | tuple[str, ...]  # the one line must contain this ({inputs}, {out}, {cache}, {tmp} filled in)
    warning: bool = False  # exit 0: the line is a logged warning
    issue: bool = False  # one of issue 19's crashes or silent / mis-coded answers
    marks: tuple = field(default_factory=tuple)


def _rows_with(t: Tools, line: int, value) -> list:
    rows = t.rows()
    rows[line - 1] = value
    return rows


def _answer(t: Tools, i: int, answer) -> list:
    rows = t.rows()
    rows[i] = {**rows[i], "answer": answer}
    return rows


def _no_numbers(t: Tools, which) -> list:
    rows = t.rows()
    for i in which:
        rows[i] = {**rows[i], "answer": "add them up and there it is"}
    return rows


def _long_row(t: Tools) -> Path:
    rows = t.rows()
    rows[5] = {**rows[5], "question": "1+" * 400 + "1=?"}
    return t.jsonl("long.jsonl", rows)


def _not_utf8(t: Tools) -> Path:
    path = t.inputs / "latin1.jsonl"
    lines = (t.tiny_run / "train.jsonl").read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b'{"question": "caf\xe9", "answer": "#### 1"}\n' + b"".join(lines[1:]))
    return path


def _recipe(t: Tools, text: str) -> Path:
    path = t.inputs / "recipe.yaml"
    path.write_text(text)
    return path


def _policy(t: Tools, text: str) -> list[str]:
    run = t.run()
    policy = t.inputs / "policy.yaml"
    policy.write_text(text)
    return t.rank(run, None, "--policy", str(policy), command="gate")


def _broken(t: Tools, *names: str) -> Path:
    run = t.run()
    for name in names:
        truncate_weights(run / name)
    return run


def _rank_json_all_failed(t: Tools) -> list[str]:
    run = _broken(t, "checkpoint-2")
    result = CliRunner().invoke(main, [*t.rank(run), "--json"])
    ranking = json.loads(result.stdout)
    for row in ranking["checkpoints"]:
        row["error"] = row.get("error") or f"{row['path']}: measurement failed: RuntimeError: boom"
    path = t.inputs / "rank.json"
    path.write_text(json.dumps(ranking))
    return ["report", str(path), "-o", str(t.out / "r.html"), "--cache-dir", str(t.cache), "-q"]


def _verify_with_unmeasured_prediction(t: Tools) -> list[str]:
    run = t.run()
    ranking = json.loads(CliRunner().invoke(main, [*t.rank(run), "--json"]).stdout)
    row = ranking["checkpoints"][1]
    row["error"] = f"{row['path']}: measurement failed: RuntimeError: boom"
    path = t.inputs / "rank.json"
    path.write_text(json.dumps(ranking))
    return ["verify", str(run), "--test-file", str(run / "test.jsonl"), "--recipe", t.recipe(), "--greedy",
            "--limit", "2", "--ranking", str(path), "--cache-dir", str(t.cache), "-q"]


def _report(t: Tools, run: Path, out: Path) -> list[str]:
    return ["report", str(run), "--data", str(run / "train.jsonl"), "--recipe", t.recipe(), "--max-examples", "2",
            "-k", "1", "--cache-dir", str(t.cache), "-o", str(out), "-q"]


def _full_report_disk(t: Tools) -> list[str]:
    full = t.mount("full", "size=64k")
    (full / "filler").write_bytes(b"\0" * 60 * 1024)
    return _report(t, t.run(), full / "report.html")


def _merge(t: Tools, out: Path, *extra) -> list[str]:
    run = t.run()
    return ["merge", str(run / "checkpoint-2"), str(run / "checkpoint-4"), "-o", str(out), "-q", *extra]


def _file_too_large(t: Tools) -> list[str]:
    t.subprocess, t.limit_fsize = True, 50_000  # the merged weights are ~110 kB
    return _merge(t, t.out / "merged")


def _recommend(t: Tools, run: Path, out: Path) -> list[str]:
    return ["merge", str(run), "--recommend", "--data", str(run / "train.jsonl"), "--recipe", t.recipe(),
            "--cache-dir", str(t.cache), *FAST, "-o", str(out)]


def _export(t: Tools, out: Path) -> list[str]:
    return [*t.rank(t.run()), "--export-examples", str(out)]


def _newer_store(t: Tools) -> list[str]:
    import sqlite3

    db = sqlite3.connect(t.cache / "results.sqlite3")
    db.execute("INSERT INTO schema_version (version) VALUES (99)")
    db.commit()
    db.close()
    return t.rank(t.run())


def _locked_store(t: Tools) -> list[str]:
    t.env["CKPTSEL_STORE_TIMEOUT"] = "0.5"
    t.hold_store_lock()
    return t.rank(t.run())


def _corrupt_trainer_state(t: Tools) -> list[str]:
    run = t.run()
    (run / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "log_hist')
    return ["ls", str(run)]


def _pass_with_unmeasured(t: Tools) -> list[str]:
    run = _broken(t, "checkpoint-2")
    return t.rank(run, None, "--allow-overmemorized", command="gate")


def _fsdp(t: Tools, damage: Callable[[Path], None]) -> list[str]:
    """The FSDP sharded run (pytorch_model_fsdp_0/ DCP folders) with checkpoint-4's damaged."""
    run = t.stack("fsdp_stack", "sharded")
    damage(run / "checkpoint-4" / "pytorch_model_fsdp_0")
    return t.rank(run)


def _garble_middle(path: Path) -> None:
    """Same size, garbage in the middle: passes every size check, fails when read."""
    data = bytearray(path.read_bytes())
    data[len(data) // 4: len(data) // 2] = bytes(len(data) // 2 - len(data) // 4)
    path.write_bytes(bytes(data))


def _zero(t: Tools, damage: Callable[[Path], None]) -> list[str]:
    """The DeepSpeed ZeRO-2 run (Trainer layout, 2 ranks) with checkpoint-4's damaged."""
    run = t.stack("zero_stack", "zero2")
    damage(run / "checkpoint-4")
    return t.rank(run, None, "--allow-pickle")


def _another_world_size(ckpt: Path) -> None:
    """Shards of a 4-rank save left among a 2-rank one (an overwritten checkpoint)."""
    tag = ckpt / "global_step4"
    for r in (2, 3):
        shutil.copy(tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                    tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")


SLOW = (pytest.mark.slow,)
FSDP = "{inputs}/run/checkpoint-4: pytorch_model_fsdp_0/"
ZERO = "{inputs}/run/checkpoint-4: global_step4/"

CASES = [
    # ---- checkpoints written by training stacks (FSDP, DeepSpeed ZeRO): the others are ranked, exit 3
    Case("fsdp-dcp-without-metadata", lambda t: _fsdp(t, lambda d: (d / ".metadata").unlink()), 3,
         ("failed: ", FSDP + ".metadata: missing"), marks=SLOW),
    Case("fsdp-missing-rank-shard", lambda t: _fsdp(t, lambda d: (d / "__1_0.distcp").unlink()), 3,
         ("failed: ", FSDP + "__1_0.distcp: missing (.metadata names it"), marks=SLOW),
    Case("fsdp-torn-distcp", lambda t: _fsdp(t, lambda d: truncate_to(d / "__1_0.distcp", 0.5)), 3,
         ("failed: ", FSDP + "__1_0.distcp: truncated"), marks=SLOW),
    Case("fsdp-garbled-distcp", lambda t: _fsdp(t, lambda d: _garble_middle(d / "__0_0.distcp")), 3,
         ("failed: ", "{inputs}/run/checkpoint-4: ", "pytorch_model_fsdp_0: cannot read a tensor chunk"), marks=SLOW),
    Case("zero-missing-rank-shard",
         lambda t: _zero(t, lambda c: (c / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()), 3,
         ("failed: ", ZERO + "zero_pp_rank_1_mp_rank_00_optim_states.pt: missing (rank 1 of 2"), marks=SLOW),
    Case("zero-latest-names-a-missing-folder", lambda t: _zero(t, lambda c: (c / "latest").write_text("global_step9")),
         3, ("failed: ", "{inputs}/run/checkpoint-4: latest names global_step9/, which is missing"), marks=SLOW),
    Case("zero-shards-of-another-world-size", lambda t: _zero(t, _another_world_size), 3,
         ("failed: ", ZERO + "zero_pp_rank_2_mp_rank_00_optim_states.pt: shards of another world size"),
         marks=SLOW),
    Case("zero-torn-shard",
         lambda t: _zero(t, lambda c: truncate_to(c / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                   0.5)), 3,
         ("failed: ", ZERO + "zero_pp_rank_0_mp_rank_00_optim_states.pt: torn or truncated"), marks=SLOW),
    # ---- training data
    Case("data-missing", lambda t: t.rank(t.run(), t.inputs / "nope.jsonl"), 2, "{inputs}/nope.jsonl: no such data file"),
    Case("data-invalid-json-line", lambda t: t.rank(t.run(), t.jsonl("bad.jsonl", _rows_with(t, 3, "{bad"))), 2,
         "{inputs}/bad.jsonl:3: invalid JSON"),
    Case("data-row-not-object", lambda t: t.rank(t.run(), t.jsonl("bad.jsonl", _rows_with(t, 2, "[1, 2]"))), 2,
         "{inputs}/bad.jsonl:2: expected a JSON object"),
    Case("data-field-missing", lambda t: t.rank(t.run(), t.jsonl("bad.jsonl", _rows_with(t, 4, {"question": "1+1=?"}))),
         2, "{inputs}/bad.jsonl:4: missing field 'answer'"),
    Case("data-field-null", lambda t: t.rank(t.run(), t.jsonl("bad.jsonl", _answer(t, 1, None))), 2,
         "{inputs}/bad.jsonl:2: field 'answer' is null"),
    Case("data-not-utf8", lambda t: t.rank(t.run(), _not_utf8(t)), 2, "{inputs}/latin1.jsonl:2: not UTF-8 text"),
    Case("data-unsupported-format", lambda t: t.rank(t.run(), t.jsonl("train.txt", t.rows())), 2,
         "{inputs}/train.txt: unsupported data format '.txt'"),
    Case("data-empty", lambda t: t.rank(t.run(), t.jsonl("empty.jsonl", [])), 2, "{inputs}/empty.jsonl: no rows"),
    Case("data-template-field", lambda t: t.rank(t.run(), None, "--prompt-template", "{problem}\\n"), 2,
         "{inputs}/run/train.jsonl: prompt template uses {{problem}}"),
    Case("data-per-run-missing", lambda t: [*t.rank(t.run())[:2], "--data-per-run", "train2.jsonl", "--recipe",
                                              t.recipe(), "--cache-dir", str(t.cache), *FAST], 2,
         "no train2.jsonl in {inputs}/run"),
    Case("heldout-missing", lambda t: t.rank(t.run(), None, "--heldout", str(t.inputs / "test2.jsonl")), 2,
         "{inputs}/test2.jsonl: no such data file"),
    Case("references-unparseable", lambda t: t.rank(t.run(), t.jsonl("nonum.jsonl", _no_numbers(t, range(48)))), 2,
         "{inputs}/nonum.jsonl:1: the 'gsm8k' grader finds no answer", issue=True),
    Case("references-unparseable-data-command",
         lambda t: ["data", str(t.jsonl("nonum.jsonl", _no_numbers(t, range(48)))), "--recipe", t.recipe()], 2,
         "{inputs}/nonum.jsonl:1: the 'gsm8k' grader finds no answer", issue=True),
    Case("references-some-unparseable", lambda t: t.rank(t.run(), t.jsonl("some.jsonl", _no_numbers(t, [3, 7]))), 0,
         "{inputs}/some.jsonl:4: the 'gsm8k' grader finds no answer in this reference", warning=True, issue=True),
    Case("row-longer-than-context", lambda t: t.rank(t.run(), _long_row(t), "--max-examples", "48"), 2,
         ("{inputs}/long.jsonl:6: ", "tokens (prompt + target), longer than the model's context of 256"), issue=True),
    # ---- recipes and options
    Case("recipe-missing", lambda t: [*t.rank(t.run())[:4], "--recipe", str(t.inputs / "nope.yaml")], 2, "nope.yaml"),
    Case("recipe-invalid-yaml", lambda t: [*t.rank(t.run())[:4], "--recipe", str(_recipe(t, "data: [1,\n"))], 2,
         "{inputs}/recipe.yaml:2: invalid YAML"),
    Case("recipe-unknown-setting", lambda t: [*t.rank(t.run())[:4], "--recipe", str(_recipe(t, "sampling:\n  kk: 3\n"))],
         2, "{inputs}/recipe.yaml:2: sampling.kk: unknown setting"),
    Case("grader-unknown", lambda t: t.rank(t.run(), None, "--grader", "nope"), 2, "unknown grader 'nope'"),
    Case("threshold-not-a-number", lambda t: t.rank(t.run(), None, "--threshold", "low"), 2, "--threshold"),
    # ---- checkpoints
    Case("path-missing", lambda t: t.rank(t.inputs / "nope", t.jsonl("train.jsonl", t.rows())), 2,
         "{inputs}/nope: no such file or directory"),
    Case("path-is-a-file", lambda t: t.rank(t.jsonl("train.jsonl", t.rows())), 2, "{inputs}/train.jsonl: not a folder"),
    Case("every-checkpoint-broken", lambda t: t.rank(_broken(t, "checkpoint-2", "checkpoint-4", "checkpoint-6")), 2,
         "no loadable checkpoint under {inputs}/run"),
    Case("one-checkpoint-broken", lambda t: t.rank(_broken(t, "checkpoint-4")), 3, "failed: {inputs}/run/checkpoint-4"),
    Case("architecture-differs-in-run", lambda t: t.rank(_arch(t)), 3,
         "failed: {inputs}/run/checkpoint-4: another architecture than the rest of run run: hidden_size 64",
         issue=True),
    Case("architecture-differs-ls", lambda t: ["ls", str(_arch(t))], 0,
         "{inputs}/run/checkpoint-4: another architecture than the rest of run run: hidden_size 64", warning=True,
         issue=True),
    Case("architecture-differs-gate-candidate", lambda t: t.rank(_arch(t, "checkpoint-6"), command="gate"), 2,
         "gate: the candidate could not be measured: {inputs}/run/checkpoint-6: another architecture"),
    Case("nothing-measurable", lambda t: t.rank(_unloadable(t)), 2, "no checkpoint could be measured: "
         "{inputs}/run/checkpoint-2: cannot load", issue=True),
    Case("trainer-state-corrupt", _corrupt_trainer_state, 0,
         "{inputs}/run/checkpoint-4/trainer_state.json: corrupt, ignored", warning=True, issue=True),
    # ---- the result store
    Case("cache-inside-checkpoint", lambda t: [*t.rank(t.run())[:6], "--cache-dir", str(t.inputs / "run" / "checkpoint-2"
                                                                                         / "c"), *FAST], 2,
         "is inside checkpoint folder {inputs}/run/checkpoint-2"),
    Case("store-newer-schema", _newer_store, 2, "result store {cache}/results.sqlite3 has schema version 99"),
    Case("store-locked-past-timeout", _locked_store, 2, "result store {cache}/results.sqlite3 is locked by another "
         "process (waited 0.5 s", issue=True),
    Case("store-timeout-not-a-number", lambda t: (t.env.update(CKPTSEL_STORE_TIMEOUT="soon"), t.rank(t.run()))[1], 2,
         "CKPTSEL_STORE_TIMEOUT='soon': expected a number of seconds"),
    # ---- the gate
    Case("policy-empty", lambda t: _policy(t, ""), 2, "{inputs}/policy.yaml: empty policy file", issue=True),
    Case("policy-rules-empty", lambda t: _policy(t, "candidate: last\nrules:\n"), 2,
         "{inputs}/policy.yaml:2: rules: is empty", issue=True),
    Case("policy-checks-nothing", lambda t: _policy(t, "rules:\n  fail_if_overmemorized: false\n"), 2,
         "{inputs}/policy.yaml: the policy checks nothing"),
    Case("policy-unknown-rule", lambda t: _policy(t, "rules:\n  min_premem: 0.3\n"), 2,
         "{inputs}/policy.yaml:2: rules.min_premem: unknown setting"),
    Case("policy-invalid-yaml", lambda t: _policy(t, "rules: [1, 2\n"), 2, "{inputs}/policy.yaml:2: invalid YAML"),
    Case("gate-candidate-not-in-run", lambda t: t.rank(t.run(), None, "--candidate", str(t.inputs), command="gate"), 2,
         "--candidate {inputs}: not a checkpoint of {inputs}/run"),
    Case("gate-candidate-broken", lambda t: t.rank(_broken(t, "checkpoint-6"), command="gate"), 2,
         "gate: the candidate could not be measured: {inputs}/run/checkpoint-6"),
    Case("gate-pass-with-unmeasured-history", _pass_with_unmeasured, 3, "failed: {inputs}/run/checkpoint-2",
         issue=True),
    # ---- outputs
    Case("merge-out-unwritable", lambda t: _merge(t, t.mount("ro", "ro,size=1m") / "merged"), 2,
         "{tmp}/ro/merged: cannot write the merged checkpoint in {tmp}/ro (read-only file system)", issue=True),
    Case("report-out-unwritable", lambda t: _report(t, t.run(), t.mount("ro", "ro,size=1m") / "sub" / "r.html"), 2,
         "{tmp}/ro/sub/r.html: cannot write the report in {tmp}/ro (read-only file system)", issue=True),
    Case("recommend-out-unwritable", lambda t: _recommend(t, t.run(), t.mount("ro", "ro,size=1m") / "merged"), 2,
         "{tmp}/ro/merged: cannot write the merged checkpoint", issue=True),
    Case("export-unwritable", lambda t: _export(t, t.mount("ro", "ro,size=1m") / "examples.csv"), 2,
         "{tmp}/ro/examples.csv: cannot write the per-example table", issue=True),
    Case("export-under-a-file", lambda t: _export(t, t.jsonl("train.jsonl", t.rows()) / "examples.csv"), 2,
         "{inputs}/train.jsonl/examples.csv: cannot write the per-example table: {inputs}/train.jsonl is not a folder"),
    Case("merge-disk-full-mid-write", lambda t: _merge(t, t.mount("full", "size=64m,nr_inodes=6") / "merged"), 2,
         "{tmp}/full/merged: cannot write: no space left on device", issue=True),
    Case("merge-file-too-large", _file_too_large, 2, "{out}/merged: cannot write: file too large", issue=True),
    Case("report-disk-full-mid-write", _full_report_disk, 2, "{tmp}/full/report.html: cannot write: no space left",
         issue=True),
    Case("merge-out-exists", lambda t: _merge(t, t.out), 2, "{out}: already exists; pass --force"),
    Case("merge-checkpoint-missing", lambda t: ["merge", str(t.inputs / "a"), str(t.inputs / "b"), "-o", str(t.out / "m")],
         2, "{inputs}/a"),
    # ---- exit 3 / exit 2 the same everywhere
    Case("report-with-unmeasured-checkpoint", lambda t: _report(t, _broken(t, "checkpoint-4"), t.out / "r.html"), 3,
         "failed: {inputs}/run/checkpoint-4", issue=True),
    Case("report-json-nothing-measured", _rank_json_all_failed, 2, "no checkpoint could be measured: ", issue=True),
    Case("verify-with-unmeasured-prediction", _verify_with_unmeasured_prediction, 3,
         "failed: prediction: {inputs}/run/checkpoint-4: measurement failed", issue=True),
    Case("recommend-with-unmeasured-checkpoint",
         lambda t: _recommend(t, _broken(t, "checkpoint-2"), t.out / "merged"), 3,
         "failed: {inputs}/run/checkpoint-2", issue=True),
]


def _arch(t: Tools, name: str = "checkpoint-4") -> Path:
    run = t.run()
    other_architecture(run / name)
    return run


def _unloadable(t: Tools) -> Path:
    run = t.run()
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6"):
        reshape_config(run / name, intermediate_size=96)  # the weights say 64: no checkpoint loads
    return run


def _invoke(t: Tools, args: list[str]):
    """(exit code, output) of the command, in this process or (resource limits) a child process."""
    if not t.subprocess:
        result = CliRunner().invoke(main, args, env=t.env)
        assert not (result.exception and not isinstance(result.exception, SystemExit)), result.exc_info
        return result.exit_code, result.output
    limit = t.limit_fsize

    def limits():
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([sys.executable, "-m", "ckptsel", *args], capture_output=True, text=True, timeout=300,
                          preexec_fn=limits, env={**os.environ, **t.env}, check=False)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case, tiny_run, warm_cache, tmp_path, caplog, request):
    t = Tools(tiny_run, tmp_path, warm_cache)
    t.request = request
    try:
        args = case.build(t)
        before = tree_hash(t.inputs), tree_hash(tiny_run)
        with caplog.at_level("WARNING"):
            code, output = _invoke(t, args)
        after = tree_hash(t.inputs), tree_hash(tiny_run)
    finally:
        t.close()
    parts = (case.expect,) if isinstance(case.expect, str) else case.expect
    expect = [part.format(inputs=t.inputs, out=t.out, cache=t.cache, tmp=tmp_path) for part in parts]
    assert code == case.code, output
    assert "Traceback" not in output and "Traceback" not in caplog.text
    lines = caplog.messages if case.warning else output.splitlines()
    assert len([line for line in lines if all(e in line for e in expect)]) == 1, (expect, output, caplog.messages)
    if case.code == 2:  # one line says it all
        errors = [line for line in output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and all(e in errors[0] for e in expect), output
    assert before == after, "the inputs changed"
    leftovers = [p for p in tmp_path.rglob("*") if ".ckptsel-partial-" in p.name or p.name.endswith(".tmp")
                 or ".tmp-" in p.name]  # converted copies: ckptsel/formats/converted.py
    assert not leftovers, leftovers
    if (t.cache / "converted").is_dir():  # a converted copy only of what converted: no copy of a failed one
        copies = [p for p in (t.cache / "converted").iterdir() if p.is_dir()]
        assert all((c / "ckptsel_converted.json").is_file() for c in copies)
        assert len(copies) <= 2, copies


def test_the_corpus_covers_issue_19():
    """At least 30 cases; issue 19's crashes and silent answers are among them."""
    assert len(CASES) >= 30
    assert sum(c.issue for c in CASES) >= 7 + 6
    assert len({c.id for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------- exit 4: ckptsel's own bugs


def _gate_args(tiny_run, cache):
    return ["gate", str(tiny_run), "--data", str(tiny_run / "train.jsonl"), "--recipe", str(tiny_run / "recipe.yaml"),
            "--cache-dir", str(cache), *FAST]


@pytest.fixture
def broken_library(monkeypatch):
    """A bug deep in the gate's run: the policy evaluation raises."""
    import ckptsel.policy

    def evaluate(*args, **kwargs):
        raise RuntimeError("boom in evaluate\nsecond line")

    monkeypatch.setattr(ckptsel.policy, "evaluate", evaluate)


def test_an_internal_error_is_exit_4_one_line_no_traceback(tiny_run, warm_cache, broken_library, monkeypatch):
    monkeypatch.delenv("CKPTSEL_DEBUG", raising=False)
    result = CliRunner().invoke(main, _gate_args(tiny_run, warm_cache))
    assert result.exit_code == 4, result.output  # not 1: that is "the candidate failed"
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert errors == [("Error: internal error: RuntimeError: boom in evaluate "
                       "(run with --debug or CKPTSEL_DEBUG=1 for the traceback)")]


@pytest.mark.parametrize("how", ["option", "env"])
def test_debug_shows_the_traceback(tiny_run, warm_cache, broken_library, monkeypatch, how):
    monkeypatch.delenv("CKPTSEL_DEBUG", raising=False)
    args = _gate_args(tiny_run, warm_cache)
    if how == "option":
        result = CliRunner().invoke(main, ["--debug", *args])
    else:
        result = CliRunner().invoke(main, args, env={"CKPTSEL_DEBUG": "1"})
    assert result.exit_code == 4
    assert "Traceback (most recent call last)" in result.stderr
    assert 'in evaluate\n    raise RuntimeError("boom in evaluate' in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("Error: internal error: RuntimeError")


def test_a_measurement_failure_keeps_one_line_and_debug_logs_its_traceback(tiny_run, tmp_path, monkeypatch, caplog):
    """ckptsel's own bug inside one checkpoint's measurement: that checkpoint is one line,
    "measurement failed" (exit 3, the other two are ranked); --debug logs the traceback."""
    import ckptsel.kinds

    real = ckptsel.kinds.KINDS["score"]

    def measure(model, tokenizer, examples, recipe, ctx):
        if "checkpoint-4" in str(getattr(model, "name_or_path", "")):
            raise ZeroDivisionError("a bug of ours")
        return real.measure(model, tokenizer, examples, recipe, ctx)

    monkeypatch.setitem(ckptsel.kinds.KINDS, "score", type(real)(measure, real.chunk, real.examples, real.routes))
    args = ["--debug", "rank", str(tiny_run), "--data", str(tiny_run / "train.jsonl"), "--recipe",
            str(tiny_run / "recipe.yaml"), "--cache-dir", str(tmp_path), *FAST]
    with caplog.at_level("DEBUG", logger="ckptsel"):
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 3, result.output
    failed = [line for line in result.output.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "checkpoint-4: measurement failed: ZeroDivisionError: a bug of ours" in failed[0]
    assert "Traceback" not in result.output
    traces = [r for r in caplog.records if r.levelname == "DEBUG" and r.exc_info and "checkpoint-4" in r.getMessage()]
    assert len(traces) == 1 and traces[0].exc_info[0] is ZeroDivisionError


# --------------------------------------------------------------------------- one store, many processes


def _rank_process(tiny_run, cache):
    args = [sys.executable, "-m", "ckptsel", "rank", str(tiny_run), "--data", str(tiny_run / "train.jsonl"), "--recipe",
            str(tiny_run / "recipe.yaml"), "--cache-dir", str(cache), "--max-examples", "4", "-k", "2", "-q", "--json"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _without_cache_counts(text: str) -> dict:
    out = json.loads(text)
    out.pop("cache")
    return out


@pytest.mark.slow
def test_two_rank_processes_share_one_store(tiny_run, tmp_path):
    """Two real `ckptsel rank` processes on one fresh cache at once: both finish, and agree with one process alone."""
    both = [_rank_process(tiny_run, tmp_path / "shared"), _rank_process(tiny_run, tmp_path / "shared")]
    results = [p.communicate(timeout=600) for p in both]
    for p, (out, err) in zip(both, results):
        assert p.returncode == 0, err
        assert "Traceback" not in err
    alone = _rank_process(tiny_run, tmp_path / "alone")
    out, err = alone.communicate(timeout=600)
    assert alone.returncode == 0, err
    expected = _without_cache_counts(out)
    assert _without_cache_counts(results[0][0]) == expected
    assert _without_cache_counts(results[1][0]) == expected


def test_a_lock_held_past_the_timeout_is_one_line_naming_the_store(tmp_path, monkeypatch):
    """Library level: a write waits CKPTSEL_STORE_TIMEOUT seconds for another process, then StoreError."""
    import time

    from ckptsel.store import Record, Store, StoreError

    with Store.open(tmp_path):
        pass
    monkeypatch.setenv("CKPTSEL_STORE_TIMEOUT", "0.3")
    holder = hold_lock(tmp_path / "results.sqlite3")
    try:
        with Store.open(tmp_path) as store:
            assert store.timeout == 0.3
            start = time.perf_counter()
            with pytest.raises(StoreError) as caught:
                store.put_many("fp", "settings", "score", {"u": Record(nll=1.0)})
            waited = time.perf_counter() - start
            assert store.get_many("fp", "settings", "score", ["u"]) == {}  # reads go on while the writer waits
    finally:
        holder.kill()
        holder.wait()
    assert str(caught.value).startswith(f"result store {tmp_path / 'results.sqlite3'} is locked by another process")
    assert "\n" not in str(caught.value)
    assert 0.25 < waited < 5


def test_library_write_errors_without_an_errno_are_recognised(tmp_path):
    """safetensors' Rust writer words a full disk or a size limit in its message only."""
    from safetensors import SafetensorError

    from ckptsel.outputs import OutputError, write_errors, write_failure

    full = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                           'message: "No space left on device" })')
    assert str(write_failure(full, tmp_path / "m")) == f"{tmp_path / 'm'}: cannot write: no space left on device " \
                                                       "(nothing was left behind)"
    assert "file too large" in str(write_failure(OSError(27, "File too large"), "x"))
    assert write_failure(ValueError("shape mismatch"), "x") is None  # not a write failure: a bug, left alone
    with pytest.raises(OutputError), write_errors("x"):
        raise RuntimeError("wrapped") from OSError(28, "No space left on device")
    with pytest.raises(ValueError), write_errors("x"):
        raise ValueError("shape mismatch")


def test_sampling_batches_stay_under_the_position_budget():
    from ckptsel.measure.sampling import _cut

    prompts = [5000, 40, 40, 40, 30, 30]
    budgets = [16, 16, 16, 16, 16, 16]
    batches = _cut(list(range(6)), prompts, budgets, size=128, positions=4096)
    assert batches == [[0], [1, 2, 3, 4, 5]]  # the long row alone; the short ones together
    assert _cut(list(range(6)), prompts, budgets, size=2, positions=None) == [[0, 1], [2, 3], [4, 5]]
