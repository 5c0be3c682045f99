"""``ckptsel rank``: measure every checkpoint on the training data and rank them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import click

from ckptsel.cli.options import (
    engine_options,
    json_option,
    print_json,
    quiet_option,
    recipe_options,
    stderr_console,
    stdout_console,
)


# --------------------------------------------------------------------------- options shared with `gate`
# What is measured and how; `rank`, `gate` and `merge --recommend` take the same ones, so a gate
# in CI reuses the cache of a rank run made with the same options.

_MEASUREMENT_OPTIONS = (
    click.option("--data", "data", type=click.Path(path_type=Path),
                 help="Training data file or folder, for every run."),
    click.option("--data-per-run", metavar="FILENAME",
                 help="Each run reads its own RUN/FILENAME (data-size sweeps); instead of --data."),
    click.option("--base-model", metavar="PATH", help="Base model for LoRA adapters (overrides adapter_config.json)."),
    click.option("--max-examples", type=click.IntRange(min=1), help="Measure a fixed random subset of this many examples."),
    click.option("--examples-seed", type=int, default=0, show_default=True, help="Seed of the --max-examples subset."),
    click.option("-k", "--samples", "k", type=click.IntRange(min=1), help="Samples per question (recipe default: 5)."),
    click.option("--temperature", type=click.FloatRange(min=0), help="Sampling temperature (default 0.8; 0 = greedy)."),
    click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), help="Nucleus sampling mass (default 0.95)."),
    click.option("--max-new-tokens", type=click.IntRange(min=1), help="Generation budget (default: from target lengths)."),
    click.option("--seed", type=int, help="Base sampling seed (default 0)."),
    click.option(
        "--threshold",
        metavar="NU|auto|auto-run",
        help="Memorisation threshold nu in nats/token (recipe default), or 'auto' to calibrate it from copy rates "
        "on the pooled pairs of all runs ('auto-run': each run alone); falls back to the recipe's nu where it "
        "cannot be fitted.",
    ),
    click.option(
        "--memorization",
        "memorization_rule",
        type=click.Choice(["nll", "copy"]),
        help="nll: target NLL below the threshold (default); copy: samples reproduce the training solution.",
    ),
    click.option("--skip-bad", is_flag=True, help="Drop bad rows (malformed, a reference the grader cannot read, "
                 "longer than the model's context) with a warning, instead of stopping."),
    click.option(
        "--heldout",
        "heldout",
        type=click.Path(path_type=Path),
        help="Held-out data (same layout and recipe as --data): its reference-solution NLL becomes the flag's proxy.",
    ),
    click.option(
        "--alt-grader",
        metavar="NAME",
        help="Grader deciding which correct samples are alternative solutions (default: the recipe's "
        "proxies.alt_grader, else --grader); one that checks the steps keeps right-answer-wrong-steps samples out.",
    ),
    click.option(
        "--proxy",
        type=click.Choice(["auto", "heldout_nll", "alt_nll", "perturb_nll"]),
        help="Perplexity proxy of the flag (default: the recipe's stages.proxy, auto: held-out, "
        "else alternative-solution, else perturbed-prompt NLL).",
    ),
    click.option(
        "--prefer",
        type=click.Choice(["accuracy", "robustness"]),
        help="accuracy (default, the recipe's stages.prefer): a checkpoint flagged over-memorized is passed over "
        "only for one as accurate; robustness: the best checkpoint that is not flagged.",
    ),
)


@dataclass(frozen=True)
class Measurement:
    """The measurement options as given on the command line (None: the recipe's value)."""

    data: Path | None = None
    data_per_run: str | None = None
    base_model: str | None = None
    max_examples: int | None = None
    examples_seed: int = 0
    k: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    seed: int | None = None
    threshold: float | str | None = None
    memorization_rule: str | None = None
    skip_bad: bool = False
    heldout: Path | None = None
    alt_grader: str | None = None
    proxy: str | None = None
    prefer: str | None = None

    def request(self, paths, recipe, *, engine, cache_dir, runs=None, stages: dict | None = None):
        """The :class:`ckptsel.pipeline.RankRequest` these options ask for; ``stages`` overrides the
        recipe's stage thresholds (a gate policy's), and ``--proxy`` / ``--prefer`` override both."""
        from ckptsel.pipeline import RankRequest
        from ckptsel.recipes import override

        sampling = {"k": self.k, "temperature": self.temperature, "top_p": self.top_p,
                    "max_new_tokens": self.max_new_tokens, "seed": self.seed}
        stages = {**(stages or {}), **({"proxy": self.proxy} if self.proxy is not None else {}),
                  **({"prefer": self.prefer} if self.prefer is not None else {})}
        recipe = override(recipe, sampling=sampling, memorization={"rule": self.memorization_rule},
                          proxies={"alt_grader": self.alt_grader}, stages=stages)
        return RankRequest(
            paths=tuple(Path(p) for p in paths), recipe=recipe, data=self.data, data_per_run=self.data_per_run,
            threshold=self.threshold, base_model=self.base_model, max_examples=self.max_examples,
            examples_seed=self.examples_seed, skip_bad=self.skip_bad, heldout=self.heldout, engine=engine,
            cache_dir=cache_dir, runs=None if runs is None else tuple(runs),
        )


def measurement_options(command):
    """Add the measurement options; the command receives one ``measurement`` (a :class:`Measurement`)."""
    import functools

    names = [f.name for f in dataclasses.fields(Measurement)]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        values = {name: kwargs.pop(name) for name in names}
        values["threshold"] = _threshold(values["threshold"])
        return command(*args, measurement=Measurement(**values), **kwargs)

    for option in reversed(_MEASUREMENT_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def run_ranking(request, *, command: str, quiet: bool):
    """Run :func:`ckptsel.pipeline.rank_runs` with its opening line and one progress bar on stderr."""
    from ckptsel.cli.progress import CollectProgress
    from ckptsel.pipeline import rank_runs

    err = stderr_console(quiet=quiet)  # progress; warnings and failures always print
    progress = None

    def start(plan) -> None:
        nonlocal progress
        err.print(f"[bold]ckptsel {command}[/]: {plan.describe()}")
        progress = CollectProgress(err, plan.checkpoints).__enter__()

    try:
        result = rank_runs(request, on_start=start, on_progress=lambda event: progress and progress.update(event))
    finally:
        if progress is not None:
            progress.__exit__(None, None, None)
    nothing_measured(result.ranking.checkpoints)  # exit 2, not 3
    return result


EXIT_PARTIAL = 3  # some checkpoints could not be measured; the others are reported (ckptsel.cli)


def nothing_measured(rows) -> None:
    """Exit 2 (a :class:`CkptselError`) when not one checkpoint could be measured; ``rows`` as
    for :func:`unmeasured`."""
    from ckptsel.errors import CkptselError

    rows = list(rows)
    errors = unmeasured(rows)
    if rows and len(errors) == len(rows):
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise CkptselError(f"no checkpoint could be measured: {errors[0]}{more}")


def unmeasured(rows) -> list[str]:
    """One line per checkpoint that could not be measured, naming it: ``rows`` are ranking rows
    (:class:`ckptsel.select.CheckpointMetrics`, or ``rank --json``'s dicts) with ``path`` and ``error``."""
    lines = []
    for row in rows:
        path, error = (row.get("path"), row.get("error")) if isinstance(row, dict) else (row.path, row.error)
        if error:
            lines.append(error if str(path) in error else f"{path}: {error}")
    return lines


def exit_partial(failures: list[str], command: str) -> None:
    """Name each checkpoint that could not be measured (:func:`unmeasured`) and exit 3; nothing
    to do without failures."""
    from rich.markup import escape

    if not failures:
        return
    alert = stderr_console()
    for reason in failures:
        alert.print(f"[red]failed:[/] {escape(reason)}", soft_wrap=True)
    alert.print(f"{command}: {len(failures)} checkpoint(s) could not be measured; the others are reported (exit 3)",
                soft_wrap=True)
    raise SystemExit(EXIT_PARTIAL)


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


def _threshold(value: str | None):
    if value is None or value in ("auto", "auto-run"):
        return value
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number (nats/token) nor 'auto' / 'auto-run'",
                                 param_hint="--threshold")


def _fmt(value, spec: str = ".3f") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _print_table(console, ranking, recipe) -> None:
    from rich.table import Table

    t = ranking.threshold
    if t.rule == "nll":
        rule = f"memorised: target NLL < ν = {_fmt(t.used, '.3f')} nats/token"
        if t.auto is not None and t.used != t.auto:
            rule += f" (auto-calibrated ν would be {t.auto:.3f}, AUC {t.auto_auc:.2f})"
        elif t.recipe_default is not None and t.used != t.recipe_default:
            rule += f" (recipe default {t.recipe_default:.3f})"
    else:
        rule = f"memorised: ≥ {recipe.memorization.copy_fraction:.0%} of samples copy the training solution"
    heldout = ranking.n_heldout > 0
    moe = ranking.pathway_rule is not None
    sweep = ranking.is_sweep
    if sweep:
        counts = sorted({r.n_examples for r in ranking.runs})
        what = f"{len(ranking.runs)} runs · {'/'.join(map(str, counts))} training examples per run"
    else:
        what = f"{ranking.n_examples} training examples"
    table = Table(title=f"{what} · {rule}", title_justify="left")
    band = t.rule == "nll"
    columns = ["", *(["run"] if sweep else []), "step", "epoch", "train loss", "train acc", "pre-mem acc (95% CI)",
               *(["at 2ν … ν/2"] if band else []), "memorised", "copy",
               "target NLL", "alt NLL", "perturb gap", "entropy", *(["held-out NLL"] if heldout else []),
               *(["pathway dist", "pathway cplx"] if moe else []), "stage"]
    for name in columns:
        table.add_column(name, justify="left" if name in ("", "stage") else "right")
    for c in ranking.checkpoints:
        mark = "★" if c.index == ranking.recommended else "☆" if sweep and c.recommended_in_run else ""
        run_cell = [c.run or ""] if sweep else []
        if c.error:
            table.add_row(mark, *run_cell, _fmt(c.step, "d"), _fmt(c.epoch, ".2f"), _fmt(c.train_loss, ".4f"),
                          f"[red]failed: {c.error}[/]", *[""] * (len(columns) - 5 - len(run_cell)))
            continue
        ci = f"{_fmt(c.premem_acc)} ({_fmt(c.premem_ci[0], '.2f')}–{_fmt(c.premem_ci[1], '.2f')})"
        stage = {"over-memorized": "[red]over-memorized[/]", "underfit": "[dim]underfit[/]"}.get(c.stage, c.stage or "")
        table.add_row(mark, *run_cell, _fmt(c.step, "d"), _fmt(c.epoch, ".2f"), _fmt(c.train_loss, ".4f"),
                      _fmt(c.train_acc),
                      ci, *([f"{_fmt(c.premem_nu_low, '.2f')}–{_fmt(c.premem_nu_high, '.2f')}"] if band else []),
                      _fmt(c.memorized_frac), _fmt(c.copy_rate), _fmt(c.target_nll), _fmt(c.alt_nll),
                      _fmt(c.perturb_gap, "+.3f"), _fmt(c.entropy), *([_fmt(c.heldout_nll)] if heldout else []),
                      *(_pathway_cells(c.pathways) if moe else []), stage)
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
