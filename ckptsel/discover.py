"""Find checkpoints and describe them without loading weights.

INTERFACE (other modules rely on it; keep these names and fields):

    Checkpoint                 one discovered checkpoint (ckptsel/formats/base.py)
    Run                        one training trajectory: a name, its folder, its checkpoints in step order
    discover_runs(paths, base_model=None) -> list[Run]     the runs under ``paths``
    discover(paths, base_model=None) -> list[Checkpoint]   every run's checkpoints, run after run
    describe(folder, base_model=None) -> Checkpoint       one folder, no training state
    fingerprint(ckpt) -> str   content hash for the result store
    read_safetensors_header(path) -> SafetensorsHeader    tensor names, dtypes, shapes, offsets

Everything here reads JSON files and safetensors *headers* only (8-byte length + JSON),
so listing costs grow with the number of tensors, not their size: 100 checkpoints of a
7B model list in about half a second (``benchmarks/ls_speed.py``).

Layouts understood, per argument:

- a run: a folder with subfolders named by where in training they were saved (:data:`STEP_DIR`):
  Trainer ``checkpoint-N/``, pretraining ``stepN/`` and ``stepN-tokensXM/`` (OLMo, OLMoE, Pythia
  revisions saved locally; the token count is kept as ``Checkpoint.tokens``), ``step_N/``
  (torchtune), ``global_stepN/`` (DeepSpeed, GPT-NeoX), ``iter_NNNNNNN/`` (Megatron) and
  ``epoch_N/`` (torchtune; ``epoch_0`` holds the model after the first epoch, so its ``epoch`` is
  1). They come in numeric order (100 after 20); a final model saved at the run root comes after
  all of them, with the step from the root ``trainer_state.json`` (``global_step``) or ``None``.
  A step-named folder that a format claims as a whole (a Trainer ``checkpoint-N/`` holding a
  DeepSpeed ``global_stepN/``) is one checkpoint, not a run.
- a single checkpoint folder: full weights (``model.safetensors``, sharded safetensors with
  or without ``model.safetensors.index.json``, ``pytorch_model.bin`` shards) next to a
  ``config.json``, or a PEFT adapter (``adapter_config.json`` + ``adapter_model.*``): whatever
  a format in ``ckptsel.formats.FORMATS`` claims; the first that does describes it.

- a sweep: a folder whose subfolders (to three levels down) are runs, such as
  ``sweep/lr1e-5/checkpoint-*/`` and ``sweep/lr2e-5/checkpoint-*/``. Each run is named by
  its path below the sweep folder (``lr1e-5``).

Runs (ckptsel/DESIGN.md, "Runs and sweeps"). Every checkpoint belongs to exactly one run
(``Checkpoint.run``), and pre-memorization accuracy's history stays inside its run. A Trainer
run folder is one run; each run of a sweep is one run; a model folder given on its own is a run
of its own; checkpoint folders named by their step (``checkpoint-N``, ``step_N``,
``global_stepN``, ``iterN``) given as arguments belong to the run of the folder that holds them,
so a shell glob of one run's checkpoints is one run. Run names are the folder names, lengthened
by parent folders where two would clash.

Order: runs in the order given (a sweep's runs by name); inside a run, by step, so a shell glob
(``run/step_*``, where ``step_100`` sorts before ``step_20``) still comes out in training
order. A folder given twice is listed once.

A broken checkpoint (no weights, truncated or corrupt safetensors, an index naming a missing
shard, no ``config.json``) is returned with the broken format (``kind="error"``) and a one-line ``error``; it
never stops the others from being listed. Only a path that does not exist raises.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ckptsel.errors import CheckpointError
from ckptsel.formats import BROKEN, Checkpoint, claimed, format_of, no_weights, owned
from ckptsel.formats.files import is_number, moe_from_config, read_json, read_safetensors_header
from ckptsel.formats.hashing import FINGERPRINT_SCHEME, feed
from ckptsel.formats.hf import base_model_missing, hf_hub_cache, names_local_path, resolve_base_model

__all__ = ["CHECKPOINT_DIR", "STEP_DIR", "Checkpoint", "Position", "Run", "base_model_missing", "describe",
           "discover", "discover_runs", "epoch_and_loss", "fingerprint", "hf_hub_cache", "moe_from_config",
           "names_local_path", "no_loadable_checkpoint", "nothing_found", "position", "read_safetensors_header",
           "resolve_base_model", "step_dirs"]

log = logging.getLogger(__name__)


# --- trainer state -----------------------------------------------------------------------


def epoch_and_loss(state: dict, step: int) -> tuple[float | None, float | None]:
    """Epoch and training loss at ``step`` from a ``trainer_state.json`` dict.

    Loss: the ``loss`` entry of ``log_history`` logged at ``step`` or nearest before it
    (the Trainer logs a running mean every ``logging_steps``; eval entries and the final
    ``train_loss`` summary are not per-step losses and are skipped).
    Epoch: the state's own ``epoch`` when it was saved at ``step``; otherwise scaled from
    the logged entry nearest to ``step``, since the Trainer's epoch is linear in the step.
    """
    loss, loss_step = None, -1
    nearest, distance = None, None   # the logged entry with an epoch whose step is closest to `step`
    for entry in state.get("log_history") or []:
        at = entry.get("step") if isinstance(entry, dict) else None
        if not isinstance(at, int):
            continue
        if loss_step <= at <= step and is_number(entry.get("loss")):
            loss, loss_step = float(entry["loss"]), at
        if at > 0 and is_number(entry.get("epoch")) and (distance is None or abs(at - step) < distance):
            nearest, distance = entry, abs(at - step)
    if state.get("global_step") == step and is_number(state.get("epoch")):
        return float(state["epoch"]), loss
    epoch = nearest["epoch"] * step / nearest["step"] if nearest else None
    return epoch, loss


def _state_step(state: dict) -> int | None:
    """The step a trainer state was saved at: ``global_step``, else the last logged step."""
    if isinstance(state.get("global_step"), int):
        return state["global_step"]
    history = state.get("log_history") or []
    steps = [e["step"] for e in history if isinstance(e, dict) and isinstance(e.get("step"), int)]
    return max(steps, default=None)


# --- one checkpoint folder ----------------------------------------------------------------

# A folder named by where in training it was saved: Trainer checkpoint-N, DeepSpeed/GPT-NeoX
# global_stepN, OLMo/Pythia stepN and stepN-tokensXM, torchtune step_N and epoch_N, Megatron
# iter_NNNNNNN. Group "step" or "epoch" holds the number; "tokens" the token count as written.
STEP_DIR = re.compile(r"(?:checkpoint|global_step|step|iter)[-_]?(?P<step>\d+)(?:-tokens(?P<tokens>\d+[KMBT]?))?"
                      r"|epoch[-_]?(?P<epoch>\d+)")
CHECKPOINT_DIR = STEP_DIR  # the name other modules import


class Position(NamedTuple):
    """Where in training a folder's name says it was saved."""

    step: int | None
    epoch: int | None         # an epoch_N folder: N + 1 epochs done (torchtune counts from 0)
    tokens: str | None        # "1248M" from step312-tokens1248M

    @property
    def order(self) -> int:
        return self.step if self.step is not None else self.epoch


def position(name: str) -> Position | None:
    """The step (or epoch) and token count a folder's name gives, None for a name that gives none."""
    m = STEP_DIR.fullmatch(name)
    if m is None:
        return None
    if m["epoch"] is not None:
        return Position(None, int(m["epoch"]) + 1, None)
    return Position(int(m["step"]), None, m["tokens"])


def step_dirs(folder: Path) -> list[tuple[Position, Path]]:
    """``folder``'s subfolders named by a step or epoch (:data:`STEP_DIR`), in training order."""
    found = [(pos, p) for p in folder.iterdir() if (pos := position(p.name)) is not None and p.is_dir()]
    return sorted(found, key=lambda pp: (pp[0].order, pp[1].name))


def describe(folder: Path, base_model: str | None = None) -> Checkpoint:
    """Read one checkpoint folder's weights and config through the first format that claims it
    (:data:`ckptsel.formats.FORMATS`); a broken one gets the broken format (``kind="error"``) and a
    one-line ``error``.

    Training state (step, epoch, loss) is filled in by :func:`discover`, which knows the run.
    """
    ckpt = Checkpoint(path=folder, format=BROKEN)
    try:
        fmt = format_of(folder)
        fmt.describe(ckpt, base_model)
        ckpt.format = fmt
    except CheckpointError as exc:
        ckpt.error = str(exc)
    except OSError as exc:
        ckpt.error = f"cannot read {Path(exc.filename or folder).name}: {exc.strerror}"
    return ckpt


def _training_state(ckpt: Checkpoint, named: Position | None, run_state: dict | None) -> None:
    """Set step, epoch and loss from the folder's name and its own trainer_state.json, else the run's."""
    name_step = named.step if named is not None else None
    if named is not None:
        ckpt.tokens = named.tokens
    state, own_step = run_state, None
    own = ckpt.path / "trainer_state.json"
    if own.is_file():
        try:
            state = read_json(own)
            own_step = _state_step(state)
        except (CheckpointError, OSError) as exc:
            reason = str(exc).removeprefix("trainer_state.json: ")
            ckpt.notes.append(f"trainer_state.json ignored: {reason}")
            log.warning("%s: corrupt, ignored (%s)", own, reason)
    ckpt.step = name_step if name_step is not None else own_step
    if name_step is not None and own_step is not None and own_step != name_step:
        ckpt.notes.append(f"trainer_state.json says global_step {own_step}; using {name_step} from the folder name")
    if state is not None and ckpt.step is not None:
        ckpt.epoch, ckpt.train_loss = epoch_and_loss(state, ckpt.step)
    if named is not None and named.epoch is not None and ckpt.epoch is None:
        ckpt.epoch = float(named.epoch)


# --- runs and argument lists ---------------------------------------------------------------

NO_CHECKPOINT_DIRS = ", and no checkpoint-N/ folders"


def no_loadable_checkpoint(paths, checkpoints: list[Checkpoint]) -> str | None:
    """The one line every command gives when ``paths`` hold no loadable checkpoint, else None."""
    if any(c.format.usable for c in checkpoints):
        return None
    reasons = "; ".join(f"{c.path.name}: {c.error}" for c in checkpoints[:3])
    return f"no loadable checkpoint under {', '.join(map(str, paths))} ({reasons})"


def nothing_found(checkpoints: list[Checkpoint]) -> bool:
    """True when no argument held anything that looks like a checkpoint (not even a broken one)."""
    return all(not c.format.usable and (c.error or "").endswith(NO_CHECKPOINT_DIRS) for c in checkpoints)


def _read_state(path: Path) -> dict | None:
    try:
        return read_json(path) if path.is_file() else None
    except (CheckpointError, OSError) as exc:
        log.warning("%s: corrupt, ignored (%s)", path, str(exc).removeprefix(f"{path.name}: "))
        return None


def _expand(root: Path, base_model: str | None) -> tuple[bool, list[Checkpoint]]:
    """(is_run, checkpoints) for one argument: a run's checkpoints in step order, or one checkpoint."""
    named = position(root.name)
    # A step-named folder that a format claims is one checkpoint, whatever step-named folders it holds
    # (a Trainer checkpoint-N/ with DeepSpeed's global_stepN/ inside).
    children = [] if named is not None and claimed(root) else step_dirs(root)
    parts = set(owned(root)) if children else set()  # a final model's own subfolders (DeepSpeed's tag folder)
    children = [(pos, folder) for pos, folder in children if folder not in parts]
    if not children:
        run_state = _read_state(root.parent / "trainer_state.json") if named is not None else None
        ckpt = describe(root, base_model)
        _training_state(ckpt, named, run_state)
        if ckpt.error == no_weights():
            ckpt.error += NO_CHECKPOINT_DIRS
        return False, [ckpt]
    run_state = _read_state(root / "trainer_state.json")
    found = []
    for pos, folder in children:
        ckpt = describe(folder, base_model)
        _training_state(ckpt, pos, run_state)
        found.append(ckpt)
    # A final model at the root; not a lone config.json that the checkpoints read theirs from (FSDP runs).
    lends_config = not claimed(root) and any(c.base_model == str(root) for c in found)
    if _has_weights(root) and not lends_config:
        final = describe(root, base_model)
        _training_state(final, None, None)
        final.notes.append("final model at the run root")
        found.append(final)
    log.debug("%s: Trainer run with %d checkpoints", root, len(found))
    return True, found


@dataclass
class Run:
    """One training trajectory: its checkpoints in training order, and the folder that holds them.

    ``path`` is the run folder (a Trainer ``output_dir``); per-run files such as the training
    data a run was trained on (``--data-per-run``) are looked up there.
    """

    name: str
    path: Path
    checkpoints: list[Checkpoint]


_MAX_SWEEP_DEPTH = 3


def _has_weights(folder: Path) -> bool:
    """A model (or a broken one: a lone config.json) in ``folder`` itself, not only in checkpoint-N/ below it."""
    return (folder / "config.json").is_file() or claimed(folder)


def _is_run_dir(folder: Path) -> bool:
    try:
        return _has_weights(folder) or any(position(p.name) is not None and p.is_dir() for p in folder.iterdir())
    except OSError:
        return False


def _sweep_runs(root: Path, depth: int = 1) -> list[Path]:
    """Run folders below ``root`` (not ``root`` itself), by name, at most ``_MAX_SWEEP_DEPTH`` levels down."""
    found: list[Path] = []
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return found
    for child in children:
        if _is_run_dir(child):
            found.append(child)
        elif depth < _MAX_SWEEP_DEPTH:
            found.extend(_sweep_runs(child, depth + 1))
    return found


def _unique_names(paths: list[Path]) -> list[str]:
    """Folder names, with parent folders prepended (``a/run``) where two runs would share a name."""
    parts = [p.parts for p in paths]
    depth = [1] * len(paths)
    while True:
        names = ["/".join(pp[-d:]) for pp, d in zip(parts, depth)]
        clash = {n for n in names if names.count(n) > 1}
        grow = [i for i, n in enumerate(names) if n in clash and depth[i] < len(parts[i])]
        if not grow:
            return names
        for i in grow:
            depth[i] += 1


def discover_runs(paths: str | os.PathLike | Iterable[str | os.PathLike], base_model: str | None = None) -> list[Run]:
    """The runs under ``paths`` (see the module docstring for the rules), each in training order.

    ``base_model`` overrides every adapter's ``base_model_name_or_path`` (a local folder is
    made absolute; anything else is kept as a hub id). Raises :class:`CheckpointError` only
    for a path that does not exist or is not a folder; broken checkpoints are returned with
    ``kind="error"``.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    roots = [Path(os.path.abspath(os.path.expanduser(p))) for p in paths]
    if not roots:
        raise CheckpointError("no checkpoint paths given")
    for root in roots:
        if not root.exists():
            raise CheckpointError(f"{root}: no such file or directory")
        if not root.is_dir():
            raise CheckpointError(f"{root}: not a folder; pass the checkpoint folder ({root.parent})")
    if base_model is not None and Path(base_model).expanduser().is_dir():
        base_model = os.path.abspath(os.path.expanduser(base_model))

    # (run folder, its checkpoints, whether the run is a whole folder) in the order given.
    groups: dict[Path, tuple[list[Checkpoint], bool]] = {}
    seen: set[Path] = set()

    def add(run_dir: Path, found: list[Checkpoint], whole: bool) -> None:
        for ckpt in found:
            if (key := ckpt.path.resolve()) not in seen:
                seen.add(key)
                groups.setdefault(run_dir, ([], whole))[0].append(ckpt)

    for root in roots:
        is_run, found = _expand(root, base_model)
        if is_run:
            add(root, found, True)
            continue
        sweep = _sweep_runs(root) if found[0].error and found[0].error.startswith(no_weights()) else []
        if sweep:
            for run_dir in sweep:
                add(run_dir, _expand(run_dir, base_model)[1], True)
        elif position(root.name) is not None:  # checkpoint-N, step_N...: a checkpoint of the run that holds it
            add(root.parent, found, False)
        else:  # one model folder: a run of its own
            add(root, found, True)

    runs = []
    names = _unique_names(list(groups))
    sweep_names = {}
    for root in roots:  # a sweep's runs are named by their path below the sweep folder
        for run_dir in groups:
            if run_dir != root and root in run_dir.parents and run_dir not in sweep_names:
                sweep_names[run_dir] = run_dir.relative_to(root).as_posix()
    if len(set(sweep_names.values())) == len(sweep_names):
        names = [sweep_names.get(d, n) for d, n in zip(groups, names)]
    if len(set(names)) != len(names):
        names = _unique_names(list(groups))
    for (run_dir, (found, whole)), name in zip(groups.items(), names):
        if not whole and all(c.step is not None for c in found):
            found.sort(key=lambda c: c.step)
        elif not whole and all(c.step is None and c.epoch is not None for c in found):  # epoch_N folders
            found.sort(key=lambda c: c.epoch)
        for ckpt in found:
            ckpt.run = name
        runs.append(Run(name, run_dir, found))
    return runs


def discover(paths: str | os.PathLike | Iterable[str | os.PathLike], base_model: str | None = None) -> list[Checkpoint]:
    """Every run's checkpoints under ``paths``, run after run, each run in training order
    (:func:`discover_runs`; ``Checkpoint.run`` says which run each belongs to)."""
    return [ckpt for run in discover_runs(paths, base_model) for ckpt in run.checkpoints]


# --- fingerprint ----------------------------------------------------------------------------



@functools.lru_cache(maxsize=64)
def _folder_fingerprint(folder: str, stamp: tuple) -> str:
    """Fingerprint of a base-model folder; ``stamp`` (names, sizes, mtimes) keys the cache."""
    base = describe(Path(folder))
    if not base.format.usable:
        raise CheckpointError(f"base model {folder}: {base.error}")
    return fingerprint(base)


def _base_identity(base_model: str) -> bytes:
    folder = Path(base_model)
    if not folder.is_dir():
        return f"id:{base_model}".encode()
    stamp = tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder) if e.is_file()))
    return _folder_fingerprint(str(folder.resolve()), stamp).encode()


def fingerprint(ckpt: Checkpoint) -> str:
    """A content hash (sha256 hex) that keys a checkpoint's results in the store.

    Hashed: what the checkpoint's format feeds (:meth:`~ckptsel.formats.CheckpointFormat.fingerprint`;
    by default every tensor's name, dtype, shape and bytes, by name so resharding does not change it,
    and the model, adapter and tokenizer configs without the keys that only record where or with which
    version a file was written); for an adapter, the base model's own fingerprint (a local folder) or
    its hub id. Not hashed: paths and mtimes, so a copied or moved checkpoint keeps its fingerprint.
    Large checkpoints are sampled, not read whole (the trade-off: ckptsel/formats/hashing.py). A broken
    checkpoint raises :class:`CheckpointError`.
    """
    h = hashlib.sha256(FINGERPRINT_SCHEME)
    ckpt.format.fingerprint(ckpt, h)
    if ckpt.format.is_adapter and ckpt.base_model:
        feed(h, "base", _base_identity(ckpt.base_model))
    return h.hexdigest()
