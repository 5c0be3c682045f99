"""``ckptsel merge``: merge checkpoints into a new one, with provenance, written atomically.

Two commands share the name: explicit merges (``ckptsel merge CKPT... -o OUT``) and the
evidence-based one (``ckptsel merge RUN --recommend --data TRAIN -o OUT``), which takes the
measurement options of ``ckptsel rank``. ``--recommend`` on the command line picks the second
(:class:`_MergeCommand`), so each keeps its own options and help.
"""

from __future__ import annotations

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
from ckptsel.cli.measuring import measurement_options

_STAGES = {"fingerprint": "fingerprinting inputs", "build": "merging", "provenance": "writing model card"}
RECOMMEND_MAX_EXAMPLES = 200  # --recommend's default subset: every candidate is measured on it


@click.command("merge")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--recommend", is_flag=True, help="Choose the merge from the ranking (this form of the command).")
@recipe_options
@measurement_options
@click.option("--tolerance", type=click.FloatRange(0, 1), default=0.01, show_default=True,
              help="Pre-memorization accuracy a candidate may lose against the recommended checkpoint.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str),
              help="Folder to write (must not exist unless --force).")
@click.option("--force", is_flag=True, help="Replace an existing output folder (atomically).")
@engine_options
@json_option
@quiet_option
def merge_recommend(run, recommend, recipe, measurement, tolerance, out, force, engine, cache_dir, as_json, quiet):
    """Write the best of the merges the ranking suggests, chosen on the training data.

    \b
    ckptsel merge ./run --recommend --data train.jsonl --recipe gsm8k -o merged

    Ranks RUN like `ckptsel rank` (from the cache when measured already; for a sweep, the
    merge is made in the run of the sweep's recommended checkpoint), then builds and
    measures, on the same training examples (--max-examples, default 200): the recommended
    checkpoint alone; ½/½ and ⅓/⅔ with its predecessor (Ruan et al.); the mean of the
    predecessor, the recommended checkpoint and the next unflagged one; the mean of the
    unflagged checkpoints from the recommended one to the last unflagged one; model_stock
    when the base is known (LoRA runs; --base-model for full checkpoints). Rule: among the candidates whose
    pre-memorization accuracy (the predictor of test accuracy) is at most --tolerance below
    the recommended checkpoint's, the lowest over-memorization proxy (the ranking's:
    held-out, alternative-solution or perturbed-prompt NLL). The winner is written to OUT with the
    comparison in its model card and ckptsel_merge.json, and stored in the cache for
    `ckptsel report`. Merged candidates are built beside OUT and removed afterwards.
    """
    import dataclasses

    from ckptsel.cli.progress import CollectProgress
    from ckptsel.cli.measuring import exit_partial, run_ranking, unmeasured
    from ckptsel.discover import discover_runs
    from ckptsel.execution import executor_for
    from ckptsel.merge.output import check_target
    from ckptsel.merge.recommend import RecommendError, recommend as run_recommend
    from ckptsel.outputs import check_writable
    from ckptsel.store import Store

    err = stderr_console(quiet)
    check_target(Path(out).absolute(), force)  # output problems before any measuring
    check_writable(out, "merged checkpoint")
    runs = discover_runs([run], base_model=measurement.base_model)
    if max(sum(c.format.usable for c in r.checkpoints) for r in runs) < 2:
        n = sum(len(r.checkpoints) for r in runs)
        raise RecommendError(f"{run}: {n} checkpoint(s) found; --recommend merges checkpoints of one run and needs "
                             "at least two")
    if measurement.max_examples is None:
        measurement = dataclasses.replace(measurement, max_examples=RECOMMEND_MAX_EXAMPLES)
    request = measurement.request([run], recipe, engine=engine, cache_dir=cache_dir, runs=runs)
    executor = executor_for(engine)  # the ranking's and the candidates' measurement
    whole = run_ranking(request, command="merge --recommend", quiet=quiet, executor=executor)
    ranked = whole.run_view()
    checkpoints = ranked.collected.checkpoints
    if len(runs) > 1:
        err.print(f"merging in run {ranked.runs[0].run.name}, the sweep's recommendation")
    err.print("comparing merge candidates")
    with Store.open(cache_dir) as store, CollectProgress(err, len(checkpoints) + 3) as progress:
        result = run_recommend(
            ranked, store, engine=request.engine, out=out, force=force, base_model=measurement.base_model,
            tolerance=tolerance,
            on_progress=progress.update, on_stage=lambda line: err.print(f"  {line}"), executor=executor,
        )
    if as_json:
        print_json(result.to_json())
    else:
        _print_comparison(result)
    # Written, but chosen without those checkpoints: exit 3.
    exit_partial(unmeasured(whole.ranking.checkpoints), "merge --recommend")


def _print_comparison(rec) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"merge candidates ({rec.n_examples} training examples)", title_justify="left")
    proxy = rec.proxy or "proxy"
    for column in ("", "candidate", "train acc", "pre-mem acc (95% CI)", "memorised", "target NLL", proxy,
                   "within tolerance"):
        table.add_column(column, justify="left" if column in ("", "candidate") else "right")
    for row in rec.rows():
        lo, hi = row["premem_ci"] or (None, None)
        failed = f" [red]{escape(row['error'])}[/]" if "error" in row else ""
        table.add_row("★" if row["chosen"] else "", escape(row["candidate"]), _fmt(row["train_acc"]),
                      f"{_fmt(row['premem_acc'])} ({_fmt(lo, '.2f')}–{_fmt(hi, '.2f')})", _fmt(row["memorized_frac"]),
                      _fmt(row["target_nll"]), _fmt(row["proxy"]),
                      "yes" if row["eligible"] else f"no{failed}")
    console = stdout_console()
    if not console.is_terminal:  # piped or redirected: keep the table unsqueezed, as `rank` does
        console.width = max(console.width, 160)
    console.print(table)
    console.print(f"rule: {rec.rule}")
    for note in rec.notes:
        console.print(f"[dim]skipped {escape(note)}[/]")
    for warning in rec.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    console.print(f"[bold green]wrote[/] {escape(rec.winner.label)} to {escape(str(rec.result.path))} "
                  f"({rec.measured} checkpoint load(s) measured anew)")


def _fmt(value, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


class _MergeCommand(click.Command):
    """Explicit merges; ``--recommend`` among the arguments hands the whole command line to
    :func:`merge_recommend` (options, help and all)."""

    def make_context(self, info_name, args, parent=None, **extra):
        options = args[: args.index("--")] if "--" in args else args
        if "--recommend" in options:
            return merge_recommend.make_context(info_name, args, parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)


@click.command("merge", cls=_MergeCommand)
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str),
              help="Folder to write (must not exist unless --force).")
@click.option("--method", default="linear", show_default=True, metavar="NAME",
              help="Merge method (list below). LoRA adapters: linear or model_stock, exact.")
@click.option("--weights", metavar="W1,W2,...",
              help="One relative weight per checkpoint, divided by their sum (default: equal).")
@click.option("--base-model", metavar="PATH",
              help="Base model: needed by task_arithmetic, ties, dare_*, della*, breadcrumbs*, model_stock; "
                   "for adapters it overrides adapter_config.json.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A mergekit method parameter, e.g. density=0.5 (ties, dare_*); repeatable.")
@click.option("--rank", type=click.IntRange(min=1), metavar="R",
              help="Adapters: truncate the merged ΔW to rank R by SVD and report the relative error.")
@click.option("--full", is_flag=True, help="Adapters: write base + merged ΔW as a full model.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16", "float64"]), default="auto",
              show_default=True, help="Output dtype; auto keeps the inputs'.")
@click.option("--device", default="cpu", show_default=True,
              help="Where the arithmetic runs: cpu, cuda, cuda:N, auto.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the random methods (dare_*, della*).")
@click.option("--force", is_flag=True, help="Replace an existing output folder (atomically).")
@click.option("--allow-pickle", is_flag=True,
              help="Allow reading pickled shards (DeepSpeed ZeRO), with weights_only=True, to convert them.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), envvar="CKPTSEL_CACHE",
              help="Where converted copies of ZeRO and FSDP checkpoints live [env CKPTSEL_CACHE; default: the user "
                   "cache dir].")
@json_option
@quiet_option
def merge(checkpoints, out, method, weights, base_model, params, rank, full, dtype, device, seed, force, allow_pickle,
          cache_dir, as_json, quiet):
    """Merge CHECKPOINT... into one checkpoint at -o OUT.

    \b
    ckptsel merge run/checkpoint-400 run/checkpoint-500 -o merged
    ckptsel merge run/checkpoint-400 run/checkpoint-500 --weights 1,3 -o merged
    ckptsel merge ckpt-a ckpt-b ckpt-c --method ties --base-model ./base --param density=0.5 -o merged
    ckptsel merge lora-run/checkpoint-200 lora-run/checkpoint-300 -o merged-adapter
    ckptsel merge lora-run/checkpoint-200 lora-run/checkpoint-300 --rank 8 -o merged-r8
    ckptsel merge lora-run/checkpoint-200 lora-run/checkpoint-300 --full -o merged-model

    Full checkpoints are merged by mergekit (absolute local paths, offline, lazy loading):
    linear (default), slerp, nuslerp, multislerp, karcher, model_stock, task_arithmetic, ties,
    dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear. LoRA adapters
    of one base are merged exactly: the weighted sum of their ΔW = scale·B·A (linear), or
    model_stock computed on the ΔW (the base cancels), written as an adapter (ranks
    concatenated, or truncated with --rank) or, with --full, as a full model.

    The output holds the weights, config, tokenizer and generation config, a model card
    (README.md) and ckptsel_merge.json naming every input with its fingerprint and weight.
    It is built in a temporary folder beside OUT and renamed into place; inputs are only read.
    DeepSpeed ZeRO and FSDP checkpoints are merged from their converted copies in the cache
    (made once, on first use; ZeRO's pickled shards need --allow-pickle); the output is an
    ordinary safetensors model folder.

    To let ckptsel choose (candidates from the ranking, measured on the training data):
    ckptsel merge RUN --recommend --data train.jsonl -o OUT  (options: merge --recommend --help)
    """
    console = stderr_console(quiet or as_json)
    from ckptsel.merge import merge as run_merge
    from ckptsel.merge import parse_params, parse_weights, plan_merge
    from ckptsel.outputs import check_writable

    check_writable(out, "merged checkpoint")  # before fingerprinting or merging anything

    plan = plan_merge(
        checkpoints,
        method=method,
        weights=parse_weights(weights) if weights is not None else None,
        base_model=base_model,
        parameters=parse_params(params),
        rank=rank,
        full=full,
        dtype=None if dtype == "auto" else dtype,
        device=device,
        seed=seed,
        out=out,
        allow_pickle=allow_pickle,
        cache_dir=cache_dir,
    )
    read = [*plan.inputs, *([plan.base] if plan.base is not None else [])]
    if any(c.format.converts for c in read):  # converted copies are written into the cache dir, never a checkpoint
        from ckptsel.formats.converted import default_cache_dir
        from ckptsel.store import ensure_outside

        ensure_outside(cache_dir if cache_dir is not None else default_cache_dir(), [c.path for c in read])
    shares = ", ".join(f"{c.path.name}{f' {w:.3g}' if plan.weighted else ''}"
                       for c, w in zip(plan.inputs, plan.normalized_weights))
    console.print(f"merging {len(plan.inputs)} {'adapters' if plan.adapters else 'checkpoints'} "
                  f"({plan.method}: {shares}) -> {out}")
    def progress(stage: str) -> None:
        if stage in _STAGES:
            console.print(f"  {_STAGES[stage]}")

    result = run_merge(plan, out, force=force, progress=progress, progress_bars=not (quiet or as_json))
    if as_json:
        print_json(result.to_dict())
        return
    _print_result(result)


def _print_result(result) -> None:
    from rich.markup import escape
    from rich.table import Table

    meta = result.meta
    title = f"{escape(str(result.path))} ({meta['method']}, {result.seconds:.1f}s)"
    table = Table(title=title, title_justify="left")
    for column in ("checkpoint", "step", "weight", "fingerprint"):
        table.add_column(column, justify="right" if column in ("step", "weight") else "left")
    for item in meta["inputs"]:
        weight = "" if item["normalized_weight"] is None else f"{item['normalized_weight']:.4g}"
        table.add_row(escape(item["path"]), "" if item["step"] is None else str(item["step"]), weight,
                      item["fingerprint"][:12])
    console = stdout_console()
    console.print(table)
    report = meta["report"]
    if "svd_relative_error" in report:
        console.print(f"rank {report['rank']}: relative error ‖ΔW−ΔW_r‖/‖ΔW‖ = {report['svd_relative_error']:.3e} "
                      f"(worst module {report['svd_max_module_error']:.3e})")
    if result.replaced:
        console.print("replaced the previous output")
    console.print(f"output fingerprint {meta['output_fingerprint'][:12]}")
