"""``ckptsel rank``: measure every checkpoint on the training data and rank them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
# What is measured and how; `rank` and `gate` take the same ones, so a gate in CI reuses the
# cache of a rank run made with the same options.

_MEASUREMENT_OPTIONS = (
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
        metavar="NU|auto",
        help="Memorisation threshold nu in nats/token (recipe default), or 'auto' to calibrate it from copy rates.",
    ),
    click.option(
        "--memorization",
        "memorization_rule",
        type=click.Choice(["nll", "copy"]),
        help="nll: target NLL below the threshold (default); copy: samples reproduce the training solution.",
    ),
    click.option("--skip-bad", is_flag=True, help="Skip malformed data rows instead of stopping."),
    click.option(
        "--heldout",
        "heldout_path",
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
        help="Perplexity proxy of the over-memorized flag (default: the recipe's stages.proxy, auto: held-out, "
        "else alternative-solution, else perturbed-prompt NLL).",
    ),
)


def measurement_options(command):
    """Add the measurement options; the command receives ``measurement`` (the keyword arguments
    of :func:`measure_and_rank` they set) and ``proxy`` (None unless given) instead."""
    import functools

    @functools.wraps(command)
    def wrapper(*args, base_model, max_examples, examples_seed, k, temperature, top_p, max_new_tokens, seed, threshold,
                memorization_rule, skip_bad, heldout_path, alt_grader, proxy, **kwargs):
        measurement = {
            "base_model": base_model,
            "max_examples": max_examples,
            "examples_seed": examples_seed,
            "sampling": {"k": k, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                         "seed": seed},
            "memorization": {"rule": memorization_rule, "threshold": _threshold(threshold)},
            "skip_bad": skip_bad,
            "heldout_path": heldout_path,
            "alt_grader": alt_grader,
        }
        return command(*args, measurement=measurement, proxy=proxy, **kwargs)

    for option in reversed(_MEASUREMENT_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


# --------------------------------------------------------------------------- the command


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path), help="Training data file or folder.")
@recipe_options
@measurement_options
@click.option("--export-examples", type=click.Path(path_type=Path), help="Write the per-example table (.csv or .jsonl).")
@engine_options
@json_option
@quiet_option
def rank(paths, data_path, recipe, measurement, proxy, export_examples, engine, cache_dir, as_json, quiet):
    """Rank checkpoints by pre-memorization train accuracy (predicted test accuracy); flag over-memorization.

    Measures each checkpoint once (target NLL, k graded samples per question, and the
    over-memorization proxies: alternative-solution NLL, perturbed-prompt NLL, entropy),
    keeps the results in the cache (resumable, incremental), gives each checkpoint a stage
    (underfit / generalizing / over-memorized) and recommends one. Mixture-of-experts
    checkpoints also get pathway distance and complexity (the recipe's `pathways:` section).
    The flag's thresholds are the recipe's `stages:` section.

    \b
    Example:
      ckptsel rank ./run --data train.jsonl --recipe gsm8k --max-examples 500
    """
    run = measure_and_rank(paths, data_path, recipe, stages={"proxy": proxy}, engine=engine,
                           cache_dir=cache_dir, quiet=quiet, command="rank", **measurement)
    ranking, collected = run.ranking, run.collected
    if export_examples:
        _export(export_examples, ranking, collected)
    if as_json:
        print_json(run.to_json())
    else:
        _print_table(stdout_console(), ranking, run.recipe)
    alert = stderr_console()
    for warning in ranking.warnings:
        alert.print(f"[yellow]warning:[/] {warning}")
    for reason in collected.failures.values():
        alert.print(f"[red]failed:[/] {reason}")
    if collected.failures:
        raise SystemExit(3)


@dataclass
class RankedRun:
    """What :func:`measure_and_rank` returns: the ranking, the raw collection, the recipe used."""

    ranking: Any
    collected: Any
    recipe: Any
    usable: int  # checkpoints that could be read (the rest were broken on disk)

    def to_json(self) -> dict:
        out = self.ranking.to_json()
        out["settings_key"] = self.collected.settings_key
        out["cache"] = {"measured": self.collected.loaded, "from_cache": self.usable - self.collected.loaded}
        return out


def measure_and_rank(paths, data_path, recipe, *, sampling: dict, memorization: dict, stages: dict, base_model,
                     max_examples: int | None, examples_seed: int, skip_bad: bool, heldout_path, engine, cache_dir,
                     quiet: bool, command: str, checkpoints=None, alt_grader: str | None = None) -> RankedRun:
    """Discover, load the data, measure what the cache lacks (with progress on stderr), rank.

    Shared by the commands that need a ranking (rank, gate, report, verify). ``sampling``,
    ``memorization`` and ``stages`` (the over-memorized flag's thresholds,
    :class:`ckptsel.settings.OvermemSettings`) override the recipe's sections (None values keep
    them); the returned run's ``recipe`` is the one used. ``checkpoints``
    (already discovered) skips discovery; ``alt_grader`` overrides the recipe's
    ``proxies.alt_grader``, the grader that picks the alternative solutions
    (:class:`ckptsel.settings.ProxySettings`).
    """
    from ckptsel.cli.progress import CollectProgress
    from ckptsel.collect import collect, select_examples
    from ckptsel.data import load_data
    from ckptsel.discover import discover
    from ckptsel.errors import CkptselError
    from ckptsel.measure.loading import load_tokenizer
    from ckptsel.recipes import override
    from ckptsel.select import rank as rank_checkpoints
    from ckptsel import graders
    from ckptsel.settings import SelectionSettings
    from ckptsel.store import Store, ensure_outside

    err = stderr_console(quiet=quiet)  # progress; warnings and failures always print
    recipe = override(recipe, sampling=sampling, memorization=memorization, proxies={"alt_grader": alt_grader},
                      stages=stages)
    proxy_settings = recipe.proxies
    if proxy_settings.alt_grader is not None:
        graders.get(proxy_settings.alt_grader)  # an unknown name is a usage error before any work
    if checkpoints is None:
        checkpoints = discover(paths, base_model=base_model)
    usable = [c for c in checkpoints if c.kind != "error"]
    if not usable:
        reasons = "; ".join(f"{c.path.name}: {c.error}" for c in checkpoints[:3])
        raise CkptselError(f"no loadable checkpoint under {', '.join(map(str, paths))} ({reasons})")
    tokenizer = load_tokenizer(usable[0], trust_remote_code=engine.trust_remote_code)
    selection = SelectionSettings(max_examples=max_examples, examples_seed=examples_seed)
    loaded = load_data(data_path, recipe, tokenizer=tokenizer, skip_bad=skip_bad)
    examples = select_examples(loaded.examples, selection)
    if not examples:
        raise CkptselError(f"{data_path}: no training examples")
    heldout = []
    if heldout_path is not None:
        rows = load_data(heldout_path, recipe, tokenizer=tokenizer, skip_bad=skip_bad)
        heldout = select_examples(rows.examples, selection)
        if not heldout:
            raise CkptselError(f"{heldout_path}: no held-out examples")
    ensure_outside(cache_dir, [c.path for c in checkpoints])

    with Store.open(cache_dir) as store:
        err.print(
            f"[bold]ckptsel {command}[/]: {len(checkpoints)} checkpoint(s), {len(examples)} example(s)"
            + (f", {len(heldout)} held-out" if heldout else "")
            + f", k={recipe.sampling.k}, cache {store.path}"
        )
        with CollectProgress(err, len(checkpoints)) as progress:
            collected = collect(checkpoints, examples, recipe, store, tokenizer=tokenizer, engine=engine,
                                heldout=heldout, proxy_settings=proxy_settings, on_progress=progress.update)
        ranking = rank_checkpoints(collected, store, recipe.memorization, recipe.stages,
                                   pathway_settings=recipe.pathways)
    return RankedRun(ranking, collected, recipe, len(usable))


def _threshold(value: str | None):
    if value is None or value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number (nats/token) nor 'auto'", param_hint="--threshold")


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
    table = Table(title=f"{ranking.n_examples} training examples · {rule}", title_justify="left")
    columns = ["", "step", "epoch", "train loss", "train acc", "pre-mem acc (95% CI)", "memorised", "copy",
               "target NLL", "alt NLL", "perturb gap", "entropy", *(["held-out NLL"] if heldout else []),
               *(["pathway dist", "pathway cplx"] if moe else []), "stage"]
    for name in columns:
        table.add_column(name, justify="left" if name in ("", "stage") else "right")
    for c in ranking.checkpoints:
        mark = "★" if c.index == ranking.recommended else ""
        if c.error:
            table.add_row(mark, _fmt(c.step, "d"), _fmt(c.epoch, ".2f"), _fmt(c.train_loss, ".4f"),
                          f"[red]failed: {c.error}[/]", *[""] * (len(columns) - 5))
            continue
        ci = f"{_fmt(c.premem_acc)} ({_fmt(c.premem_ci[0], '.2f')}–{_fmt(c.premem_ci[1], '.2f')})"
        stage = {"over-memorized": "[red]over-memorized[/]", "underfit": "[dim]underfit[/]"}.get(c.stage, c.stage or "")
        table.add_row(mark, _fmt(c.step, "d"), _fmt(c.epoch, ".2f"), _fmt(c.train_loss, ".4f"), _fmt(c.train_acc),
                      ci, _fmt(c.memorized_frac), _fmt(c.copy_rate), _fmt(c.target_nll), _fmt(c.alt_nll),
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
            console.print(f"[red]over-memorized[/] step {_fmt(c.step, 'd')}: {c.flag.reason()}")
    if ranking.recommended is not None:
        rec = ranking.checkpoints[ranking.recommended]
        console.print(f"[bold green]recommended:[/] {rec.path} (step {_fmt(rec.step, 'd')}, predicted test accuracy "
                      f"{_fmt(rec.premem_acc)} [{_fmt(rec.premem_ci[0])}, {_fmt(rec.premem_ci[1])}])")
        console.print(f"rule: {ranking.rule}")


def _pathway_cells(pathways) -> list[str]:
    """Pathway distance (± its standard error when estimated on sampled pairs, with the memorised
    examples it is over) and complexity; dashes without routing."""
    if pathways is None:
        return ["—", "—"]
    spread = "" if pathways.distance_exact else f"±{pathways.distance_stderr:.2f}"
    return [f"{_fmt(pathways.distance, '.2f')}{spread} (n={pathways.n_examples})", _fmt(pathways.complexity, ".4f")]


def _export(path: Path, ranking, collected) -> None:
    """Per-example table: the data-curation use (collect more data like low-PM examples)."""
    import csv
    import json

    import numpy as np

    from ckptsel.errors import CkptselError

    pe = ranking.per_example
    if not pe:
        raise CkptselError(f"{path}: nothing to export (no checkpoint was measured)")
    steps = [collected.checkpoints[i].step for i in pe["measured_index"]]
    mask = pe["memorized"]
    first = np.where(mask.any(axis=0), mask.argmax(axis=0), -1)
    rows = []
    for n, ex in enumerate(collected.examples):
        rows.append({
            "index": ex.index,
            "uid": ex.uid,
            "premem_acc": _none(pe["premem"][-1, n]),
            "train_acc": _none(pe["acc"][-1, n]),
            "memorized_at_step": steps[first[n]] if first[n] >= 0 else None,
            "final_nll": _none(pe["nll"][-1, n]),
            "copy_rate": _none(pe["copy"][-1, n]),
            "question": ex.question,
        })
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _none(value):
    value = float(value)
    return None if math.isnan(value) else value
