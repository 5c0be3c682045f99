"""``ckptsel gate``: pass or fail one checkpoint of a run, for release pipelines."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

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
from ckptsel.cli.measuring import measurement_options

if TYPE_CHECKING:
    from ckptsel.select import Ranking

EXIT_PASS, EXIT_FAIL = 0, 1  # usage and data errors exit 2, a pass with unmeasured checkpoints 3 (ckptsel.cli)


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@recipe_options
@click.option(
    "--policy", "policy_path", type=click.Path(path_type=Path), help="Policy YAML (rules, candidate, stage thresholds)."
)
@click.option(
    "--candidate",
    metavar="last|recommended|PATH",
    help="Checkpoint to judge when PATH is a run (policy default: last).",
)
@click.option("--min-premem-acc", type=click.FloatRange(0, 1), help="Fail below this predicted test accuracy.")
@click.option(
    "--max-drop",
    type=click.FloatRange(0, 1),
    help="Fail when predicted accuracy is this far below the recommended checkpoint's.",
)
@click.option("--max-memorized", type=click.FloatRange(0, 1), help="Fail above this memorised fraction.")
@click.option(
    "--max-proxy-ratio",
    type=click.FloatRange(min=1),
    help="Fail when the perplexity proxy is this many times its minimum so far.",
)
@click.option("--allow-overmemorized", is_flag=True, help="Do not fail on the over-memorized flag.")
@measurement_options
@engine_options
@json_option
@quiet_option
def gate(path, recipe, policy_path, candidate, min_premem_acc, max_drop, max_memorized, max_proxy_ratio,
         allow_overmemorized, measurement, engine, cache_dir, as_json, quiet):
    """Pass or fail a checkpoint against a policy, judged from the training data and its run's history.

    PATH is a run folder (the candidate is its last checkpoint unless --candidate or the
    policy says otherwise), a sweep (a folder of runs: the candidate is the sweep's
    recommendation unless --candidate or the policy says otherwise) or one checkpoint-N folder
    (its earlier siblings are the history). The run is measured like `ckptsel rank` (cached, incremental). Options
    override the policy file.

    \b
    Exit codes: 0 pass · 1 fail (the reasons are printed) · 2 usage or data error, or the
    candidate (or every checkpoint) could not be measured · 3 passed, but another checkpoint
    of the run could not be measured (the pass rests on part of its history) · 4 internal
    error. Precedence: 2, then 1, then 3.

    \b
    Example:
      ckptsel gate ./run --data train.jsonl --recipe gsm8k --policy recipes/ci/policy.yaml --json
    """
    from rich.markup import escape

    from ckptsel.cli import measuring
    from ckptsel.errors import CkptselError
    from ckptsel.policy import Policy, evaluate, load_policy, validate

    policy = load_policy(policy_path) if policy_path else Policy()
    # The policy's stage thresholds override the recipe's `stages:` only where the file sets them.
    stages = {name: getattr(policy.stages, name) for name in policy.stages.model_fields_set}
    overrides = {
        "min_premem_acc": min_premem_acc,
        "max_drop_from_recommended": max_drop,
        "max_memorized_frac": max_memorized,
        "max_proxy_ratio": max_proxy_ratio,
        "fail_if_overmemorized": False if allow_overmemorized else None,
    }
    payload = policy.model_dump()
    payload["rules"].update({k: v for k, v in overrides.items() if v is not None})
    if candidate in ("last", "recommended"):
        payload["candidate"] = candidate
    policy = validate(payload, "options")

    runs, chosen = _candidate(path, candidate, measurement.base_model)
    request = measurement.request([path], recipe, engine=engine, cache_dir=cache_dir, runs=runs, stages=stages)
    run = measuring.run_ranking(request, command="gate", quiet=quiet)
    ranking = run.ranking
    candidate_set = candidate is not None or "candidate" in policy.model_fields_set
    if chosen is None:
        if policy.candidate == "recommended" or (len(runs) > 1 and not candidate_set):
            chosen = ranking.recommended  # a sweep's default candidate: the sweep's pick
        else:
            chosen = _last_measured(ranking)
    if chosen is None or ranking.checkpoints[chosen].error:
        reason = (measuring.unmeasured([ranking.checkpoints[chosen]])[0] if chosen is not None
                  else "no checkpoint could be measured")
        raise CkptselError(f"gate: the candidate could not be measured: {reason}")

    checks = evaluate(ranking, chosen, policy.rules)
    passed = all(ch.passed for ch in checks)
    c = ranking.checkpoints[chosen]
    if as_json:
        print_json({
            "passed": passed,
            "candidate": {"index": c.index, "path": c.path, "step": c.step, "stage": c.stage,
                          "premem_acc": c.premem_acc, "flag": None if c.flag is None else c.flag.to_json()},
            "reasons": [ch.detail for ch in checks if not ch.passed],
            "checks": [ch.to_json() for ch in checks],
            "policy": {**policy.model_dump(), "stages": run.recipe.stages.model_dump()},  # the thresholds applied
            "ranking": run.to_json(),
        })
    else:
        console = stdout_console()
        verdict = "[bold green]PASS[/]" if passed else "[bold red]FAIL[/]"
        console.print(f"{verdict} {c.path} (step {c.step}, {c.stage}, predicted test accuracy {c.premem_acc:.3f})")
        for ch in checks:
            console.print(f"  {'ok' if ch.passed else '[red]failed[/]'} {ch.name}: {ch.detail}")
    alert = stderr_console()
    for warning in ranking.warnings:
        alert.print(f"[yellow]warning:[/] {warning}")
    failures = measuring.unmeasured(ranking.checkpoints)
    if not passed:  # the gate's own verdict comes first: a failed candidate is 1 even with gaps in its history
        for reason in failures:
            alert.print(f"[yellow]not measured:[/] {escape(reason)}", soft_wrap=True)
        raise SystemExit(EXIT_FAIL)
    measuring.exit_partial(failures, "gate")  # passed, on part of the history: 3
    raise SystemExit(EXIT_PASS)


def _candidate(path: Path, candidate: str | None, base_model: str | None):
    """(runs to measure, index of the candidate in the ranking, or None to pick after ranking).

    A checkpoint-N folder inside a run is judged with the run's checkpoints up to it as
    history; a run or sweep folder gives all its checkpoints; ``--candidate PATH`` must be one
    of them.
    """
    from ckptsel.discover import Run, discover_runs
    from ckptsel.errors import CkptselError

    runs = discover_runs([path], base_model=base_model)
    found = [c for run in runs for c in run.checkpoints]
    target = path.expanduser().resolve()
    is_single = len(found) == 1 and found[0].path.resolve() == target
    if is_single:
        if candidate not in (None, "last", "recommended"):
            raise click.UsageError("--candidate applies to a run folder; PATH is already one checkpoint")
        history = discover_runs([target.parent], base_model=base_model)
        history = history[0].checkpoints if len(history) == 1 else []
        paths = [c.path.resolve() for c in history]
        if target not in paths:  # a lone checkpoint folder: no history to judge against
            return runs, 0
        history = history[: paths.index(target) + 1]
        return [Run(runs[0].name, runs[0].path, history)], len(history) - 1
    if candidate in (None, "last", "recommended"):
        return runs, None
    wanted = Path(candidate).expanduser().resolve()
    for i, c in enumerate(found):
        if c.path.resolve() == wanted:
            return runs, i
    raise CkptselError(f"--candidate {candidate}: not a checkpoint of {path} (found {len(found)})")


def _last_measured(ranking: Ranking) -> int | None:
    """The last checkpoint of the run (in training order), even if it failed: the gate must not skip it.
    For a sweep: the last checkpoint of the recommended checkpoint's run."""
    if not ranking.checkpoints:
        return None
    run = ranking.run_of(ranking.recommended) if ranking.recommended is not None and ranking.is_sweep else None
    return run.indices[-1] if run is not None else len(ranking.checkpoints) - 1
