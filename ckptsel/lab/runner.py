"""Run a lab grid: resumable, in parallel processes, reporting progress as events.

Layout of ``OUT``::

    OUT/bases/NAME/final/     a pretrained base (plain model folder) that runs with init NAME load
    OUT/RUN/                  a finished run: checkpoint-N/, train.jsonl, test.jsonl,
                              recipe.yaml, ground_truth.json, run.json
    OUT/.partial/...          work in progress

A run (or base) is trained and measured under ``.partial`` and renamed into place only
once its ``run.json`` is written, so "finished" is exactly "a folder with run.json": it is
skipped next time, and an interrupted one is deleted and restarted from scratch (partial
Trainer output is never mixed into a fresh run). ``run.json`` records the spec; a finished
run whose spec no longer matches the grid is an error, not a silent reuse.

The bases are trained first, then the runs; each stage goes to a pool of ``jobs``
processes with ``threads`` torch threads each. One thread per job is the default: these
models' matrices are too small for intra-op threads to pay, and on a shared machine
spinning threads burn CPU time for nothing (measured: 2 threads made a loaded machine
several times slower per step). Parallelism comes from ``jobs``.
Progress comes back as :class:`Event` values through a queue.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ckptsel.errors import RecipeError
from ckptsel.lab.grid import Grid
from ckptsel.lab.train import TrainSpec

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


@dataclass(frozen=True)
class Event:
    """Progress of one run or base: ``phase`` is train, truth, done, skipped or failed."""

    run: str
    phase: str
    done: int = 0
    total: int = 0
    message: str = ""


EventCallback = Callable[[Event], None]
# callbacks(run name, folder it trains into) -> Trainer callbacks for that run (in-process runs only).
CallbackFactory = Callable[[str, Path], Sequence]


@dataclass(frozen=True)
class _Job:
    """One unit of pool work: train ``spec`` into ``home`` (a base, or a run with ground truth)."""

    name: str
    spec: TrainSpec
    home: Path
    partial: Path
    base_dir: Path | None
    is_base: bool


def is_finished(folder: Path) -> bool:
    return (folder / RUN_FILE).exists()


def base_model_dir(out: Path, name: str) -> Path:
    return (Path(out) / "bases" / name / "final").resolve()


def _check_same_spec(folder: Path, spec: TrainSpec) -> None:
    recorded = json.loads((folder / RUN_FILE).read_text()).get("spec")
    current = spec.model_dump(mode="json")
    # A field added to TrainSpec since the run was trained matches when the run leaves it at its default.
    fields = type(spec).model_fields
    current = {k: v for k, v in current.items() if k in (recorded or {}) or v != fields[k].default}
    if recorded != current:
        raise RecipeError(
            f"{folder / RUN_FILE}: this finished run was trained with other settings than the grid now asks; "
            "delete the folder or use another --out"
        )


def _quiet_libraries(threads: int) -> None:
    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # per-shard save/load bars; the caller draws progress
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not ours
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _work(job: _Job, grid: Grid, threads: int, queue, callbacks: CallbackFactory | None = None) -> Event:
    """Train (and for runs, measure) one job; the body of a pool worker."""
    from ckptsel.lab.ground_truth import write_ground_truth
    from ckptsel.lab.train import train_run

    _quiet_libraries(threads)
    partial = job.partial
    shutil.rmtree(partial, ignore_errors=True)
    started, cpu_started = time.time(), time.process_time()

    def emit(phase: str) -> Callable[[int, int], None]:
        return lambda done, total: queue.put(Event(job.name, phase, done, total))

    try:
        train_run(
            job.spec, partial, name=job.name, base_dir=job.base_dir, on_step=emit("train"), save_final_model=job.is_base,
            callbacks=tuple(callbacks(job.name, partial)) if callbacks is not None else (),
        )
        if not job.is_base:
            write_ground_truth(partial, grid.ground_truth, on_checkpoint=emit("truth"))
        # Wall time depends on what else the machine runs; CPU time (all of this process's threads) is
        # what the grid costs on free cores, so both are kept.
        wall, cpu = time.time() - started, time.process_time() - cpu_started
        payload = {"spec": job.spec.model_dump(mode="json"), "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)}
        (partial / RUN_FILE).write_text(json.dumps(payload, indent=1))
        job.home.parent.mkdir(parents=True, exist_ok=True)
        partial.rename(job.home)
    except Exception as exc:  # one failed run must not lose the others
        log.debug("%s failed:\n%s", job.name, traceback.format_exc())
        return Event(job.name, "failed", message=f"{type(exc).__name__}: {exc}")
    return Event(job.name, "done", message=f"{wall:.0f} s ({cpu:.0f} CPU-s)")


class _Forward:
    """A queue-like object that hands each event to the callback at once (the in-process path)."""

    def __init__(self, notify: EventCallback):
        self.notify = notify

    def put(self, event: Event) -> None:
        self.notify(event)


def _drain(queue, notify: EventCallback) -> None:
    while not queue.empty():
        notify(queue.get_nowait())


def _run_jobs(jobs_list: list[_Job], grid: Grid, jobs: int, threads: int, notify: EventCallback,
              callbacks: CallbackFactory | None = None) -> list[Event]:
    """Run ``jobs_list`` in-process (jobs=1) or in a pool of spawned processes; one final event each."""
    results: list[Event] = []
    if jobs <= 1 or len(jobs_list) <= 1:
        forward = _Forward(notify)
        for job in jobs_list:
            results.append(_work(job, grid, threads, forward, callbacks))
            notify(results[-1])
        return results
    if callbacks is not None:
        raise ValueError("Trainer callbacks need in-process training (jobs=1)")
    ctx = mp.get_context("spawn")  # torch and fork do not mix
    with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        queue = manager.Queue()
        futures = {pool.submit(_work, job, grid, threads, queue): job.name for job in jobs_list}
        pending = set(futures)
        while pending:
            _drain(queue, notify)
            for future in [f for f in pending if f.done()]:
                pending.discard(future)
                try:
                    event = future.result()
                except Exception as exc:  # the worker process itself died
                    event = Event(futures[future], "failed", message=f"{type(exc).__name__}: {exc}")
                results.append(event)
                notify(event)
            time.sleep(0.2)
        _drain(queue, notify)
    return results


def run_grid(
    grid: Grid,
    out: Path,
    *,
    jobs: int = 1,
    threads: int | None = None,
    only: list[str] | None = None,
    on_event: EventCallback | None = None,
    callbacks: CallbackFactory | None = None,
) -> list[Event]:
    """Train the needed bases, then train and measure every unfinished run; one final event per run.

    Bases report events named ``bases/NAME``; they are not in the returned list unless they
    fail (then the runs that need them fail too). ``callbacks`` gives each run's Trainer more
    callbacks (``ckptsel demo`` attaches :class:`ckptsel.integrations.transformers.CkptselCallback`);
    runs trained in a pool of processes (``jobs`` > 1) cannot take them.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    specs = grid.expand()
    if only:
        unknown = sorted(set(only) - set(specs))
        if unknown:
            raise RecipeError(f"--only: no run named {', '.join(unknown)} in grid {grid.name}")
        specs = {n: s for n, s in specs.items() if n in only}
    threads = threads or 1
    notify = on_event or (lambda event: None)

    results: list[Event] = []
    todo: dict[str, TrainSpec] = {}
    for name, spec in specs.items():
        if is_finished(out / name):
            _check_same_spec(out / name, spec)
            results.append(Event(name, "skipped"))
            notify(results[-1])
        else:
            todo[name] = spec

    needed = sorted({s.init for s in todo.values() if s.init != "scratch"})
    base_jobs = []
    for name in needed:
        home = out / "bases" / name
        if is_finished(home):
            _check_same_spec(home, grid.bases[name])
        else:
            partial = out / ".partial" / f"bases-{name}"
            base_jobs.append(_Job(f"bases/{name}", grid.bases[name], home, partial, None, is_base=True))
    failed_bases = {e.run.removeprefix("bases/"): e for e in _run_jobs(base_jobs, grid, jobs, threads, notify) if e.phase == "failed"}

    run_jobs = []
    # Longest first, so that the last job to start is a short one and the pool drains evenly.
    for name, spec in sorted(todo.items(), key=lambda item: -item[1].steps()):
        if spec.init in failed_bases:
            results.append(Event(name, "failed", message=f"base {spec.init} failed: {failed_bases[spec.init].message}"))
            notify(results[-1])
            continue
        base_dir = base_model_dir(out, spec.init) if spec.init != "scratch" else None
        run_jobs.append(_Job(name, spec, out / name, out / ".partial" / name, base_dir, is_base=False))
    results.extend(_run_jobs(run_jobs, grid, jobs, threads, notify, callbacks))
    return results
