"""``ckptsel rank``: measure every checkpoint on the training data and rank them."""

from __future__ import annotations

import math
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


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path), help="Training data file or folder.")
@recipe_options
@click.option("--base-model", metavar="PATH", help="Base model for LoRA adapters (overrides adapter_config.json).")
@click.option("--max-examples", type=click.IntRange(min=1), help="Measure a fixed random subset of this many examples.")
@click.option("--examples-seed", type=int, default=0, show_default=True, help="Seed of the --max-examples subset.")
@click.option("-k", "--samples", "k", type=click.IntRange(min=1), help="Samples per question (recipe default: 5).")
@click.option("--temperature", type=click.FloatRange(min=0), help="Sampling temperature (default 0.8; 0 = greedy).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), help="Nucleus sampling mass (default 0.95).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), help="Generation budget (default: from target lengths).")
@click.option("--seed", type=int, help="Base sampling seed (default 0).")
@click.option(
    "--threshold",
    metavar="NU|auto",
    help="Memorisation threshold nu in nats/token (recipe default), or 'auto' to calibrate it from copy rates.",
)
@click.option(
    "--memorization",
    "memorization_rule",
    type=click.Choice(["nll", "copy"]),
    help="nll: target NLL below the threshold (default); copy: samples reproduce the training solution.",
)
@click.option("--skip-bad", is_flag=True, help="Skip malformed data rows instead of stopping.")
@click.option("--export-examples", type=click.Path(path_type=Path), help="Write the per-example table (.csv or .jsonl).")
@engine_options
@json_option
@quiet_option
def rank(paths, data_path, recipe, base_model, max_examples, examples_seed, k, temperature, top_p, max_new_tokens,
         seed, threshold, memorization_rule, skip_bad, export_examples, engine, cache_dir, as_json, quiet):
    """Rank checkpoints by pre-memorization train accuracy (predicted test accuracy).

    Measures each checkpoint once (target NLL, k graded samples per question), keeps the
    results in the cache (resumable, incremental), and recommends one checkpoint.

    \b
    Example:
      ckptsel rank ./run --data train.jsonl --recipe gsm8k --max-examples 500
    """
    from ckptsel.cli.progress import CollectProgress
    from ckptsel.collect import collect, select_examples
    from ckptsel.data import load_data
    from ckptsel.discover import discover
    from ckptsel.errors import CkptselError
    from ckptsel.measure.loading import load_tokenizer
    from ckptsel.recipes import override
    from ckptsel.select import rank as rank_checkpoints
    from ckptsel.settings import SelectionSettings
    from ckptsel.store import Store, ensure_outside

    err = stderr_console(quiet=quiet)  # progress; warnings and failures always print
    alert = stderr_console()
    sampling = {"k": k, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed}
    memo = {"rule": memorization_rule, "threshold": _threshold(threshold)}
    recipe = override(recipe, sampling=sampling, memorization=memo)

    checkpoints = discover(paths, base_model=base_model)
    usable = [c for c in checkpoints if c.kind != "error"]
    if not usable:
        reasons = "; ".join(f"{c.path.name}: {c.error}" for c in checkpoints[:3])
        raise CkptselError(f"no loadable checkpoint under {', '.join(map(str, paths))} ({reasons})")
    tokenizer = load_tokenizer(usable[0], trust_remote_code=engine.trust_remote_code)
    loaded = load_data(data_path, recipe, tokenizer=tokenizer, skip_bad=skip_bad)
    examples = select_examples(loaded.examples, SelectionSettings(max_examples=max_examples, examples_seed=examples_seed))
    if not examples:
        raise CkptselError(f"{data_path}: no training examples")
    ensure_outside(cache_dir, [c.path for c in checkpoints])

    with Store.open(cache_dir) as store:
        err.print(
            f"[bold]ckptsel rank[/]: {len(checkpoints)} checkpoint(s), {len(examples)} example(s), "
            f"k={recipe.sampling.k}, cache {store.path}"
        )
        with CollectProgress(err, len(checkpoints)) as progress:
            collected = collect(checkpoints, examples, recipe, store, tokenizer=tokenizer, engine=engine,
                                on_progress=progress.update)
        ranking = rank_checkpoints(collected, store, recipe.memorization)

    if export_examples:
        _export(export_examples, ranking, collected)
    if as_json:
        out = ranking.to_json()
        out["settings_key"] = collected.settings_key
        out["cache"] = {"measured": collected.loaded, "from_cache": len(usable) - collected.loaded}
        print_json(out)
    else:
        _print_table(stdout_console(), ranking, recipe)
    for warning in ranking.warnings:
        alert.print(f"[yellow]warning:[/] {warning}")
    for reason in collected.failures.values():
        alert.print(f"[red]failed:[/] {reason}")
    if collected.failures:
        raise SystemExit(3)


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
    table = Table(title=f"{ranking.n_examples} training examples · {rule}", title_justify="left")
    for name, justify in [("", "left"), ("step", "right"), ("epoch", "right"), ("train loss", "right"),
                          ("train acc", "right"), ("pre-mem acc (95% CI)", "right"), ("memorised", "right"),
                          ("copy", "right"), ("target NLL", "right")]:
        table.add_column(name, justify=justify)
    for c in ranking.checkpoints:
        mark = "★" if c.index == ranking.recommended else ""
        if c.error:
            table.add_row(mark, _fmt(c.step, "d"), _fmt(c.epoch, ".2f"), _fmt(c.train_loss, ".4f"),
                          f"[red]failed: {c.error}[/]", "", "", "", "")
            continue
        ci = f"{_fmt(c.premem_acc)} ({_fmt(c.premem_ci[0], '.2f')}–{_fmt(c.premem_ci[1], '.2f')})"
        table.add_row(mark, _fmt(c.step, "d"), _fmt(c.epoch, ".2f"), _fmt(c.train_loss, ".4f"), _fmt(c.train_acc),
                      ci, _fmt(c.memorized_frac), _fmt(c.copy_rate), _fmt(c.target_nll))
    console.print(table)
    if ranking.recommended is not None:
        rec = ranking.checkpoints[ranking.recommended]
        console.print(f"[bold green]recommended:[/] {rec.path} (step {_fmt(rec.step, 'd')}, predicted test accuracy "
                      f"{_fmt(rec.premem_acc)} [{_fmt(rec.premem_ci[0])}, {_fmt(rec.premem_ci[1])}])")
        console.print(f"rule: {ranking.rule}")


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
