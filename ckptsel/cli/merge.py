"""``ckptsel merge``: merge checkpoints into a new one, with provenance, written atomically."""

from __future__ import annotations

import click

from ckptsel.cli.options import json_option, print_json, quiet_option, stderr_console, stdout_console

_STAGES = {"fingerprint": "fingerprinting inputs", "build": "merging", "provenance": "writing model card"}


@click.command("merge")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str),
              help="Folder to write (must not exist unless --force).")
@click.option("--method", default="linear", show_default=True, metavar="NAME",
              help="Merge method (list below). LoRA adapters: linear only, exact.")
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
@json_option
@quiet_option
def merge(checkpoints, out, method, weights, base_model, params, rank, full, dtype, device, seed, force, as_json, quiet):
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
    of one base are merged exactly: the weighted sum of their ΔW = scale·B·A, written as an
    adapter (ranks concatenated, or truncated with --rank) or, with --full, as a full model.

    The output holds the weights, config, tokenizer and generation config, a model card
    (README.md) and ckptsel_merge.json naming every input with its fingerprint and weight.
    It is built in a temporary folder beside OUT and renamed into place; inputs are only read.
    """
    console = stderr_console(quiet or as_json)
    from ckptsel.merge import merge as run_merge
    from ckptsel.merge import parse_params, parse_weights, plan_merge

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
    )
    shares = ", ".join(f"{c.path.name}{f' {w:.3g}' if plan.weighted else ''}"
                       for c, w in zip(plan.inputs, plan.normalized_weights))
    console.print(f"merging {len(plan.inputs)} {'adapters' if plan.kind == 'adapter' else 'checkpoints'} "
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
