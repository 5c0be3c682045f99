"""ckptsel.store: round trips, resume, kill -9 safety, concurrent writers, versioning."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ckptsel.errors import CkptselError
from ckptsel.store import STORE_FILENAME, Record, Store, StoreError, default_cache_dir, ensure_outside

FP, SETTINGS = "f" * 64, "0123456789abcdef"

# A child process that writes batches of BATCH records to the store in argv[1]. Before the
# second half of batch number argv[2] it reports "mid" and sleeps inside the transaction,
# so the parent can kill it at a known point; batches before it report "done N".
WRITER = """
import sys, time
from ckptsel.store import Record, Store
path, stop_at, batch, n_batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
kind = sys.argv[5] if len(sys.argv) > 5 else "score"
def rows(b):
    for i in range(batch):
        if b == stop_at and i == batch // 2:
            print("mid", b, flush=True)
            time.sleep(float(sys.argv[6]) if len(sys.argv) > 6 else 60)
        yield f"u{b:04d}-{i:04d}", Record(nll=b + i / batch, samples=("x" * 50,) * 5)
with Store.open(path) as store:
    for b in range(n_batches):
        store.put_many("%s", "%s", kind, rows(b))
        print("done", b, flush=True)
""" % (FP, SETTINGS)


def start_writer(cache: Path, stop_at: int, batch: int, n_batches: int, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-c", WRITER, str(cache), str(stop_at), str(batch), str(n_batches), *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, prefix: str) -> str:
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"writer ended before {prefix!r}: {proc.stderr.read()}")


def test_round_trip_every_field(tmp_path):
    weights = np.arange(12, dtype=np.float32).reshape(3, 4) / 12
    records = {
        "a": Record(nll=0.125, n_tokens=17, entropy=0.75),
        "b": Record(acc=0.6, copy_rate=0.2, samples=("x = 3\n#### 3", "é ∑ 😀", "")),
        "c": Record(data={"layers": [[0.5, 0.5]], "note": None}, array=weights),
        "d": Record(nll=float("nan")),
    }
    with Store.open(tmp_path) as store:
        assert store.put_many(FP, SETTINGS, "score", records) == 4
    with Store.open(tmp_path) as store:
        got = store.get_many(FP, SETTINGS, "score", ["a", "b", "c", "d", "zzz"])
    assert set(got) == {"a", "b", "c", "d"}
    assert got["a"] == Record(nll=0.125, n_tokens=17, entropy=0.75)
    assert got["b"].samples == ("x = 3\n#### 3", "é ∑ 😀", "") and got["b"].acc == 0.6
    assert got["c"].data == {"layers": [[0.5, 0.5]], "note": None}
    assert got["c"].array.dtype == np.float32 and got["c"].array.shape == (3, 4)
    np.testing.assert_array_equal(got["c"].array, weights)
    assert got["d"].nll is None  # NaN is stored as NULL: "not measured"
    assert (tmp_path / STORE_FILENAME).exists()


def test_series_are_separate_and_puts_replace(tmp_path):
    with Store.open(tmp_path) as store:
        store.put_many(FP, SETTINGS, "score", {"u": Record(nll=1.0)})
        store.put_many(FP, SETTINGS, "perturb:0", {"u": Record(nll=2.0)})
        store.put_many(FP, "other-settings", "score", {"u": Record(nll=3.0)})
        store.put_many("g" * 64, SETTINGS, "score", {"u": Record(nll=4.0)})
        store.put_many(FP, SETTINGS, "score", [("u", Record(nll=5.0))])  # replaces the first
        values = [
            store.get_many(fp, st, kind, ["u"])["u"].nll
            for fp, st, kind in [(FP, SETTINGS, "score"), (FP, SETTINGS, "perturb:0"),
                                 (FP, "other-settings", "score"), ("g" * 64, SETTINGS, "score")]
        ]  # fmt: skip
        assert values == [5.0, 2.0, 3.0, 4.0]
        assert store.count(FP, SETTINGS, "score") == 1
        assert store.get_many(FP, SETTINGS, "router", ["u"]) == {}


def test_resume_missing_returns_the_rest_in_order(tmp_path):
    uids = [f"ex{i:04d}" for i in range(1200)][::-1]  # > one 500-uid query chunk, unsorted
    with Store.open(tmp_path) as store:
        assert store.missing(FP, SETTINGS, "sample", uids) == uids
        store.put_many(FP, SETTINGS, "sample", {u: Record(acc=1.0) for u in uids[::2]})
    with Store.open(tmp_path) as store:
        assert store.missing(FP, SETTINGS, "sample", uids) == uids[1::2]
        assert set(store.get_many(FP, SETTINGS, "sample", uids)) == set(uids[::2])
        assert store.count(FP, SETTINGS, "sample") == 600


def test_matrix_lays_out_checkpoints_by_examples(tmp_path):
    uids = ["a", "b", "c"]
    with Store.open(tmp_path) as store:
        store.put_many("ck1", SETTINGS, "sample", {"a": Record(acc=0.2), "c": Record(acc=1.0, copy_rate=0.4)})
        store.put_many("ck2", SETTINGS, "sample", {"b": Record(acc=0.6), "c": Record(acc=float("nan"))})
        acc = store.matrix(["ck1", "ck2", "never-measured"], SETTINGS, "sample", uids, "acc")
        copies = store.matrix(["ck1", "ck2"], SETTINGS, "sample", uids, "copy_rate")
        with pytest.raises(ValueError, match="field must be one of"):
            store.matrix(["ck1"], SETTINGS, "sample", uids, "samples")
    nan = np.nan
    np.testing.assert_array_equal(acc, [[0.2, nan, 1.0], [nan, 0.6, nan], [nan, nan, nan]])
    np.testing.assert_array_equal(copies, [[nan, nan, 0.4], [nan, nan, nan]])


def test_failed_batch_keeps_nothing(tmp_path):
    def rows():
        yield "a", Record(nll=1.0)
        raise RuntimeError("model crashed mid-batch")

    with Store.open(tmp_path) as store:
        with pytest.raises(RuntimeError):
            store.put_many(FP, SETTINGS, "score", rows())
        assert store.count(FP, SETTINGS, "score") == 0
        store.put_many(FP, SETTINGS, "score", {"b": Record(nll=2.0)})  # the store is still usable
        assert store.missing(FP, SETTINGS, "score", ["a", "b"]) == ["a"]


def test_kill_9_mid_batch_loses_only_that_batch(tmp_path):
    batch = 200
    writer = start_writer(tmp_path, 3, batch, 10)
    wait_for(writer, "mid 3")  # batches 0-2 committed; batch 3 half written, uncommitted
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert writer.returncode == -signal.SIGKILL
    with Store.open(tmp_path) as store:
        assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert store.count(FP, SETTINGS, "score") == 3 * batch
        batch3 = [f"u0003-{i:04d}" for i in range(batch)]
        assert store.missing(FP, SETTINGS, "score", batch3) == batch3
        got = store.get_many(FP, SETTINGS, "score", [f"u0002-{i:04d}" for i in range(batch)])
        assert len(got) == batch and got["u0002-0100"].nll == pytest.approx(2.5)


def test_kill_9_at_a_random_moment_leaves_whole_batches(tmp_path):
    batch = 500
    writer = start_writer(tmp_path, -1, batch, 100_000)  # never pauses
    wait_for(writer, "done 2")
    time.sleep(0.3)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    with Store.open(tmp_path) as store:
        n = store.count(FP, SETTINGS, "score")
        assert n >= 3 * batch and n % batch == 0


def test_writer_waits_for_another_process_instead_of_failing(tmp_path):
    # The child holds the write lock (mid-transaction) for 1 s; meanwhile this process
    # reads (WAL: readers never block) and writes (waits on busy_timeout, then succeeds).
    writer = start_writer(tmp_path, 1, 100, 3, "score", "1.0")
    wait_for(writer, "mid 1")
    with Store.open(tmp_path, timeout=30) as store:
        assert store.count(FP, SETTINGS, "score") == 100  # batch 0 only; reading did not block
        started = time.perf_counter()
        store.put_many(FP, SETTINGS, "alt", {"x": Record(nll=1.0)})
        waited = time.perf_counter() - started
    assert writer.wait(timeout=30) == 0, writer.stderr.read()
    assert waited > 0.3  # it really queued behind the child's transaction
    with Store.open(tmp_path) as store:
        assert store.count(FP, SETTINGS, "score") == 300
        assert store.count(FP, SETTINGS, "alt") == 1


def test_two_processes_write_concurrently(tmp_path):
    writers = [start_writer(tmp_path, -1, 100, 40, kind) for kind in ("score", "sample")]
    for writer in writers:
        assert writer.wait(timeout=60) == 0, writer.stderr.read()
    with Store.open(tmp_path) as store:
        assert store.count(FP, SETTINGS, "score") == 4000
        assert store.count(FP, SETTINGS, "sample") == 4000


def test_two_connections_in_threads(tmp_path):
    Store.open(tmp_path).close()
    errors = []

    def work(kind):
        try:
            with Store.open(tmp_path) as store:
                for b in range(30):
                    store.put_many(FP, SETTINGS, kind, {f"{b}-{i}": Record(nll=float(i)) for i in range(50)})
                    store.register_checkpoint(f"{kind}{b}", f"/ckpt/{kind}/{b}", b)
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in ("score", "router")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with Store.open(tmp_path) as store:
        assert store.count(FP, SETTINGS, "score") == store.count(FP, SETTINGS, "router") == 1500
        assert len(store.checkpoints()) == 60


def test_newer_schema_is_refused(tmp_path):
    Store.open(tmp_path).close()
    db = sqlite3.connect(tmp_path / STORE_FILENAME)
    db.execute("INSERT INTO schema_version VALUES (99)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match=r"schema version 99, newer than this ckptsel reads \(2\)"):
        Store.open(tmp_path)


def test_not_a_database_is_one_line(tmp_path):
    (tmp_path / STORE_FILENAME).write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(CkptselError) as info:
        Store.open(tmp_path)
    assert str(tmp_path / STORE_FILENAME) in str(info.value) and "\n" not in str(info.value)


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTSEL_CACHE", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    with Store.open() as store:
        assert store.path == tmp_path / "env-cache" / STORE_FILENAME
    monkeypatch.delenv("CKPTSEL_CACHE")
    assert default_cache_dir().name == "ckptsel"
    assert default_cache_dir() != tmp_path / "env-cache"


def test_ensure_outside_checkpoints(tmp_path):
    ckpt = tmp_path / "run" / "checkpoint-10"
    ckpt.mkdir(parents=True)
    ensure_outside(tmp_path / "cache", [ckpt])
    ensure_outside(tmp_path / "run", [ckpt])  # the run folder holding checkpoints is fine
    with pytest.raises(StoreError, match="inside checkpoint folder"):
        ensure_outside(ckpt / ".ckptsel", [tmp_path / "other", ckpt])


def test_checkpoint_registry_kv_and_fingerprint_cache(tmp_path):
    with Store.open(tmp_path) as store:
        store.register_checkpoint("abc", "/runs/a/checkpoint-10", 10)
        store.register_checkpoint("abc", "/copied/checkpoint-10", 10)
        store.register_checkpoint("def", "/runs/a/checkpoint-20", None)
        entry = store.checkpoint("abc")
        assert (entry.path, entry.step) == ("/copied/checkpoint-10", 10)
        assert [e.fingerprint for e in store.checkpoints()] == ["def", "abc"]
        assert store.checkpoint("nope") is None

        store.put_value("threshold:gsm8k:abc", {"nu": 0.093, "balanced_accuracy": 0.91})
        store.put_value("threshold:gsm8k:abc", {"nu": 0.081})
        assert store.get_value("threshold:gsm8k:abc") == {"nu": 0.081}
        assert store.get_value("missing", default=[]) == []

        store.put_fingerprint("/runs/a/model.safetensors", 1000, 123456789, "fp1")
        assert store.get_fingerprint("/runs/a/model.safetensors", 1000, 123456789) == "fp1"
        assert store.get_fingerprint("/runs/a/model.safetensors", 1000, 999) is None  # touched
        assert store.get_fingerprint("/runs/a/model.safetensors", 1001, 123456789) is None  # resized
        store.put_fingerprint("/runs/a/model.safetensors", 1001, 5, "fp2")
        assert store.get_fingerprint("/runs/a/model.safetensors", 1001, 5) == "fp2"


_OPENER = """
import sys, time
from ckptsel.store import Record, Store, StoreError
root, start, rounds, me = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
failures = 0
for r in range(rounds):
    while time.time() < start + r * 0.5:  # every process opens round r's brand-new store at once
        time.sleep(0.001)
    try:
        with Store.open(f"{root}/round{r}", timeout=30) as store:
            store.put_many("fp", "settings", me, {f"u{i}": Record(nll=float(i)) for i in range(20)})
            store.put_value(f"who/{me}", r)
    except StoreError as exc:
        failures += 1
        print(exc, file=sys.stderr)
print(failures)
"""


def test_processes_opening_a_brand_new_store_at_once_all_wait_and_write(tmp_path):
    """4 processes x 10 rounds, each round a brand-new store opened and written by all at once:
    the journal-mode switch and the schema creation wait like every write, so nothing fails."""
    procs, rounds = 4, 10
    start = time.time() + 3.0  # after every interpreter has imported ckptsel.store
    children = [subprocess.Popen([sys.executable, "-c", _OPENER, str(tmp_path), str(start), str(rounds), f"p{i}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(procs)]
    outputs = [child.communicate(timeout=120) for child in children]
    assert [int(out.strip() or -1) for out, _ in outputs] == [0] * procs, [err for _, err in outputs]
    for r in range(rounds):
        with Store.open(tmp_path / f"round{r}") as store:
            assert [store.count("fp", "settings", f"p{i}") for i in range(procs)] == [20] * procs
            assert [store.get_value(f"who/p{i}") for i in range(procs)] == [r] * procs
