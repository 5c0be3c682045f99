"""``ckptsel curate``: which training examples new data should go to, by pre-memorization accuracy."""

from __future__ import annotations

from pathlib import Path

import click

from ckptsel.cli.measuring import measurement_options, run_ranking
from ckptsel.cli.options import (
    engine_options,
    json_option,
    print_json,
    quiet_option,
    recipe_options,
    stderr_console,
    stdout_console,
)

_STRATEGY_HELP = "; ".join(
    f"{name}: {text}" for name, text in {
        "premem": "lowest pre-memorization accuracy first (default)", "iid": "seeded random order",
        "train-acc": "lowest train accuracy first", "loss": "highest target NLL first"}.items())


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@recipe_options
@measurement_options
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Where to write (JSONL): the priorities, the chosen training rows, or the chosen pool rows.")
@click.option("--checkpoint", "step", type=int, help="Prioritise at this step (default: the recommended checkpoint).")
@click.option("--run", "run_name", help="In a sweep: the run to curate for (default: the recommended run).")
@click.option("--strategy", type=click.Choice(["premem", "iid", "train-acc", "loss"]), default="premem",
              show_default=True, help=_STRATEGY_HELP)
@click.option("--top", type=int, help="Write the first N training rows, as they are in the training file.")
@click.option("--fraction", type=float, help="Write the first fraction F of the training rows, as they are.")
@click.option("--pool", type=click.Path(path_type=Path),
              help="Candidate new examples, each naming its training example in a 'source' field (uid or question).")
@click.option("--budget", type=int, help="With --pool: how many pool rows to write.")
@click.option("--curate-seed", "curate_seed", type=int, default=0, show_default=True,
              help="Seed of the tie-breaks and the iid order.")
@engine_options
@json_option
@quiet_option
def curate(paths, recipe, measurement, output, step, run_name, strategy, top, fraction, pool, budget, curate_seed,
           engine, cache_dir, as_json, quiet):
    """Order the training examples for new data by pre-memorization accuracy (Kang et al.'s curation).

    The examples a checkpoint solved only by memorising (low pre-memorization accuracy) are the
    ones new data helps most. PATHS are ranked like `ckptsel rank` (a ranked run reads the cache
    and measures nothing). Writes, as JSONL:

    \b
      every training row with its priority and numbers        (default)
      the first N / fraction F rows of the training file       (--top / --fraction: its own rows, for TRL)
      the N pool rows whose sources come first                 (--pool POOL --budget N)

    Rows outside the measured subset (--max-examples) come after the measured ones.

    \b
    Examples:
      ckptsel curate ./run --data train.jsonl --recipe gsm8k -o priorities.jsonl
      ckptsel curate ./run --data train.jsonl --recipe gsm8k --fraction 0.2 -o hard.jsonl
      ckptsel curate ./run --data train.jsonl --recipe gsm8k --pool rephrased.jsonl --budget 500 -o new.jsonl
    """
    from ckptsel.errors import CkptselError
    from ckptsel.outputs import check_writable

    if (pool is None) != (budget is None):
        raise CkptselError("--pool and --budget go together: the pool to choose from and how many rows to write")
    if pool is not None and (top is not None or fraction is not None):
        raise CkptselError("--top/--fraction choose training rows, --pool/--budget pool rows: give one of them")
    check_writable(output, "curation output")  # before any measuring
    result = run_ranking(measurement.request(paths, recipe, engine=engine, cache_dir=cache_dir), command="curate",
                         quiet=quiet)
    summary = _write(result, output, step=step, run_name=run_name, strategy=strategy, top=top, fraction=fraction,
                     pool=pool, budget=budget, seed=curate_seed, skip_bad=measurement.skip_bad)
    alert = stderr_console()
    for line in summary["unmatched_pool_rows"]:
        alert.print(f"[yellow]skipped:[/] {line}")
    if as_json:
        print_json(summary)
        return
    out = stdout_console()
    where = f"run {summary['run']} " if summary["run_in_sweep"] else ""
    out.print(f"wrote {summary['written']} row(s) to {output} ({summary['what']}; strategy {strategy} at "
              f"{where}step {summary['step']})")
    if summary["unmeasured"]:
        out.print(f"{summary['unmeasured']} training row(s) outside the measured subset come after the "
                  f"{summary['measured']} measured ones (no pre-memorization accuracy; --max-examples measures more)")


def _write(result, output: Path, *, step, run_name, strategy, top, fraction, pool, budget, seed, skip_bad) -> dict:
    """Choose the run and checkpoint, order the rows, write ``output``; the summary ``--json`` prints."""
    import json

    from ckptsel import curate, metrics
    from ckptsel.data import read_rows
    from ckptsel.errors import CkptselError
    from ckptsel.outputs import write_text_atomic

    ranking = result.ranking
    if run_name is not None:
        r = next((r for r, m in enumerate(result.runs) if m.run.name == run_name), None)
        if r is None:
            raise CkptselError(f"no run named {run_name!r}; runs: {', '.join(m.run.name for m in result.runs)}")
    else:
        r = result.recommended_run
    measured_run, summary = result.runs[r], ranking.runs[r]
    pe = summary.per_example
    if not pe:
        raise CkptselError(f"run {measured_run.run.name}: no checkpoint was measured")
    local = [int(i) for i in pe["measured_index"]]
    steps = [measured_run.collected.checkpoints[i].step for i in local]
    if step is None:
        if summary.recommended is None:
            raise CkptselError(f"run {measured_run.run.name}: no recommendation to curate at; pass --checkpoint STEP")
        j = local.index(summary.recommended - summary.indices[0])
    elif step in steps:
        j = steps.index(step)
    else:
        raise CkptselError(f"run {measured_run.run.name}: no measured checkpoint at step {step}; measured: "
                           f"{', '.join(str(s) for s in steps)}")
    first = metrics.first_memorized(pe["memorized"])
    measured = curate.Measured(measured_run.collected.examples, pe["premem"][j], pe["acc"][j], pe["nll"][j],
                               [steps[f] if 0 <= f <= j else None for f in first])
    rows = measured_run.rows or list(measured_run.collected.examples)
    priorities = curate.prioritize(rows, measured, strategy, seed)
    unmatched: list[str] = []
    if pool is not None:
        choice = curate.choose_from_pool(list(read_rows(pool)), priorities, budget, seed=seed, skip_bad=skip_bad)
        lines, unmatched = [row.values for row in choice.rows], choice.unmatched
        what = f"pool rows for {choice.sources} training row(s), of {budget} asked"
    elif top is not None or fraction is not None:
        raw = {row.index: row.values for row in read_rows(measured_run.data)}
        lines = [raw[p.index] for p in curate.take(priorities, top, fraction)]
        what = "training rows as in the training file"
    else:
        lines = [p.to_json() for p in priorities]
        what = "every training row with its priority"
    write_text_atomic(output, "".join(json.dumps(line, ensure_ascii=False, default=_plain) + "\n" for line in lines))
    n_measured = sum(p.measured for p in priorities)
    return {"output": str(output), "run": measured_run.run.name, "run_in_sweep": ranking.is_sweep,
            "step": steps[j], "strategy": strategy, "written": len(lines), "what": what, "measured": n_measured,
            "unmeasured": len(priorities) - n_measured, "unmatched_pool_rows": unmatched,
            "checkpoints_loaded": sum(m.collected.loaded for m in result.runs)}


def _plain(value):
    """JSON for the values a parquet or saved-dataset row may hold (numpy scalars and arrays)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")
