"""``ckptsel rank``: measure every checkpoint on the training data and rank them."""

from __future__ import annotations

import math
from pathlib import Path

import click

from ckptsel.cli.measuring import exit_partial, measurement_options, run_ranking, unmeasured
from ckptsel.cli.options import (
    engine_options,
    json_option,
    print_json,
    quiet_option,
    recipe_options,
    stderr_console,
    stdout_console,
)


# --------------------------------------------------------------------------- the command


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@recipe_options
@measurement_options
@click.option("--export-examples", type=click.Path(path_type=Path), help="Write the per-example table (.csv or .jsonl).")
@engine_options
@json_option
@quiet_option
def rank(paths, recipe, measurement, export_examples, engine, cache_dir, as_json, quiet):
    """Rank checkpoints by pre-memorization train accuracy (predicted test accuracy); flag over-memorization.

    PATHS are runs (a folder of checkpoint-N/ folders, or one model folder), sweeps (a folder
    of runs) or single checkpoints. Measures each checkpoint once (target NLL, k graded samples
    per question, and the over-memorization proxies: alternative-solution NLL, perturbed-prompt
    NLL, entropy), keeps the results in the cache (resumable, incremental), gives each
    checkpoint a stage (underfit / generalizing / over-memorized) and recommends one per run
    and one for the whole sweep. Mixture-of-experts checkpoints also get pathway distance and
    complexity (the recipe's `pathways:` section). The flag's thresholds are the recipe's
    `stages:` section.

    \b
    Examples:
      ckptsel rank ./run --data train.jsonl --recipe gsm8k --max-examples 500
      ckptsel rank ./sweep --data-per-run train.jsonl --recipe gsm8k
    """
    if export_examples:
        from ckptsel.outputs import check_writable

        check_writable(export_examples, "per-example table")  # before any measuring
    result = run_ranking(measurement.request(paths, recipe, engine=engine, cache_dir=cache_dir), command="rank",
                         quiet=quiet)
    ranking = result.ranking
    if export_examples:
        _export(export_examples, result)
    if as_json:
        print_json(result.to_json())
    else:
        _print_table(stdout_console(), ranking, result.recipe)
    alert = stderr_console()
    for warning in ranking.warnings:
        alert.print(f"[yellow]warning:[/] {warning}")
    exit_partial(unmeasured(ranking.checkpoints), "rank")


def _fmt(value, spec: str = ".3f") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _cell(c, column) -> str:
    """One checkpoint's value of one ckptsel.columns column, as its ``cell`` says."""
    from ckptsel.columns import band_partner

    value = getattr(c, column.key)
    if column.cell == "ci":
        return f"{_fmt(value, column.fmt)} ({_fmt(c.premem_ci[0], '.2f')}–{_fmt(c.premem_ci[1], '.2f')})"
    if (partner := band_partner(column)) is not None:
        return f"{_fmt(value, '.2f')}–{_fmt(getattr(c, partner), '.2f')}"
    return _fmt(value, column.fmt)


def _print_table(console, ranking, recipe) -> None:
    from rich.table import Table

    from ckptsel.columns import table_columns

    t = ranking.threshold
    if t.rule != "copy":
        what = "costliest target token's NLL" if t.rule == "peak-nll" else "target NLL"
        rule = f"memorised: {what} < ν = {_fmt(t.used, '.3f')} nats/token"
        if t.auto is not None and t.used != t.auto:
            rule += f" (auto-calibrated ν would be {t.auto:.3f}, AUC {t.auto_auc:.2f})"
        elif t.recipe_default is not None and t.used != t.recipe_default:
            rule += f" (recipe default {t.recipe_default:.3f})"
    else:
        rule = f"memorised: ≥ {recipe.memorization.copy_fraction:.0%} of samples copy the training solution"
    moe = ranking.pathway_rule is not None
    sweep = ranking.is_sweep
    if sweep:
        counts = sorted({r.n_examples for r in ranking.runs})
        what = f"{len(ranking.runs)} runs · {'/'.join(map(str, counts))} training examples per run"
    else:
        what = f"{ranking.n_examples} training examples"
    table = Table(title=f"{what} · {rule}", title_justify="left")
    measured = [c for c in ranking.checkpoints if not c.error]
    shown = table_columns(lambda key: any(not math.isnan(getattr(c, key)) for c in measured))
    headers = ["", *(["run"] if sweep else []), "step", "epoch", "train loss", *(c.header for c in shown),
               *(["pathway dist", "pathway cplx"] if moe else []), "stage"]
    for name in headers:
        table.add_column(name, justify="left" if name in ("", "stage") else "right")
    for c in ranking.checkpoints:
        mark = "★" if c.index == ranking.recommended else "☆" if sweep and c.recommended_in_run else ""
        run_cell = [c.run or ""] if sweep else []
        if c.error:
            table.add_row(mark, *run_cell, _fmt(c.step, "d"), _fmt(c.epoch, ".2f"), _fmt(c.train_loss, ".4f"),
                          f"[red]failed: {c.error}[/]", *[""] * (len(headers) - 5 - len(run_cell)))
            continue
        stage = {"over-memorized": "[red]over-memorized[/]", "underfit": "[dim]underfit[/]"}.get(c.stage, c.stage or "")
        table.add_row(mark, *run_cell, _fmt(c.step, "d"), _fmt(c.epoch, ".2f"), _fmt(c.train_loss, ".4f"),
                      *(_cell(c, column) for column in shown), *(_pathway_cells(c.pathways) if moe else []), stage)
    if not console.is_terminal:  # piped or redirected: no screen width to respect, keep the table unsqueezed
        console.width = max(console.width, 200)
    console.print(table)
    coverage = ""
    if not math.isnan(ranking.alt_coverage):
        steps = ", ".join(_fmt(ranking.checkpoints[i].step, "d") for i in ranking.alt_sources)
        coverage = f" · alternative solutions for {ranking.alt_coverage:.0%} of examples, from step(s) {steps}"
    console.print(f"stages ({ranking.proxy or 'no proxy'}{coverage}): {ranking.stage_rule}")
    if moe:
        console.print(ranking.pathway_rule)
    for c in ranking.checkpoints:
        if c.flag is not None:
            where = f"{c.run} " if sweep else ""
            console.print(f"[red]over-memorized[/] {where}step {_fmt(c.step, 'd')}: {c.flag.reason()}")
    if sweep:
        for run in ranking.runs:
            if run.recommended is None:
                console.print(f"☆ {run.name}: nothing measured")
                continue
            c = ranking.checkpoints[run.recommended]
            console.print(f"☆ {run.name}: step {_fmt(c.step, 'd')}, predicted test accuracy {_fmt(c.premem_acc)} "
                          f"[{_fmt(c.premem_ci[0])}, {_fmt(c.premem_ci[1])}]")
    if ranking.recommended is not None:
        rec = ranking.checkpoints[ranking.recommended]
        where = f"run {rec.run}, " if sweep else ""
        console.print(f"[bold green]recommended:[/] {rec.path} ({where}step {_fmt(rec.step, 'd')}, predicted test "
                      f"accuracy {_fmt(rec.premem_acc)} [{_fmt(rec.premem_ci[0])}, {_fmt(rec.premem_ci[1])}])")
        console.print(f"rule: {ranking.rule}")


def _pathway_cells(pathways) -> list[str]:
    """Pathway distance (± its standard error when estimated on sampled pairs, with the memorised
    examples it is over) and complexity; dashes without routing."""
    if pathways is None:
        return ["—", "—"]
    spread = "" if pathways.distance_exact else f"±{pathways.distance_stderr:.2f}"
    return [f"{_fmt(pathways.distance, '.2f')}{spread} (n={pathways.n_examples})", _fmt(pathways.complexity, ".4f")]


def _export(path: Path, result) -> None:
    """Per-example table: the data-curation use (collect more data like low-PM examples); one row per
    (run, example) for a sweep."""
    import csv
    import io
    import json

    from ckptsel import metrics
    from ckptsel.errors import CkptselError
    from ckptsel.outputs import write_text_atomic

    rows = []
    for summary, measured in zip(result.ranking.runs, result.runs):
        pe, collected = summary.per_example, measured.collected
        if not pe:
            continue
        steps = [collected.checkpoints[i].step for i in pe["measured_index"]]
        first = metrics.first_memorized(pe["memorized"])
        for n, ex in enumerate(collected.examples):
            rows.append({
                **({"run": summary.name} if result.ranking.is_sweep else {}),
                "index": ex.index,
                "uid": ex.uid,
                "premem_acc": _none(pe["premem"][-1, n]),
                "train_acc": _none(pe["acc"][-1, n]),
                "memorized_at_step": steps[first[n]] if first[n] >= 0 else None,
                "final_nll": _none(pe["nll"][-1, n]),
                "copy_rate": _none(pe["copy"][-1, n]),
                "question": ex.question,
            })
    if not rows:
        raise CkptselError(f"{path}: nothing to export (no checkpoint was measured)")
    if path.suffix == ".csv":
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        text = text.getvalue()
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
    write_text_atomic(path, text)  # a full disk: one line, no partial file


def _none(value):
    value = float(value)
    return None if math.isnan(value) else value
