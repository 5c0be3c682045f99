"""``ckptsel lab``: train tiny models whose ground truth is known, and summarise them."""

from __future__ import annotations

from pathlib import Path

import click

from ckptsel.cli.options import json_option, print_json, quiet_option, stderr_console, stdout_console


@click.group()
def lab():
    """Tiny models trained here from scratch, with held-out ground truth per checkpoint.

    \b
    ckptsel lab run main --out runs/lab --jobs 2     train the main grid (recipes/lab/main.yaml)
    ckptsel lab table runs/lab                       did memorisation and over-memorization happen?
    """


def resolve_grid(name_or_path: str) -> Path:
    """A grid file by path, or a built-in grid by name (``recipes/lab/NAME.yaml``)."""
    from ckptsel.errors import RecipeError
    from ckptsel.recipes import recipes_dir

    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    builtin = recipes_dir() / "lab" / f"{name_or_path}.yaml"
    if "/" not in name_or_path and builtin.is_file():
        return builtin
    known = ", ".join(sorted(p.stem for p in (recipes_dir() / "lab").glob("*.yaml")))
    raise RecipeError(f"grid not found: {name_or_path} (built-in grids: {known})")


@lab.command("run")
@click.argument("grid")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for the runs.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True, help="Runs trained in parallel processes.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch threads per job [default: 1; use --jobs for parallelism].")
@click.option("--only", multiple=True, help="Train only this run (repeatable).")
@json_option
@quiet_option
def run(grid, out, jobs, threads, only, as_json, quiet):
    """Train every run of GRID (a file, or a built-in name) into OUT, with ground truth.

    Finished runs are skipped; an interrupted run restarts from scratch.

    \b
    ckptsel lab run ci --out /tmp/lab-ci
    ckptsel lab run recipes/lab/main.yaml --out runs/lab --jobs 2
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ckptsel.lab.grid import load_grid
    from ckptsel.lab.runner import run_grid

    spec = load_grid(resolve_grid(grid))
    runs = spec.expand()
    if only:
        runs = {n: s for n, s in runs.items() if n in only}
    console = stderr_console(quiet)
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, disable=quiet,
    )
    overall = progress.add_task(f"grid {spec.name}", total=len(runs))
    tasks: dict[str, int] = {}
    failures: list[tuple[str, str]] = []

    def on_event(event):
        if event.phase in ("train", "truth"):
            label = f"  {event.run} [{'training' if event.phase == 'train' else 'ground truth'}]"
            if event.run not in tasks:
                tasks[event.run] = progress.add_task(label, total=event.total)
            progress.update(tasks[event.run], description=label, completed=event.done, total=event.total)
            return
        if event.run in tasks:
            progress.remove_task(tasks.pop(event.run))
        if event.run.startswith("bases/"):
            return
        progress.advance(overall)
        if event.phase == "failed":
            failures.append((event.run, event.message))
            progress.console.print(f"[red]failed[/] {event.run}: {event.message}")
        elif event.phase == "done":
            progress.console.print(f"done {event.run} ({event.message})")

    with progress:
        results = run_grid(spec, out, jobs=jobs, threads=threads, only=list(only) or None, on_event=on_event)
    summary = {e.run: {"status": e.phase, "message": e.message} for e in results}
    if as_json:
        print_json({"grid": spec.name, "out": str(out.resolve()), "runs": summary})
    elif not quiet:
        done = sum(e.phase == "done" for e in results)
        skipped = sum(e.phase == "skipped" for e in results)
        console.print(f"{done} trained, {skipped} already there, {len(failures)} failed -> {out}")
        console.print(f"next: ckptsel lab table {out}")
    if failures:
        raise SystemExit(1)


@lab.command("table")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@json_option
def table(out, as_json):
    """Per-run ground truth of the finished runs in OUT, and the phenomena checks.

    \b
    ckptsel lab table runs/lab
    """
    from ckptsel.lab.ground_truth import FILENAME, read_ground_truth
    from ckptsel.lab.summary import phenomena, summarize

    runs = sorted(p.parent for p in out.glob(f"*/{FILENAME}"))
    summaries = [summarize(r.name, read_ground_truth(r)) for r in runs]
    if as_json:
        print_json({"runs": [s.as_dict() for s in summaries], "phenomena": phenomena(summaries)})
        return
    from rich import box
    from rich.table import Table

    t = Table(title=f"lab runs in {out}", box=box.SIMPLE_HEAD, caption="acc: held-out accuracy (final, best); NLL: held-out reference NLL; rise: max NLL / running min")
    t.add_column("run", no_wrap=True)
    for col in ("steps", "acc", "best", "train", "copy", "pert", "NLL min", "NLL end", "rise", "over-mem at"):
        t.add_column(col, justify="right")
    for s in summaries:
        pert = "-" if s.final_perturbed_acc is None else f"{s.final_perturbed_acc:.2f}"
        t.add_row(
            s.run, str(s.steps), f"{s.final_test_acc:.2f}", f"{s.best_test_acc:.2f}", f"{s.final_train_acc:.2f}",
            f"{s.final_copy_rate:.2f}", pert, f"{s.min_test_nll:.3f}", f"{s.final_test_nll:.3f}",
            f"{s.max_nll_rise:.2f}", ",".join(map(str, s.overmemorized_steps)) or "-",
        )
    console = stdout_console()
    console.print(t)
    if summaries:
        checks = phenomena(summaries)
        mark = {True: "[green]yes[/]", False: "[red]no[/]"}
        console.print(f"held-out accuracy spread {checks['accuracy_spread']['value']:.2f} (>= 0.4): {mark[checks['accuracy_spread']['ok']]}")
        console.print(f"memorising runs (gap >= 0.2, copy > 0.5): {', '.join(checks['memorising_runs']['runs']) or 'none'}")
        console.print(f"over-memorized runs (NLL >= 1.25x running min, acc within 0.05 of best, best >= 0.3): {', '.join(checks['overmemorized_runs']['runs']) or 'none'}")
