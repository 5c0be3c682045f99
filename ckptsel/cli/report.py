"""``ckptsel report``: one self-contained HTML page with the plots, the numbers and the rules."""

from __future__ import annotations

from pathlib import Path

import click

from ckptsel.cli.options import (
    RECIPE_OPTION_NAMES,
    engine_options,
    json_option,
    print_json,
    quiet_option,
    recipe_options,
    stderr_console,
)
from ckptsel.cli.measuring import measurement_options

# A run folder written by the lab (or laid out like one) carries its data, recipe and ground truth.
RUN_DATA, RUN_RECIPE, RUN_TRUTH = "train.jsonl", "recipe.yaml", "ground_truth.json"


@click.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("report.html"),
              show_default=True, help="The HTML file to write.")
@recipe_options
@measurement_options
@click.option("--verify", "verify_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Measured accuracy: `ckptsel verify --json` output (default: the newest verify results in the cache).")
@click.option("--ground-truth", type=click.Path(dir_okay=False, path_type=Path),
              help=f"True held-out numbers per step (default: {RUN_TRUTH} beside the checkpoints, if there).")
@click.option("--merge", "merges", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="A merged checkpoint (its ckptsel_merge.json) or a merge comparison JSON; repeatable.")
@click.option("--title", help="Page title (default: the run folder's name).")
@click.option("--png", "png_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also write each plot as a PNG into this folder (needs matplotlib).")
@engine_options
@json_option
@quiet_option
@click.pass_context
def report(ctx, path, out, recipe, measurement, verify_path, ground_truth, merges, title, png_dir, engine, cache_dir,
           as_json, quiet):
    """Write the report: plots over training, the recommendation and why, every number.

    PATH is a run or sweep folder (ranked from the cache; only what it lacks is measured) or
    the output of `ckptsel rank --json`. Verify results, the lab's ground_truth.json and merge
    comparisons are added when present. The page needs no network and no script.

    \b
    Example:
      ckptsel report ./run --data train.jsonl --recipe gsm8k -o report.html
      ckptsel rank ./run --data train.jsonl --json > rank.json && ckptsel report rank.json
    """
    import dataclasses

    from ckptsel.cli.measuring import exit_partial, nothing_measured, run_ranking, unmeasured
    from ckptsel.errors import CkptselError
    from ckptsel.outputs import check_writable
    from ckptsel.report import read_ranking, write_report
    from ckptsel.report.inputs import read_json
    from ckptsel.store import Store

    err = stderr_console(quiet=quiet)
    check_writable(out, "report")  # before any ranking
    if png_dir is not None:
        check_writable(Path(png_dir) / "plot.png", "plots")
    provenance = []
    examples = None  # a run ranked here: its measured examples, for the per-example view
    if path.is_file():
        ranking = read_ranking(path)
        nothing_measured(ranking.checkpoints)  # exit 2: nothing to report
        provenance.append(f"ranking: {path}")
        run_dir = _run_dir(ranking)
    else:
        run_dir = path
        if measurement.data is None and measurement.data_per_run is None and (path / RUN_DATA).is_file():
            measurement = dataclasses.replace(measurement, data=path / RUN_DATA)
        if measurement.data is None and measurement.data_per_run is None:
            raise CkptselError(f"{path}: give --data (training data) or --data-per-run FILENAME to rank this run, "
                               "or a rank --json file as PATH")
        if not any(ctx.params.get(name) is not None for name in RECIPE_OPTION_NAMES) and (path / RUN_RECIPE).is_file():
            from ckptsel.recipes import load_recipe

            recipe = load_recipe(path / RUN_RECIPE)
            provenance.append(f"recipe: {path / RUN_RECIPE}")
        request = measurement.request([path], recipe, engine=engine, cache_dir=cache_dir)
        result = run_ranking(request, command="report", quiet=quiet)
        ranking = result.ranking
        examples = None if ranking.is_sweep else result.collected.examples
        data = measurement.data if measurement.data is not None else f"RUN/{measurement.data_per_run} of each run"
        provenance.append(f"training data: {data} (ranked from the cache at report time)")

    verification = read_json(verify_path, "verify") if verify_path is not None else None
    if verify_path is not None:
        provenance.append(f"measured: {verify_path}")
    if ground_truth is None and run_dir is not None and (run_dir / RUN_TRUTH).is_file():
        ground_truth = run_dir / RUN_TRUTH
    truth = read_json(ground_truth, "ground truth") if ground_truth is not None else None
    if ground_truth is not None:
        provenance.append(f"lab ground truth: {ground_truth}")
    truth_by_run = {}
    if ground_truth is None and ranking.is_sweep:  # a sweep: each run's own, when there
        for run in ranking.runs:
            found = Path(run.path) / RUN_TRUTH if run.path else None
            if found is not None and found.is_file():
                truth_by_run[run.name] = read_json(found, "ground truth")
        if truth_by_run:
            provenance.append(f"lab ground truth: {RUN_TRUTH} of {len(truth_by_run)} run(s)")
    provenance += [f"merge: {m}" for m in merges]

    with Store.open(cache_dir) as store:
        written = write_report(
            ranking, out, verification=verification, ground_truth=truth, ground_truth_by_run=truth_by_run,
            merges=merges,
            store=store if verification is None else None, title=title or f"ckptsel report: {_name(run_dir, path)}",
            provenance=provenance, png_dir=png_dir, examples=examples,
        )
    pngs = sorted(str(p) for p in Path(png_dir).glob("*.png")) if png_dir is not None else []
    if as_json:
        print_json({"report": str(written), "png": pngs})
    else:
        err.print(f"report written to [bold]{written}[/]" + (f"; plots as PNG in {png_dir}" if png_dir else ""))
    exit_partial(unmeasured(ranking.checkpoints), "report")


def _run_dir(ranking) -> Path | None:
    """The folder holding the ranked checkpoints (of a :class:`ckptsel.select.Ranking`), when they share one
    (where ground_truth.json would be)."""
    parents = {Path(r.path).parent for r in ranking.checkpoints if r.path}
    return parents.pop() if len(parents) == 1 else None


def _name(run_dir: Path | None, path: Path) -> str:
    return (run_dir or path).resolve().name
