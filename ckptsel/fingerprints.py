"""Content fingerprints of checkpoints, the result store's key for a checkpoint (ckptsel/DESIGN.md, "How a run flows").

A fingerprint is computed from the checkpoint's files (:func:`ckptsel.discover.fingerprint`)
and cached in the store by (path, total size, newest mtime), so an unchanged checkpoint is
read once.
"""

from __future__ import annotations

from collections.abc import Sequence

from ckptsel.discover import Checkpoint, fingerprint
from ckptsel.store import Store


def fingerprints(checkpoints: Sequence[Checkpoint], store: Store) -> list[str | None]:
    """Content fingerprints, cached in the store by (path, total size, newest mtime); None for an unreadable checkpoint."""
    out: list[str | None] = []
    for ckpt in checkpoints:
        if not ckpt.format.usable:
            out.append(None)
            continue
        files = {p for p in ckpt.path.iterdir() if p.is_file()} | set(ckpt.weight_files)  # weights may lie below
        size = sum(p.stat().st_size for p in files)
        mtime = max((p.stat().st_mtime_ns for p in files), default=0)
        cached = store.get_fingerprint(ckpt.path, size, mtime)
        if cached is None:
            cached = fingerprint(ckpt)
            store.put_fingerprint(ckpt.path, size, mtime, cached)
        out.append(cached)
    return out
