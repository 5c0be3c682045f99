"""Measure each checkpoint as the Trainer saves it: :class:`CkptselCallback`.

    from ckptsel.integrations.transformers import CkptselCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    CkptselCallback(data="train.jsonl", recipe="gsm8k", max_examples=100).attach(trainer)
    trainer.train()

On every save (``every_n_saves``) the callback measures the checkpoint just written to
``OUTPUT_DIR/checkpoint-N`` with the model already in memory -- no reload -- exactly as
``ckptsel rank`` measures the saved folder (target NLL, k graded samples, the
over-memorization proxies), stores the results under the same keys (the folder's content
fingerprint, the same settings key), ranks the run's checkpoints so far, and logs
``ckptsel/KEY`` for every column of :data:`ckptsel.columns.COLUMNS` marked ``log`` (``premem_acc``,
``train_acc``, ``memorized_frac``, ...), the flag's proxy
(``ckptsel/alt_nll``, ``ckptsel/perturb_nll`` or ``ckptsel/heldout_nll``), ``ckptsel/stage``
(0 underfit, 1 generalizing, 2 over-memorized) and ``ckptsel/recommended_step`` through the
Trainer's own ``log`` -- TensorBoard, W&B and the console get them beside the loss. After
training, ``ckptsel rank OUTPUT_DIR --data ... --recipe ... --max-examples ...`` with the same
options measures nothing (:meth:`CkptselCallback.rank_command` is that command).

Training is not disturbed: the measurement runs in eval mode under ``torch.no_grad`` and
afterwards every module's train/eval mode and every random state (Python ``random``, NumPy,
torch CPU, torch CUDA on all devices) are put back, so a run with the callback is
bit-identical to one without it (tests/test_callback.py trains both and compares).

What is measured where:

* the model's own device and dtype. The dtype is part of the store key: a run trained in
  float32 on a GPU (fp32 master weights, bf16 autocast) is measured in float32, and a later
  ``ckptsel rank`` reuses it with ``--dtype float32`` (``rank_command`` adds it when the
  machine's default would differ).
* PEFT models: the saved folder is an adapter; the in-memory ``PeftModel`` computes what the
  adapter on its base computes, so the results are keyed by the adapter folder as
  ``ckptsel rank`` keys them.
* distributed runs: only the main process (``state.is_world_process_zero``) measures and
  logs; with ``stop_on_overmemorization`` its decision is broadcast to the other processes
  (they wait at that broadcast while it measures, so the measurement must fit in the process
  group's timeout).
* a checkpoint that the store lacks and that is not the one in memory (an earlier save the
  callback did not see) is read from disk, as ``ckptsel rank`` would.
* a save without full weights (DeepSpeed ZeRO-3 without ``stage3_gather_16bit_weights_on_model_save``:
  ``global_stepN/`` shards only; FSDP's sharded state dict): the model in memory is partitioned across
  the processes, so the save is not measured; the report says so in one line (``failure``) and training
  goes on. ``ckptsel rank`` of the output folder measures those checkpoints afterwards from their
  converted copies. (ZeRO-1/2 saves carry ``model.safetensors`` and are measured as usual.)
* the run is what is on disk: with ``save_total_limit`` the rotated-away checkpoints leave it,
  so pre-memorization accuracy's history and the alternative-solution harvest start at the
  oldest checkpoint kept (as ``ckptsel rank`` of the folder would see it then), and when that
  changes the kept checkpoints' alternative-solution NLL is measured again, from disk.
* ``every_n_saves`` > 1: the run is the saves measured; a later ``ckptsel rank`` of the folder
  measures the saves the callback skipped.

With ``stop_on_overmemorization`` the callback sets ``control.should_training_stop`` once
``patience`` saves in a row are flagged over-memorized (the flag of :mod:`ckptsel.stages`,
read from the checkpoints saved so far). The decision at save j sees only checkpoints up to
j, so "train accuracy near the run's best" means near the best so far: the newest checkpoint
can be flagged one save earlier than a ranking of the whole run flags it, and the stopped
run's recommendation is made among the checkpoints before the stop
(``benchmarks/callback_validation.py`` prints both on the lab).

The Trainer does not hand callbacks to itself; :meth:`CkptselCallback.attach` adds the
callback and keeps the trainer to log through (as TRL's callbacks take ``trainer=``). Added
with ``Trainer(callbacks=[...])`` instead, the numbers go into ``state.log_history`` (and so
into later checkpoints' ``trainer_state.json``) but not to TensorBoard or W&B. With TRL's
``SFTTrainer``, whose ``log`` also flushes its running token metrics, those land in the
callback's log entry when the save falls between two of the Trainer's own logging steps.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from transformers import TrainerCallback

from ckptsel.columns import COLUMNS
from ckptsel.errors import CkptselError
from ckptsel.measure.protocols import LoadedCheckpoint, Loader

if TYPE_CHECKING:
    from ckptsel.select import Ranking
    from ckptsel.settings import EngineSettings

log = logging.getLogger(__name__)

# Training examples measured per save. 100 gives pre-memorization accuracy a 95% interval of
# about +-0.1 (a mean of per-example accuracies in [0, 1]: standard error <= 0.5/sqrt(100)),
# enough to see a run go from underfit to generalizing to over-memorized, at a cost that does
# not grow with the training set (benchmarks/callback_cost.py prints it against training time).
DEFAULT_MAX_EXAMPLES = 100
STAGE_CODES = {"underfit": 0, "generalizing": 1, "over-memorized": 2}


@dataclass
class SaveReport:
    """What the callback measured at one save (the argument of ``on_measured``)."""

    step: int
    checkpoint: Path
    metrics: dict[str, float]  # the logged values, "ckptsel/..." keys
    stage: str | None
    proxy: str | None
    flag_reason: str | None  # why it is flagged over-memorized (None when it is not)
    recommended_step: int | None
    seconds: float  # wall time of the measurement
    measured: int  # checkpoints measured (0: all came from the store)
    stop: bool = False  # the callback asked the Trainer to stop here
    failure: str | None = None  # the checkpoint could not be measured (one line)
    memorised_rows: list[int] = field(default_factory=list)  # training-file rows memorised at this save
    ranking: Ranking | None = field(default=None, repr=False)  # the run so far

    def line(self) -> str:
        """One console line: the numbers, the stage by name, and the flag's reason."""
        if self.failure:
            return f"ckptsel step {self.step}: not measured: {self.failure}"
        m = self.metrics
        proxy = f", {self.proxy} {m[f'ckptsel/{self.proxy}']:.3f}" if self.proxy and f"ckptsel/{self.proxy}" in m else ""
        text = (f"ckptsel step {self.step}: pre-mem acc {_num(m.get('ckptsel/premem_acc'))}, train acc "
                f"{_num(m.get('ckptsel/train_acc'))}, memorised {_num(m.get('ckptsel/memorized_frac'))}{proxy} "
                f"-> {self.stage or '?'} ({self.seconds:.1f} s)")
        if self.flag_reason:
            text += f"; {self.flag_reason}"
        if self.stop:
            text += "; stopping training"
        return text


def _num(value) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


class CkptselCallback(TrainerCallback):
    """Measure, store, rank and log each checkpoint as the Trainer saves it (module docstring).

    ``data``: the training file (or folder) and ``recipe`` (a built-in name, a path, or a
    :class:`ckptsel.settings.Recipe`) as ``ckptsel rank --data --recipe`` takes them;
    ``max_examples`` / ``examples_seed``: the fixed subset measured (``None``: all);
    ``cache_dir``: the result store (default ``$CKPTSEL_CACHE`` or the user cache dir, as
    ``ckptsel rank``); ``heldout`` and ``threshold`` as ``--heldout`` and ``--threshold``.
    ``every_n_saves``: measure every n-th save only. ``stop_on_overmemorization`` and
    ``patience``: stop after that many flagged saves in a row. ``on_measured``: called with
    a :class:`SaveReport` after each measurement (default: one line to stderr);
    ``batch_size``: rows per forward pass (default automatic). ``reweight``: memorization-aware
    reweighting (off by default): examples found memorised at a measured save are drawn with this
    weight (0 <= w < 1) for the rest of training (:mod:`ckptsel.integrations.reweighting`).
    ``engine``: the measurement settings of ``ckptsel rank``'s engine options
    (:class:`ckptsel.settings.EngineSettings`: ``trust_remote_code``, ``allow_pickle``, ...) for what is read
    from disk; the device and dtype are always the model's.

    Each save's run goes through the ranking's own preparation (:func:`ckptsel.prepare.prepare`): the
    architecture, grader and context checks (a failed check is the save's ``failure``; training goes on)
    and the rendered rows kept in the store.
    """

    def __init__(
        self,
        data: str | Path,
        recipe,
        *,
        max_examples: int | None = DEFAULT_MAX_EXAMPLES,
        examples_seed: int = 0,
        cache_dir: str | Path | None = None,
        stop_on_overmemorization: bool = False,
        patience: int = 1,
        every_n_saves: int = 1,
        heldout: str | Path | None = None,
        threshold: float | str | None = None,
        batch_size: int | None = None,
        on_measured: Callable[[SaveReport], None] | None = None,
        reweight: float | None = None,
        engine: EngineSettings | None = None,
    ):
        from ckptsel.settings import Recipe

        if patience < 1 or every_n_saves < 1:
            raise CkptselError("patience and every_n_saves must be at least 1")
        if reweight is not None and not 0.0 <= reweight < 1.0:
            raise CkptselError(f"reweight is the weight of memorised examples, 0 <= w < 1; got {reweight!r}")
        self.data = Path(data)
        self._recipe = recipe if isinstance(recipe, Recipe) else None
        self._recipe_arg = str(recipe) if not isinstance(recipe, Recipe) else None
        self.max_examples = max_examples
        self.examples_seed = examples_seed
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.stop_on_overmemorization = stop_on_overmemorization
        self.patience = patience
        self.every_n_saves = every_n_saves
        self.heldout = None if heldout is None else Path(heldout)
        self.threshold = threshold
        self.batch_size = batch_size
        self.on_measured = on_measured if on_measured is not None else _print_line
        self.reports: list[SaveReport] = []
        self._trainer = None
        self._saves = 0
        self._flagged_in_a_row = 0
        self._measured_steps: set[int] = set()
        self.engine = engine
        self._dtype: str | None = None
        self._warned_unattached = False
        self._said = _OncePerMessage()  # the preparation's warnings (rows dropped, unreadable references): once a run
        self.reweight = reweight
        self._dataloader = None  # the Trainer's training data loader (reweighting only)
        self._sampler = None  # ckptsel.integrations.reweighting.ReweightedSampler, once installed
        self._n_rows: int | None = None  # rows of the training file
        self.down_weighted: set[int] = set()  # training-file rows drawn with weight `reweight`

    @property
    def recipe(self):
        """The recipe, read on first use (a recipe file may be written just before training starts)."""
        if self._recipe is None:
            from ckptsel.recipes import load_recipe

            self._recipe = load_recipe(self._recipe_arg)
        return self._recipe

    def attach(self, trainer) -> CkptselCallback:
        """Add this callback to ``trainer`` and log through ``trainer.log``; returns the callback."""
        self._trainer = trainer
        trainer.add_callback(self)
        return self

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # a bad recipe or a missing data file: say so before the first step
            self.recipe  # noqa: B018
            if not self.data.exists():
                raise CkptselError(f"{self.data}: training data not found")
        if self.reweight is not None:
            self._dataloader = kwargs.get("train_dataloader")
        return control

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._saves += 1
        if (self._saves - 1) % self.every_n_saves:
            return control
        stop = False
        report = None
        if state.is_world_process_zero:
            report = self.measure_save(args, state, model, processing_class)
            if report is not None:
                stop = report.stop
        if self.reweight is not None and self._dataloader is not None:
            found = (report.memorised_rows, self._n_rows) if report is not None and report.failure is None else None
            self._reweight(_broadcast_from_main(found), args, state)
        if self.stop_on_overmemorization:
            stop = _broadcast_from_main(stop)
        if stop:
            control.should_training_stop = True
        return control

    def rank_command(self, output_dir: str | Path) -> str:
        """The ``ckptsel rank`` command that reads what this callback stored, measuring nothing."""
        parts = ["ckptsel rank", str(output_dir), "--data", str(self.data),
                 "--recipe", self._recipe_arg or "RECIPE.yaml"]
        if self.max_examples is not None:
            parts += ["--max-examples", str(self.max_examples)]
        if self.examples_seed:
            parts += ["--examples-seed", str(self.examples_seed)]
        if self.cache_dir is not None:
            parts += ["--cache-dir", str(self.cache_dir)]
        if self.heldout is not None:
            parts += ["--heldout", str(self.heldout)]
        if self.threshold is not None:
            parts += ["--threshold", str(self.threshold)]
        if self.engine is not None:  # what reading the run from disk needs
            parts += [flag for flag, on in (("--allow-pickle", self.engine.allow_pickle),
                                            ("--trust-remote-code", self.engine.trust_remote_code)) if on]
        if self._dtype is not None:
            from ckptsel.collect import resolved_dtype_name
            from ckptsel.settings import EngineSettings

            if resolved_dtype_name(EngineSettings()) != self._dtype:
                parts += ["--dtype", self._dtype]
        return " ".join(parts)

    # ------------------------------------------------------------------ one save

    def measure_save(self, args, state, model, processing_class) -> SaveReport | None:
        """Measure the checkpoint saved at ``state.global_step``, log it, and decide on stopping."""
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if model is None or not folder.is_dir():
            log.warning("ckptsel: no %s after the save; nothing measured", folder)
            return None
        started = time.perf_counter()
        try:
            report = self._measure(folder, state.global_step, model, processing_class)
        except CkptselError as err:  # bad data or recipe, an unreadable store: say so, keep training
            report = SaveReport(state.global_step, folder, {}, None, None, None, None, 0.0, 0, failure=str(err))
        report.seconds = time.perf_counter() - started
        if report.failure is None:
            self._measured_steps.add(state.global_step)
            flagged = report.stage == "over-memorized"
            self._flagged_in_a_row = self._flagged_in_a_row + 1 if flagged else 0
            report.stop = self.stop_on_overmemorization and self._flagged_in_a_row >= self.patience
            self._log(state, {**report.metrics, "ckptsel/seconds": round(report.seconds, 3)})
        self.reports.append(report)
        self.on_measured(report)
        return report

    def _measure(self, folder: Path, step: int, model, processing_class) -> SaveReport:
        from ckptsel.collect import collect
        from ckptsel.prepare import prepare
        from ckptsel.select import rank
        from ckptsel.store import Store

        run, index = self._run_so_far(folder, step)
        if (unusable := _unusable(folder, step, run, index)) is not None:
            return unusable
        request = self._request(run, self.engine_for(model))
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        with Store.open(self.cache_dir) as store:
            # The ranking's preparation (ckptsel.prepare): architecture, grader and context checks, the rendered rows.
            with self._said.on("ckptsel.prepare", "ckptsel.checks"):
                prepared = prepare(request, store, tokenizer=tokenizer)[0]
            if (unusable := _unusable(folder, step, run, index)) is not None:  # another architecture than the run's
                return unusable
            current = run.checkpoints[index]
            self._n_rows = prepared.rendered.n_rows
            loader = _InMemoryLoader(current.path.resolve(), model, tokenizer, request.engine)
            with _measurement_mode(model):
                collected = collect(run.checkpoints, prepared.examples, self.recipe, store, tokenizer=None,
                                    sizes=prepared.rendered.budgets, engine=request.engine, heldout=prepared.heldout,
                                    proxy_settings=self.recipe.proxies, loader=loader)
            loader.close()
            ranking = rank([collected], store, self.recipe.memorization, self.recipe.stages,
                           pathway_settings=self.recipe.pathways, threshold=self.threshold,
                           run_names=[run.name], run_paths=[str(run.path)])
        return self._report(step, folder, ranking, index, collected.loaded, prepared.examples)

    def _run_so_far(self, folder: Path, step: int):
        """The run as discovered now, up to this save (with every_n_saves > 1, the saves measured), and the
        position of this save in it (None when discovery does not find it)."""
        from ckptsel.discover import Run, discover_runs

        found = discover_runs([folder.parent])[0]
        current = folder.resolve()
        checkpoints = [c for c in found.checkpoints if c.step is not None and c.step <= step and (
            self.every_n_saves == 1 or c.step in self._measured_steps or c.path.resolve() == current)]
        index = next((i for i, c in enumerate(checkpoints) if c.path.resolve() == current), None)
        return Run(found.name, found.path, checkpoints), index

    def _request(self, run, engine):
        """The :class:`~ckptsel.prepare.RankRequest` ``ckptsel rank`` would build for this run (rank_command)."""
        from ckptsel.prepare import RankRequest

        return RankRequest(paths=(run.path,), recipe=self.recipe, data=self.data, threshold=self.threshold,
                           max_examples=self.max_examples, examples_seed=self.examples_seed, heldout=self.heldout,
                           engine=engine, cache_dir=self.cache_dir, runs=(run,))

    def engine_for(self, model):
        """The measurement settings: the callback's ``engine`` (remote code, pickled weights, ...) on the model's
        own device and dtype, and ``batch_size`` when given."""
        from ckptsel.settings import EngineSettings

        param = next(model.parameters())
        self._dtype = str(param.dtype).removeprefix("torch.")
        update = {"device": str(param.device), "dtype": self._dtype}
        if self.batch_size is not None:
            update["batch_size"] = self.batch_size
        return (self.engine or EngineSettings()).model_copy(update=update)

    def _report(self, step: int, folder: Path, ranking, index: int, loaded: int, examples) -> SaveReport:
        """The save's row of the ranking as logged metrics, its stage, flag and the run's recommendation."""
        row = ranking.checkpoints[index]
        if row.error:
            return SaveReport(step, folder, {}, None, None, None, None, 0.0, loaded, failure=row.error, ranking=ranking)
        metrics = {f"ckptsel/{column.key}": getattr(row, column.key) for column in COLUMNS if column.log}
        if ranking.proxy is not None:
            metrics[f"ckptsel/{ranking.proxy}"] = getattr(row, ranking.proxy)
        if row.stage in STAGE_CODES:
            metrics["ckptsel/stage"] = STAGE_CODES[row.stage]
        rec = ranking.checkpoints[ranking.recommended].step if ranking.recommended is not None else None
        if rec is not None:
            metrics["ckptsel/recommended_step"] = rec
        metrics = {k: float(v) for k, v in metrics.items() if v is not None and not math.isnan(float(v))}
        reason = row.flag.reason() if row.flag is not None else None
        return SaveReport(step, folder, metrics, row.stage, ranking.proxy, reason, rec, 0.0, loaded,
                          ranking=ranking, memorised_rows=_memorised_rows(ranking, index, examples))

    def _reweight(self, found, args, state) -> None:
        """Down-weight the rows memorised at this save from the next epoch on (ckptsel.integrations.reweighting)."""
        from ckptsel.integrations import reweighting

        if found is None:
            return
        rows, n_rows = found
        new = set(rows) - self.down_weighted
        if new and self._sampler is None:
            seed = args.data_seed if args.data_seed is not None else args.seed
            installed = reweighting.install(self._dataloader, n_rows, seed)
            if isinstance(installed, str):
                log.warning("ckptsel: reweighting off: %s", installed)
                self._dataloader = None
                return
            self._sampler = installed
        self.down_weighted |= new
        if self._sampler is not None:
            self._sampler.weights[:] = 1.0
            self._sampler.weights[sorted(self.down_weighted)] = self.reweight
        if state.is_world_process_zero:
            self._log(state, {"ckptsel/reweighted": float(len(self.down_weighted)),
                              "ckptsel/reweight": float(self.reweight)})

    def _log(self, state, metrics: dict[str, float]) -> None:
        if self._trainer is not None:
            self._trainer.log(dict(metrics))
            return
        state.log_history.append({**metrics, "step": state.global_step})
        if not self._warned_unattached:
            log.warning("ckptsel: callback added without CkptselCallback.attach(trainer): its numbers go to "
                        "trainer_state.json only, not to TensorBoard/W&B/the console log")
            self._warned_unattached = True


class _OncePerMessage(logging.Filter):
    """Lets each distinct log message through once: the callback prepares the run at every save, and the
    data's warnings are the same each time."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True

    @contextmanager
    def on(self, *names: str):
        """This filter on the named loggers (where the records are made) while the block runs."""
        loggers = [logging.getLogger(name) for name in names]
        for logger in loggers:
            logger.addFilter(self)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(self)


def _unusable(folder: Path, step: int, run, index: int | None) -> SaveReport | None:
    """The failed report of a save that cannot be measured (not found, unreadable, or partitioned), else None."""
    if index is None or not run.checkpoints[index].format.usable:
        reason = run.checkpoints[index].error if index is not None else "not found by discovery"
        return SaveReport(step, folder, {}, None, None, None, None, 0.0, 0, failure=f"{folder}: {reason}")
    saved = run.checkpoints[index]
    if saved.format.converts:
        # No full weights in the save (DeepSpeed ZeRO-3 shards, FSDP's sharded state): the model in memory is
        # partitioned across the training processes, so the main process cannot run it alone.
        return SaveReport(step, folder, {}, None, None, None, None, 0.0, 0, failure=(
            f"{folder}: saved as {saved.format.label(saved)}, the model in memory partitioned across the "
            "training processes: not measured during training; `ckptsel rank` of the output folder measures it "
            "afterwards from its converted copy (DeepSpeed's shards with --allow-pickle)"))
    return None


def _memorised_rows(ranking, index: int, examples) -> list[int]:
    """Training-file rows of the measured examples memorised at checkpoint ``index`` of the run (the ranking's mask)."""
    per_example = ranking.per_example
    measured = [int(i) for i in per_example.get("measured_index", ())]
    if index not in measured:
        return []
    row = measured.index(index)
    mask = per_example["memorized"][row] & ~np.isnan(per_example["nll"][row])
    return [ex.index for ex, memorised in zip(examples, mask) if memorised]


def _print_line(report: SaveReport) -> None:
    """The default ``on_measured``: one line on stderr, written around a tqdm bar if one is drawn."""
    import sys

    from tqdm.auto import tqdm

    tqdm.write(report.line(), file=sys.stderr)


class _InMemoryLoader(Loader):
    """The :class:`~ckptsel.measure.protocols.Loader` for :func:`ckptsel.collect.collect` in the Trainer:
    the checkpoint at ``path`` is the model in memory; any other is read from disk (made on first need)."""

    def __init__(self, path: Path, model, tokenizer, engine):
        self._path, self._model, self._tokenizer, self._engine = path, model, tokenizer, engine
        self._disk = None

    def tokenizer_for(self, ckpt):
        if self._tokenizer is None:
            from ckptsel.measure.loading import load_tokenizer

            self._tokenizer = load_tokenizer(ckpt, trust_remote_code=self._engine.trust_remote_code)
        return self._tokenizer

    def load(self, ckpt) -> LoadedCheckpoint:
        from ckptsel.measure.loading import CheckpointLoader

        if ckpt.path.resolve() == self._path:
            return LoadedCheckpoint(self._model, self.tokenizer_for(ckpt))
        if self._disk is None:
            self._disk = CheckpointLoader.for_engine(self._engine).__enter__()
        log.info("ckptsel: %s is not in the store; reading it from disk", ckpt.path)
        return self._disk.load(ckpt)

    @property
    def base_loads(self) -> int:
        return 0 if self._disk is None else self._disk.base_loads

    def close(self) -> None:
        if self._disk is not None:
            self._disk.close()
            self._disk = None


@contextmanager
def _measurement_mode(model):
    """Eval mode and no grad inside; every module's mode and every random state restored after."""
    import random

    import numpy as np
    import torch

    modes = [(m, m.training) for m in model.modules()]
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if cuda else None)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


def _broadcast_from_main(value):
    """The main process's ``value`` on every process of a distributed run (itself when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
