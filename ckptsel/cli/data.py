"""``ckptsel data``: how training rows will be rendered and graded, before a long run."""

from __future__ import annotations

from pathlib import Path

import click

from ckptsel.cli.options import json_option, print_json, recipe_options, stdout_console


@click.command()
@click.argument("file", type=click.Path(exists=True, path_type=Path))
@recipe_options
@click.option(
    "--tokenizer", "tokenizer_path", type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Tokenizer folder: adds token-length statistics and chat-template rendering.",
)
@click.option(
    "--checkpoint", "checkpoint_path", type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Checkpoint, adapter or run folder whose tokenizer to use (instead of --tokenizer).",
)
@click.option("--show", default=3, show_default=True, type=click.IntRange(min=0), help="Rendered examples to print.")
@click.option("--skip-bad", is_flag=True,
              help="Leave out malformed rows and references the grader cannot read (and count them) instead of stopping.")
@json_option
def data(file, recipe, tokenizer_path, checkpoint_path, show, skip_bad, as_json):
    """Show how FILE's rows render (prompt | target | EOS), their token lengths, and how the grader reads them.

    FILE is JSONL, JSON, Parquet, CSV/TSV or a datasets.save_to_disk folder.

    \b
    ckptsel data train.jsonl --recipe gsm8k
    ckptsel data train.jsonl --prompt-template "Q: {question}\\nA:" --target-template " {answer}" --grader gsm8k
    ckptsel data train.jsonl --recipe math --checkpoint ./run/checkpoint-500 --show 1
    """
    from ckptsel import graders
    from ckptsel.checks import gradable
    from ckptsel.data import grader_coverage, length_summary, load_data, load_tokenizer, token_lengths
    from ckptsel.errors import DataError

    if tokenizer_path and checkpoint_path:
        raise click.UsageError("give --tokenizer or --checkpoint, not both")
    grader = graders.get(recipe.data.grader)
    tokenizer_source = tokenizer_path or checkpoint_path
    tokenizer = load_tokenizer(tokenizer_source) if tokenizer_source else None

    loaded = load_data(file, recipe, tokenizer=tokenizer, skip_bad=skip_bad)
    # References the grader cannot read: a warning, an error when most are (--skip-bad drops them).
    # The error comes after the report, which shows what the grader reads.
    mismatch = None
    try:
        loaded.examples = gradable(loaded.examples, loaded.path, grader, recipe.data.grader, skip_bad=skip_bad)
    except DataError as exc:
        mismatch = exc
    examples = loaded.examples
    lengths = None
    if tokenizer is not None:
        per_example = token_lengths(examples, tokenizer, recipe.data.append_eos)
        lengths = {part: length_summary(values) for part, values in per_example.items()}
    coverage = grader_coverage(examples, grader)
    eos = (tokenizer.eos_token if tokenizer is not None else "<eos>") if recipe.data.append_eos else None

    if as_json:
        print_json(
            {
                "path": str(Path(file).resolve()),
                "recipe": recipe.model_dump(),
                "fields": {"question": loaded.fields.question, "answer": loaded.fields.answer, "messages": loaded.fields.messages},
                "rendering": loaded.rendering,
                "rows": loaded.n_rows,
                "count": len(examples),
                "skipped": len(loaded.skipped),
                "skipped_rows": loaded.skipped,
                "eos": eos,
                "examples": [vars(e) for e in examples[:show]],
                "token_lengths": lengths,
                "grader": {
                    "name": recipe.data.grader,
                    "total": coverage.total,
                    "parsed": coverage.parsed,
                    "self_graded": coverage.self_graded,
                    "parse_rate": coverage.parsed / coverage.total,
                    "self_grade_rate": coverage.self_graded / coverage.total,
                    "unparsed_indices": coverage.unparsed,
                },
            }
        )
    else:
        _print_report(loaded, recipe, show, eos, lengths, coverage, tokenizer_source)
    if mismatch is not None:
        raise mismatch


def _print_report(loaded, recipe, show, eos, lengths, coverage, tokenizer_source) -> None:
    from rich.console import Group
    from rich.panel import Panel
    from rich.rule import Rule
    from rich.table import Table
    from rich.text import Text

    console = stdout_console()
    examples = loaded.examples
    header = Text.assemble(
        (str(loaded.path), "bold"),
        f": {len(examples)} examples · fields {loaded.fields.describe()} · {loaded.rendering} · recipe {recipe.name}",
    )
    console.print(header)
    if loaded.skipped:
        console.print(Text(f"skipped {len(loaded.skipped)} bad row(s):", style="yellow"))
        for message in loaded.skipped[:5]:
            console.print(Text(f"  {message}", style="yellow"))
        if len(loaded.skipped) > 5:
            console.print(Text(f"  ... and {len(loaded.skipped) - 5} more", style="yellow"))

    for example in examples[:show]:
        target = Text(example.target, style="green")
        if eos:
            target.append(eos, style="bold magenta")
        body = Group(
            Rule("prompt", style="cyan", align="left"),
            Text(example.prompt),
            Rule("target" + (" + EOS" if eos else " (no EOS)"), style="green", align="left"),
            target,
        )
        console.print(Panel(body, title=f"row {example.index} · uid {example.uid}", title_align="left"))

    if lengths is not None:
        console.print(Text(f"token lengths with {tokenizer_source} (prompt with BOS, target with EOS):"))
        table = Table()
        table.add_column("")
        for column in ("mean", "p50", "p95", "max"):
            table.add_column(column, justify="right")
        for part, summary in lengths.items():
            table.add_row(part, *(f"{summary[c]:.1f}" if c == "mean" else f"{summary[c]:.0f}" for c in ("mean", "p50", "p95", "max")))
        console.print(table)

    total = coverage.total
    style = "green" if coverage.parsed == total and coverage.self_graded == total else "yellow"
    console.print(
        Text(
            f"grader {recipe.data.grader}: parses {coverage.parsed}/{total} references ({coverage.parsed / total:.1%}), "
            f"grades {coverage.self_graded}/{total} equal to themselves ({coverage.self_graded / total:.1%})",
            style=style,
        )
    )
    if coverage.unparsed:
        by_index = {e.index: e for e in examples}
        first = by_index[coverage.unparsed[0]]
        console.print(
            Text(
                f"  no answer found in rows {', '.join(map(str, coverage.unparsed[:10]))}"
                f"{' ...' if len(coverage.unparsed) > 10 else ''}; row {first.index} ends: {first.reference[-80:]!r}",
                style="yellow",
            )
        )
