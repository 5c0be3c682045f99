"""Throughput of ckptsel.store vs a one-JSON-payload-column alternative (100k rows)."""
import json, sqlite3, tempfile, time, random
from pathlib import Path
import numpy as np
from ckptsel.store import Store, Record

N, BATCH = 100_000, 1000
uids = [f"{i:016x}" for i in range(N)]
rng = random.Random(0)
text = "".join(rng.choice("abcdefghij 0123456789\n") for _ in range(300))
kinds = {
    "score": lambda i: Record(nll=0.1 + i * 1e-6, n_tokens=200, entropy=0.5),
    "sample": lambda i: Record(acc=0.6, copy_rate=0.2, samples=tuple(text for _ in range(5))),
    "router": lambda i: Record(array=np.full((16, 64), 1 / 64, np.float32)),
}

def bench_store(kind, n):
    d = tempfile.mkdtemp()
    with Store.open(d) as s:
        make = kinds[kind]
        t = time.perf_counter()
        for b in range(0, n, BATCH):
            s.put_many("f" * 64, "s" * 16, kind, {u: make(i) for i, u in enumerate(uids[b:b + BATCH], b)})
        w = time.perf_counter() - t
        t = time.perf_counter(); got = s.get_many("f" * 64, "s" * 16, kind, uids[:n]); r = time.perf_counter() - t
        t = time.perf_counter(); miss = s.missing("f" * 64, "s" * 16, kind, uids[:n]); m = time.perf_counter() - t
        assert len(got) == n and not miss
    size = sum(f.stat().st_size for f in Path(d).iterdir()) / 1e6
    print(f"store  {kind:6s} n={n}: write {n/w:9.0f}/s  get_many {n/r:9.0f}/s  missing {n/m:10.0f}/s  {size:.0f} MB")

def bench_json(kind, n):
    d = tempfile.mkdtemp()
    db = sqlite3.connect(Path(d) / "x.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL"); db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE r (fp TEXT, settings TEXT, kind TEXT, uid TEXT, payload TEXT, PRIMARY KEY (fp, settings, kind, uid)) WITHOUT ROWID")
    def payload(i):
        rec = kinds[kind](i)
        d = {k: v for k, v in rec.__dict__.items() if v is not None}
        if "array" in d: d["array"] = d["array"].tolist()
        return json.dumps(d)
    t = time.perf_counter()
    for b in range(0, n, BATCH):
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT OR REPLACE INTO r VALUES (?,?,?,?,?)", (("f" * 64, "s" * 16, kind, u, payload(i)) for i, u in enumerate(uids[b:b + BATCH], b)))
        db.execute("COMMIT")
    w = time.perf_counter() - t
    t = time.perf_counter()
    got = {}
    for b in range(0, n, 500):
        ch = uids[b:b + 500]
        for u, p in db.execute(f"SELECT uid, payload FROM r WHERE fp=? AND settings=? AND kind=? AND uid IN ({','.join('?'*len(ch))})", ("f"*64, "s"*16, kind, *ch)):
            got[u] = json.loads(p)
    r = time.perf_counter() - t
    size = sum(f.stat().st_size for f in Path(d).iterdir()) / 1e6
    print(f"json   {kind:6s} n={n}: write {n/w:9.0f}/s  get_many {n/r:9.0f}/s  {size:.0f} MB")

for kind, n in [("score", N), ("sample", N), ("router", 20_000)]:
    bench_store(kind, n); bench_json(kind, n)
