"""``ckptsel ls``: which checkpoints were found, in what order, and how they will be read."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ckptsel.cli.options import json_option, print_json, stdout_console
from ckptsel.errors import CkptselError

def human_count(n: int | None) -> str:
    """1234 -> '1.2K', 7_241_732_096 -> '7.2B': parameter counts at a glance."""
    if n is None:
        return ""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _fmt(x: float | None, digits: int) -> str:
    return "" if x is None else f"{x:.{digits}f}"


_SHORT_DTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}


def _model_cell(ckpt) -> str:
    """'Llama f32 25.0K', plus '4 experts top-2' for MoE: what the weights are, in one cell."""
    arch = (ckpt.architecture or "").removesuffix("ForCausalLM")
    parts = [arch, _SHORT_DTYPE.get(ckpt.dtype, ckpt.dtype or ""), human_count(ckpt.num_parameters)]
    if ckpt.num_experts:
        top_k = f" top-{ckpt.experts_per_token}" if ckpt.experts_per_token else ""
        parts.append(f"{ckpt.num_experts} experts{top_k}")
    return " ".join(p for p in parts if p)


def _kind_style(fmt) -> str:
    return "bold red" if not fmt.usable else "cyan" if fmt.is_adapter else "green"


def _row(ckpt, cwd: Path, fp: str | None, with_run: bool) -> dict[str, str]:
    """One table row as rich markup; columns whose cells are all empty are dropped later."""
    from rich.markup import escape  # paths and messages may contain [brackets]

    try:
        shown = str(ckpt.path.relative_to(cwd)) or "."
    except ValueError:
        shown = str(ckpt.path)
    notes = [f"[red]{escape(ckpt.error)}[/]"] if ckpt.error else []
    return {
        "run": escape(ckpt.run or "") if with_run else "",
        "step": "" if ckpt.step is None else str(ckpt.step),
        "tokens": ckpt.tokens or "",
        "checkpoint": escape(shown),
        "kind": f"[{_kind_style(ckpt.format)}]{ckpt.kind}[/]",
        "epoch": _fmt(ckpt.epoch, 2),
        "loss": _fmt(ckpt.train_loss, 4),
        "model": escape(_model_cell(ckpt)),
        "format": escape(ckpt.format.label(ckpt)),
        "fingerprint": (fp or "")[:12],
        "error / notes": "; ".join(notes + [escape(n) for n in ckpt.notes]),
    }


@click.command("ls")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--base-model", metavar="PATH|ID", help="Base model for LoRA adapters (overrides adapter_config.json).")
@click.option("--fingerprint", "with_fingerprint", is_flag=True,
              help="Also compute each checkpoint's content fingerprint (reads a few MB per checkpoint).")
@json_option
def ls(paths, base_model, with_fingerprint, as_json):
    """List checkpoints under PATH... in training order, read from configs and headers only.

    PATH is a run folder (Trainer checkpoint-N/ inside, or pretraining stepN/, stepN-tokensXM/,
    global_stepN/, iter_N/, epoch_N/ folders, plus a final model at its root), a sweep (a folder
    of run folders), a single checkpoint folder, or several of these. Checkpoints are grouped by
    run, each run in training order; the format column says how each is read (safetensors, pickle,
    PEFT, FSDP, DeepSpeed ZeRO: the last two through a converted copy in the cache).

    \b
    Example:
      ckptsel ls ./run
      ckptsel ls ./lora-run --base-model ./base --json

    \b
    Exit codes:
      0  listed; a broken checkpoint is a row with kind 'error' and the reason
      1  nothing usable: every checkpoint found is broken
      2  a PATH does not exist or is not a folder, or holds no checkpoint at all
    """
    import logging

    from ckptsel.checks import architecture_mismatches
    from ckptsel.discover import discover_runs, fingerprint, no_loadable_checkpoint, nothing_found

    runs = discover_runs(paths, base_model=base_model)
    for run in runs:  # a model of another shape inside a run: named here, refused by the ranking commands
        for ckpt, line in architecture_mismatches(run):
            ckpt.notes.append(line.split(": ", 1)[1])
            logging.getLogger("ckptsel.cli.ls").warning("%s", line)
    found = [c for run in runs for c in run.checkpoints]
    if nothing_found(found):  # an empty or unrelated folder: a usage error, as rank says it
        raise CkptselError(no_loadable_checkpoint(paths, found))
    fps = {c.path: fingerprint(c) for c in found if c.format.usable} if with_fingerprint else {}
    usable = sum(c.format.usable for c in found)
    if as_json:
        print_json([c.to_dict() | ({"fingerprint": fps.get(c.path)} if with_fingerprint else {}) for c in found])
    else:
        _print_table(found, fps, Path(os.getcwd()), len(runs))
    if usable == 0:
        raise click.exceptions.Exit(1)


def _print_table(found, fps, cwd, n_runs: int) -> None:
    from rich import box
    from rich.table import Table

    rows = [_row(c, cwd, fps.get(c.path), n_runs > 1) for c in found]
    columns = [name for name in rows[0] if any(r[name] for r in rows)]
    errors = sum(not c.format.usable for c in found)
    runs = f" in {n_runs} runs" if n_runs > 1 else ""
    table = Table(caption=f"{len(found)} checkpoints{runs}, {errors} broken", caption_justify="left",
                  box=box.SIMPLE_HEAD)
    for name in columns:
        # Short cells never wrap and names keep their width up to a cap, so on a narrow
        # terminal it is the model and notes columns that wrap.
        widest = max(len(r[name]) for r in rows)
        table.add_column(name, justify="right" if name in ("step", "tokens", "epoch", "loss") else "left",
                         no_wrap=name in ("run", "step", "tokens", "kind", "epoch", "loss", "fingerprint"),
                         overflow="fold",
                         min_width=min(widest, 40) if name == "checkpoint" else None)
    for n, r in enumerate(rows):
        last_of_run = n + 1 < len(found) and found[n + 1].run != found[n].run
        table.add_row(*(r[name] for name in columns), end_section=last_of_run)
    stdout_console().print(table)
