"""``ckptsel demo``: train one small run here, then run ckptsel's pipeline on its checkpoints.

Four steps, each what a user would type on their own run: train (the lab, with
:class:`ckptsel.integrations.transformers.CkptselCallback` attached, so each save is measured
as it is written and its numbers shown), ``ckptsel ls``, ``ckptsel rank`` (the same library
path, on a small fixed subset of the training data; it finds every measurement in the store
the callback filled) and ``ckptsel report``. The lab knows the truth -- held-out accuracy and NLL of every
checkpoint -- so the demo shows the prediction and the truth side by side.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import click

from ckptsel.cli.options import quiet_option, stderr_console, stdout_console

DEMO_GRID = "demo"
DEMO_RUN = "demo"
# Training examples ckptsel measures per checkpoint (a fixed random subset): enough for a
# pre-memorization interval of about +-0.1, few enough to keep the demo at about two minutes.
DEMO_EXAMPLES = 40
CACHE, REPORT = "cache", "report.html"


@click.command("demo")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("ckptsel-demo"), show_default=True,
    help="Folder for the demo run, its result store and the report (reused when already there).",
)
@quiet_option
@click.pass_context
def demo(ctx, out, quiet):
    """Train a tiny model on synthetic arithmetic, rank its checkpoints, and write the report.

    About two minutes on two CPU cores (training on two torch threads); nothing is downloaded. The run folder is a real
    Trainer run (checkpoint-N/ folders, train.jsonl, recipe.yaml) with the true held-out
    accuracy and NLL of every checkpoint in ground_truth.json, so ckptsel's prediction from
    the training data alone can be checked against the truth. A second call reuses it all.

    \b
    ckptsel demo
    ckptsel demo --out /tmp/demo
    """
    from ckptsel.cli.ls import ls
    from ckptsel.lab.ground_truth import read_ground_truth

    err = stderr_console(quiet)
    run_dir = _train(out, err, quiet)
    truth = read_ground_truth(run_dir)

    cache = f"--cache-dir {out / CACHE}"
    _step(err, 2, "the checkpoints as ckptsel reads them", f"ckptsel ls {run_dir}")
    ctx.invoke(ls, paths=(str(run_dir),), base_model=None, with_fingerprint=False, as_json=False)

    _step(err, 3, f"ranking from the training data alone ({DEMO_EXAMPLES} examples, k=5 samples each; "
          "measured during training, read from the store)",
          f"ckptsel rank {run_dir} --data {run_dir / 'train.jsonl'} --recipe {run_dir / 'recipe.yaml'} "
          f"--max-examples {DEMO_EXAMPLES} {cache}")
    ranked = _rank(run_dir, out / CACHE, quiet)
    _print_ranking(stdout_console(), ranked.ranking, truth)

    _step(err, 4, "the report", f"ckptsel report {run_dir} --max-examples {DEMO_EXAMPLES} {cache} -o {out / REPORT}")
    report = _report(ranked, truth, run_dir, out)
    err.print(f"report written to [bold]{report}[/]", soft_wrap=True)

    for line in _closing(ranked.ranking, truth, run_dir, out):
        err.print(line, soft_wrap=True)  # the terminal wraps, so commands stay whole for copy and paste


def _step(err, n: int, title: str, command: str) -> None:
    """A step's heading and the command that does the same on its own (whole, for copy and paste)."""
    err.print(f"\n[bold]{n}/4[/] {title}")
    err.print(f"[dim]  $ {command}[/]", soft_wrap=True)


def _train(out: Path, err, quiet: bool) -> Path:
    """Step 1: the demo grid's one run, with progress; a finished run is reused."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ckptsel.cli.lab import resolve_grid
    from ckptsel.lab.grid import load_grid
    from ckptsel.lab.runner import run_grid

    grid = load_grid(resolve_grid(DEMO_GRID))
    _step(err, 1, f"training a tiny model on synthetic sums into {out} (resumable); ckptsel measures each save",
          f"ckptsel lab run {DEMO_GRID} --out {out}")
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, disable=quiet,
    )
    tasks: dict[str, int] = {}

    def on_event(event):
        if event.phase not in ("train", "truth"):
            return
        label = "  training (steps)" if event.phase == "train" else "  true held-out numbers (checkpoints)"
        if event.phase not in tasks:
            tasks[event.phase] = progress.add_task(label, total=event.total)
        progress.update(tasks[event.phase], completed=event.done, total=event.total)

    def watch(name: str, folder: Path) -> list:
        """The callback a user attaches to their Trainer (README, "During training"): one line per save."""
        from ckptsel.integrations.transformers import CkptselCallback

        def show(report) -> None:
            if not quiet:
                progress.console.print(f"  [dim]{report.line()}[/]", soft_wrap=True)

        return [CkptselCallback(data=folder / "train.jsonl", recipe=folder / "recipe.yaml",
                                max_examples=DEMO_EXAMPLES, cache_dir=out / CACHE, on_measured=show)]

    with progress:
        # One job alone on the machine: two torch threads train this model about 25% faster than one
        # (0.095 against 0.126 s a step here); more do not pay at this size.
        threads = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        (result,) = run_grid(grid, out, jobs=1, threads=threads, on_event=on_event, callbacks=watch)
    if result.phase == "failed":
        raise click.ClickException(f"the demo run failed: {result.message}")
    return out / DEMO_RUN


def _rank(run_dir: Path, cache_dir: Path, quiet: bool):
    """Step 3: exactly what ``ckptsel rank`` does, on a fixed subset, with the store in the demo folder."""
    from ckptsel.cli.measuring import run_ranking
    from ckptsel.pipeline import RankRequest
    from ckptsel.recipes import load_recipe

    request = RankRequest(paths=(run_dir,), recipe=load_recipe(run_dir / "recipe.yaml"), data=run_dir / "train.jsonl",
                          max_examples=DEMO_EXAMPLES, cache_dir=cache_dir)
    return run_ranking(request, command="rank", quiet=quiet)


def _report(ranked, truth: dict, run_dir: Path, out: Path) -> Path:
    """Step 4: the HTML report, with the lab's truth beside the prediction."""
    from ckptsel.report import write_report
    from ckptsel.store import Store

    with Store.open(out / CACHE) as store:
        return write_report(
            ranked.ranking, out / REPORT, ground_truth=truth, store=store, title=f"ckptsel demo: {run_dir.name}",
            provenance=[f"training data: {run_dir / 'train.jsonl'} ({DEMO_EXAMPLES} examples)",
                        f"recipe: {run_dir / 'recipe.yaml'}", f"lab ground truth: {run_dir / 'ground_truth.json'}"],
        )


def _num(value: float | None, spec: str = ".2f") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _print_ranking(console, ranking, truth: dict) -> None:
    """What ckptsel measured on training data, and (dimmed, right) what it tries to predict."""
    from rich import box
    from rich.table import Table

    by_step = {p["step"]: p for p in truth["checkpoints"].values()}
    table = Table(box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False, title_justify="left",
                  title="from the training data (ckptsel)  ·  [dim]truth on held-out data (the lab)[/]")
    for col in ("", "step", "train\nacc", "pre-mem acc\n(95% CI)", "memo-\nrised", "alt-sol.\nNLL", "stage"):
        table.add_column(col, justify="left" if col in ("", "stage") else "right")
    for col in ("held-out\nacc", "held-out\nNLL"):
        table.add_column(col, justify="right", style="dim")
    for c in ranking.checkpoints:
        point = by_step.get(c.step, {})
        stage = {"over-memorized": "[red]over-memorized[/]", "underfit": "[dim]underfit[/]"}.get(c.stage, c.stage or "")
        table.add_row(
            "★" if c.index == ranking.recommended else "", _num(c.step, "d"), _num(c.train_acc),
            f"{_num(c.premem_acc)} ({_num(c.premem_ci[0])}–{_num(c.premem_ci[1])})", _num(c.memorized_frac),
            _num(c.alt_nll, ".3f"), stage if not c.error else f"[red]failed: {c.error}[/]",
            _num(point.get("test_accuracy")), _num(point.get("test_nll"), ".3f"),
        )
    if not console.is_terminal:  # piped or redirected: no screen width to respect, keep rows on one line
        console.width = max(console.width, 100)
    console.print(table)


def _closing(ranking, truth: dict, run_dir: Path, out: Path) -> list[str]:
    """The few lines that say what happened and what to try next."""
    from ckptsel.lab.summary import curves

    c = curves(truth)
    lines = ["", "[bold]What to look at[/]"]
    if ranking.recommended is not None:
        rec = ranking.checkpoints[ranking.recommended]
        true_acc = truth["checkpoints"].get(str(rec.step), {}).get("test_accuracy", math.nan)
        best = int(c.test_acc.argmax())
        lines.append(f"  - recommended: step {rec.step}, predicted test accuracy {_num(rec.premem_acc)} "
                     f"[{_num(rec.premem_ci[0])}, {_num(rec.premem_ci[1])}]")
        lines.append(f"    why: {ranking.rule}")
        verdict = ("the run's best checkpoint" if true_acc >= c.test_acc[best] - 0.02
                   else f"the best was step {c.steps[best]} at {c.test_acc[best]:.2f}")
        level = ("inside the interval" if rec.premem_ci[0] <= true_acc <= rec.premem_ci[1]
                 else "outside the interval: the predicted level is off here, see the report's scatter")
        lines.append(f"    truth: held-out accuracy {true_acc:.2f} ({verdict}); {level}")
    for flagged in (row for row in ranking.checkpoints if row.flag is not None):
        lines.append(f"  - [red]over-memorized[/] step {flagged.step}: {flagged.flag.reason()}")
    low = int(c.test_nll.argmin())
    lines.append(
        f"  - memorisation: train accuracy {c.train_acc[-1]:.2f} vs held-out {c.test_acc[-1]:.2f} at the end; "
        f"{c.copy_rate[-1]:.0%} of samples repeat the trained trace; held-out NLL lowest at step {c.steps[low]} "
        f"({c.test_nll[low]:.3f}), last {c.test_nll[-1]:.3f}"
    )
    lines.append(f"  - the report, plots over training with the truth beside them (open in a browser): {out / REPORT}")
    # The demo's own options, so the next commands reuse its result store (nothing is re-measured).
    same = (f"--data {run_dir / 'train.jsonl'} --recipe {run_dir / 'recipe.yaml'} --max-examples {DEMO_EXAMPLES} "
            f"--cache-dir {out / CACHE}")
    lines += [
        "", "[bold]Next[/]",
        "  your own checkpoints:",
        "    ckptsel rank ./my-run --data train.jsonl --recipe gsm8k --max-examples 200",
        "  merge neighbouring checkpoints, chosen on the over-memorization proxy (Ruan et al.):",
        f"    ckptsel merge {run_dir} --recommend {same} -o {out / 'merged'}",
        "  measured test accuracy (lm-eval) beside the prediction, then the report again with it:",
        f"    ckptsel verify {run_dir} --test-file {run_dir / 'test.jsonl'} {same}",
        f"    ckptsel report {run_dir} --max-examples {DEMO_EXAMPLES} --cache-dir {out / CACHE} -o {out / REPORT}",
    ]
    return lines
