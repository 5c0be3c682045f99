"""``ckptsel demo``: train one small run here, then run ckptsel on its checkpoints."""

from __future__ import annotations

from pathlib import Path

import click

from ckptsel.cli.options import quiet_option, stderr_console, stdout_console

DEMO_GRID = "demo"
DEMO_RUN = "demo"


@click.command("demo")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("ckptsel-demo"), show_default=True,
    help="Folder for the demo run (reused when it is already there).",
)
@quiet_option
@click.pass_context
def demo(ctx, out, quiet):
    """Train a tiny model on synthetic arithmetic, then list and inspect its checkpoints.

    Takes under three minutes on one CPU core; nothing is downloaded. The run folder is a
    real Trainer run (checkpoint-N/ folders, train.jsonl, recipe.yaml) with the true
    held-out accuracy and held-out NLL of every checkpoint in ground_truth.json, so you can
    see what ckptsel is meant to predict from the training data alone.

    \b
    ckptsel demo
    ckptsel demo --out /tmp/demo
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ckptsel.cli.lab import resolve_grid
    from ckptsel.cli.ls import ls
    from ckptsel.lab.grid import load_grid
    from ckptsel.lab.ground_truth import read_ground_truth
    from ckptsel.lab.runner import run_grid

    err = stderr_console(quiet)
    out_console = stdout_console()
    grid = load_grid(resolve_grid(DEMO_GRID))
    err.print(f"[bold]1/3[/] training a tiny model on synthetic sums into {out} (resumable)")
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, disable=quiet,
    )
    tasks: dict[str, int] = {}

    def on_event(event):
        if event.phase not in ("train", "truth"):
            return
        label = "  training (steps)" if event.phase == "train" else "  ground truth (checkpoints)"
        if event.phase not in tasks:
            tasks[event.phase] = progress.add_task(label, total=event.total)
        progress.update(tasks[event.phase], completed=event.done, total=event.total)

    with progress:
        (result,) = run_grid(grid, out, jobs=1, on_event=on_event)
    if result.phase == "failed":
        raise click.ClickException(f"the demo run failed: {result.message}")
    run_dir = out / DEMO_RUN

    err.print(f"\n[bold]2/3[/] what ckptsel finds in the run (ckptsel ls {run_dir})")
    ctx.invoke(ls, paths=(str(run_dir),), base_model=None, with_fingerprint=False, as_json=False)

    err.print("\n[bold]3/3[/] the truth ckptsel should recover from training data alone (ground_truth.json)")
    _print_truth(out_console, read_ground_truth(run_dir))
    err.print("\n[bold]What to look at[/]")
    for line in _observations(read_ground_truth(run_dir)):
        err.print(f"  - {line}")
    err.print(f"  - the data and how it renders: {run_dir}/train.jsonl, {run_dir}/recipe.yaml (held-out: test.jsonl)")
    from ckptsel.cli import COMMANDS

    if "rank" in COMMANDS:
        err.print(
            "  - now let ckptsel judge the checkpoints from the training data alone, and compare with the table above:\n"
            f"      ckptsel rank {run_dir} --data {run_dir}/train.jsonl --recipe {run_dir}/recipe.yaml"
        )


def _observations(truth: dict) -> list[str]:
    """Plain-language reading of the run's ground-truth curves."""
    from ckptsel.lab.summary import curves

    c = curves(truth)
    lines = [
        f"held-out accuracy went from {c.test_acc[0]:.2f} to {c.test_acc[-1]:.2f} "
        f"(best {c.test_acc.max():.2f} at step {c.steps[c.test_acc.argmax()]})"
    ]
    low = int(c.test_nll.argmin())
    rise = c.test_nll[-1] / c.test_nll[low]
    if rise >= 1.1:
        lines.append(
            f"held-out NLL was lowest at step {c.steps[low]} ({c.test_nll[low]:.3f}) and ended {rise:.2f}x higher: "
            "the model grew sharp on its own training traces and pays for other valid ones (over-memorization)"
        )
    else:
        lines.append(f"held-out NLL fell to {c.test_nll[-1]:.3f}: no over-memorization in this run yet")
    lines.append(
        f"train accuracy {c.train_acc[-1]:.2f} vs held-out {c.test_acc[-1]:.2f}; "
        f"{c.copy_rate[-1]:.0%} of samples on training questions repeat the trained trace word for word"
    )
    return lines


def _print_truth(console, truth: dict) -> None:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD)
    for col in ("step", "epoch", "held-out acc", "held-out NLL", "perturbed acc", "train acc", "copy rate", "train NLL"):
        table.add_column(col, justify="right")
    for point in sorted(truth["checkpoints"].values(), key=lambda p: p["step"]):
        table.add_row(
            str(point["step"]),
            f"{point['epoch']:.1f}" if point.get("epoch") is not None else "",
            f"{point['test_accuracy']:.2f}",
            f"{point['test_nll']:.3f}",
            f"{point['test_perturbed_accuracy']:.2f}" if "test_perturbed_accuracy" in point else "",
            f"{point['train_accuracy']:.2f}",
            f"{point['train_copy_rate']:.2f}",
            f"{point['train_nll']:.3f}",
        )
    console.print(table)
