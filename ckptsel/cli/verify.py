"""``ckptsel verify``: measure test accuracy with lm-eval and put it beside the prediction."""

from __future__ import annotations

import logging
import os
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
@click.option("--test-file", type=click.Path(path_type=Path), help="Held-out test data, rendered with the recipe.")
@recipe_options
@click.option("--tasks", metavar="NAMES", help="Comma-separated lm-eval task names (their data must be local).")
@click.option("--include-path", type=click.Path(file_okay=False, path_type=Path), help="Extra lm-eval task configs.")
@click.option("--num-fewshot", type=click.IntRange(min=0), help="--tasks: few-shot examples (default: the task's).")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate only the first N test examples.")
@click.option("--greedy", is_flag=True, help="One greedy completion per question instead of k samples.")
@click.option("-k", "--samples", "k", type=click.IntRange(min=1), help="Samples per question (recipe default: 5).")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), help="Sampling temperature (default 0.8).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), help="Nucleus sampling mass (default 0.95).")
@click.option("--max-new-tokens", type=click.IntRange(min=1),
              help="Generation budget (default: recipe's, else 1.5 x the longest reference + 16).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of lm-eval's sampling.")
@click.option("--ranking", "ranking_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Predictions: the output of `ckptsel rank --json`.")
@click.option("--data", "data_path", type=click.Path(path_type=Path),
              help="Predictions: rank the checkpoints on this training data (stored measurements are reused).")
@click.option("--data-per-run", metavar="FILENAME",
              help="Predictions for a sweep: each run ranked on its own RUN/FILENAME (instead of --data).")
@click.option("--max-examples", type=click.IntRange(min=1), help="--data: the fixed random subset of training examples.")
@click.option("--examples-seed", type=int, default=0, show_default=True, help="--data: seed of that subset.")
@click.option("--base-model", metavar="PATH", help="Base model for LoRA adapters (overrides adapter_config.json).")
@click.option("--skip-bad", is_flag=True, help="Skip malformed data rows instead of stopping.")
@engine_options
@json_option
@quiet_option
def verify(paths, test_file, recipe, tasks, include_path, num_fewshot, limit, greedy, k, temperature, top_p,
           max_new_tokens, seed, ranking_path, data_path, data_per_run, max_examples, examples_seed, base_model, skip_bad, engine,
           cache_dir, as_json, quiet):
    """Measure test accuracy with lm-eval; compare it with the predicted (pre-memorization) accuracy.

    With --test-file, the test rows are rendered with the same templates as training and
    graded with the recipe's grader, inside lm-eval (offline). With --tasks, named lm-eval
    tasks run on the loaded checkpoints. Predictions come from --ranking (rank --json) or
    --data (ranks from the cache). Results are cached: a rerun loads no model.

    \b
    Example:
      ckptsel verify ./run --test-file test.jsonl --recipe gsm8k --data train.jsonl --greedy
    """
    from ckptsel.cli.progress import CollectProgress
    from ckptsel.cli.measuring import exit_partial, nothing_measured, unmeasured
    from ckptsel.prepare import checked_runs
    from ckptsel.recipes import override
    from ckptsel.store import Store

    if (test_file is None) == (tasks is None):
        raise click.UsageError("give exactly one of --test-file or --tasks")
    if ranking_path is not None and (data_path is not None or data_per_run is not None):
        raise click.UsageError("give --ranking or --data/--data-per-run, not both")
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's own bars would garble ours and --json pipelines
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    err = stderr_console(quiet=quiet)

    runs = checked_runs(paths, base_model=base_model, cache_dir=cache_dir)  # the ranking's discovery and checks
    checkpoints = [c for run in runs for c in run.checkpoints]
    ranking = _predictions(paths, ranking_path, data_path, data_per_run, recipe, runs, max_examples, examples_seed,
                           skip_bad, base_model, engine, cache_dir, quiet)

    with Store.open(cache_dir) as store:
        if test_file is not None:
            from ckptsel.execution import executor_for
            from ckptsel.prepare import checked_rows
            from ckptsel.tokenizers import load_tokenizer
            from ckptsel.verify import default_budget, unique_examples, verify_file

            decoding = {"k": k, "temperature": 0.0 if greedy else temperature, "top_p": top_p}
            test_recipe = override(recipe, sampling=decoding)
            tokenizer = load_tokenizer(next(c for c in checkpoints if c.format.usable), trust_remote_code=engine.trust_remote_code)
            examples = checked_rows(test_file, checkpoints, test_recipe, store, skip_bad=skip_bad, tokenizer=tokenizer,
                                    select=lambda rows: unique_examples(rows, limit))
            budget = max_new_tokens or default_budget(tokenizer, examples, test_recipe)
            err.print(f"[bold]ckptsel verify[/]: {len(checkpoints)} checkpoint(s), {len(examples)} test question(s) "
                      f"from {test_file}, lm-eval, budget {budget} tokens, cache {store.path}")
            with CollectProgress(err, len(checkpoints)) as progress:
                results = [verify_file(checkpoints, examples, test_recipe, store, source=str(test_file),
                                       engine=engine, max_new_tokens=budget, seed=seed, on_progress=progress.update,
                                       executor=executor_for(engine))]
        else:
            from ckptsel.verify import verify_tasks

            names = [t.strip() for t in tasks.split(",") if t.strip()]
            err.print(f"[bold]ckptsel verify[/]: {len(checkpoints)} checkpoint(s), lm-eval task(s) {', '.join(names)}")
            with CollectProgress(err, len(checkpoints)) as progress:
                results = verify_tasks(checkpoints, names, store, engine=engine, limit=limit, num_fewshot=num_fewshot,
                                       include_path=None if include_path is None else str(include_path), seed=seed,
                                       on_progress=progress.update)
    for result in results:
        result.attach_predictions(ranking)

    if as_json:
        print_json({"verifications": [r.to_json() for r in results],
                    "predictions": str(ranking_path or data_path) if ranking is not None else None})
    else:
        out = stdout_console()
        if not out.is_terminal:  # piped or redirected: keep the table unsqueezed
            out.width = max(out.width, 160)
        for result in results:
            _print_table(out, result)
    failures = {m.index: m for r in results for m in r.checkpoints if m.error}
    if len(failures) == len(checkpoints):  # not one checkpoint measured: exit 2, not 3
        nothing_measured(failures.values())
    reasons = unmeasured(failures.values())
    reasons += [f"prediction: {line}" for line in unmeasured(ranking.checkpoints if ranking is not None else [])
                if line not in reasons]
    exit_partial(reasons, "verify")


def _predictions(paths, ranking_path, data_path, data_per_run, recipe, runs, max_examples, examples_seed, skip_bad,
                 base_model, engine, cache_dir, quiet):
    """The ranking to compare against (a :class:`ckptsel.select.Ranking`, or None): a rank --json file, or
    computed now from the cache (measuring what it lacks)."""
    if ranking_path is not None:
        from ckptsel.report.inputs import read_ranking

        return read_ranking(ranking_path)
    if data_path is None and data_per_run is None:
        return None
    from ckptsel.cli.measuring import run_ranking
    from ckptsel.pipeline import RankRequest

    request = RankRequest(paths=tuple(paths), recipe=recipe, data=data_path, data_per_run=data_per_run,
                          base_model=base_model, max_examples=max_examples, examples_seed=examples_seed,
                          skip_bad=skip_bad, engine=engine, cache_dir=cache_dir, runs=tuple(runs))
    return run_ranking(request, command="verify (ranking)", quiet=quiet).ranking


def _fmt(value, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def _interval(ci) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]"


def _print_table(console, result) -> None:
    from rich.table import Table

    title = (f"{result.source} · {result.n_examples} question(s) · {result.mode}"
             + (f" · budget {result.max_new_tokens} tokens" if result.max_new_tokens else "") + f" · {result.harness}")
    table = Table(title=title, title_justify="left")
    for name in ("checkpoint", "step", "predicted (pre-mem acc)", "measured", "measured − predicted", "n", "from"):
        table.add_column(name, justify="left" if name == "checkpoint" else "right")
    for m in result.checkpoints:
        name = Path(m.path).name
        if m.error:
            table.add_row(name, _fmt(m.step, "d"), "", f"[red]failed: {m.error}[/]", "", "", "")
            continue
        delta = None if m.predicted is None or m.accuracy is None else m.accuracy - m.predicted
        table.add_row(name, _fmt(m.step, "d"), _fmt(m.predicted) + _interval(m.predicted_ci),
                      _fmt(m.accuracy) + _interval(m.ci), _fmt(delta, "+.3f"), str(m.n),
                      "cache" if m.from_cache else "lm-eval")
    console.print(table)
    console.print(f"accuracy: {result.metric}; intervals: 95% bootstrap over questions")
    a = result.agreement
    if a is None:
        console.print("no predictions given (--ranking rank.json or --data train.jsonl puts them beside)")
    elif a.r2_identity is not None:
        console.print(f"agreement over {a.n} checkpoints: R² (identity line) {a.r2_identity:.3f}, R² (fitted) "
                      f"{_fmt(a.r2_fitted)}, Pearson {_fmt(a.pearson)}, Spearman {_fmt(a.spearman)}, "
                      f"mean |error| {a.mean_abs_error:.3f}")
    elif a.n:
        console.print(f"mean |measured − predicted| {a.mean_abs_error:.3f} over {a.n} checkpoint(s); "
                      "R² and rank correlation need ≥ 3 checkpoints")
