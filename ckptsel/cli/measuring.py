"""What every command that ranks checkpoints shares: the measurement options, running the ranking with
its progress bar, and the exits for checkpoints that could not be measured.

``rank``, ``gate``, ``report``, ``merge --recommend``, ``verify`` and ``demo`` use these; each command
module holds only its own options and output.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import click

from ckptsel.cli.options import stderr_console


# --------------------------------------------------------------------------- options shared with `gate`
# What is measured and how; `rank`, `gate` and `merge --recommend` take the same ones, so a gate
# in CI reuses the cache of a rank run made with the same options.

_MEASUREMENT_OPTIONS = (
    click.option("--data", "data", type=click.Path(path_type=Path),
                 help="Training data file or folder, for every run."),
    click.option("--data-per-run", metavar="FILENAME",
                 help="Each run reads its own RUN/FILENAME (data-size sweeps); instead of --data."),
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
        metavar="NU|auto|auto-run",
        help="Memorisation threshold nu in nats/token (recipe default), or 'auto' to calibrate it from copy rates "
        "on the pooled pairs of all runs ('auto-run': each run alone); falls back to the recipe's nu where it "
        "cannot be fitted.",
    ),
    click.option(
        "--memorization",
        "memorization_rule",
        type=click.Choice(["nll", "peak-nll", "copy"]),
        help="nll: the target's mean NLL per token below the threshold (default); peak-nll: every target token's "
        "NLL below it (its own default threshold, 1.0: benchmarks/README.md); copy: samples reproduce the training "
        "solution.",
    ),
    click.option("--skip-bad", is_flag=True, help="Drop bad rows (malformed, a reference the grader cannot read, "
                 "longer than the model's context) with a warning, instead of stopping."),
    click.option(
        "--heldout",
        "heldout",
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
        help="Perplexity proxy of the flag (default: the recipe's stages.proxy, auto: held-out, "
        "else alternative-solution, else perturbed-prompt NLL).",
    ),
    click.option(
        "--prefer",
        type=click.Choice(["accuracy", "robustness"]),
        help="accuracy (default, the recipe's stages.prefer): a checkpoint flagged over-memorized is passed over "
        "only for one as accurate; robustness: the best checkpoint that is not flagged.",
    ),
)


@dataclass(frozen=True)
class Measurement:
    """The measurement options as given on the command line (None: the recipe's value)."""

    data: Path | None = None
    data_per_run: str | None = None
    base_model: str | None = None
    max_examples: int | None = None
    examples_seed: int = 0
    k: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    seed: int | None = None
    threshold: float | str | None = None
    memorization_rule: str | None = None
    skip_bad: bool = False
    heldout: Path | None = None
    alt_grader: str | None = None
    proxy: str | None = None
    prefer: str | None = None

    def request(self, paths, recipe, *, engine, cache_dir, runs=None, stages: dict | None = None):
        """The :class:`ckptsel.pipeline.RankRequest` these options ask for; ``stages`` overrides the
        recipe's stage thresholds (a gate policy's), and ``--proxy`` / ``--prefer`` override both."""
        from ckptsel.pipeline import RankRequest
        from ckptsel.recipes import override
        from ckptsel.settings import default_threshold

        sampling = {"k": self.k, "temperature": self.temperature, "top_p": self.top_p,
                    "max_new_tokens": self.max_new_tokens, "seed": self.seed}
        stages = {**(stages or {}), **({"proxy": self.proxy} if self.proxy is not None else {}),
                  **({"prefer": self.prefer} if self.prefer is not None else {})}
        memorization = {"rule": self.memorization_rule}
        if self.memorization_rule not in (None, recipe.memorization.rule):  # nu is on the new rule's scale
            memorization["threshold"] = default_threshold(self.memorization_rule)
        recipe = override(recipe, sampling=sampling, memorization=memorization,
                          proxies={"alt_grader": self.alt_grader}, stages=stages)
        return RankRequest(
            paths=tuple(Path(p) for p in paths), recipe=recipe, data=self.data, data_per_run=self.data_per_run,
            threshold=self.threshold, base_model=self.base_model, max_examples=self.max_examples,
            examples_seed=self.examples_seed, skip_bad=self.skip_bad, heldout=self.heldout, engine=engine,
            cache_dir=cache_dir, runs=None if runs is None else tuple(runs),
        )


def measurement_options(command):
    """Add the measurement options; the command receives one ``measurement`` (a :class:`Measurement`)."""
    import functools

    names = [f.name for f in dataclasses.fields(Measurement)]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        values = {name: kwargs.pop(name) for name in names}
        values["threshold"] = _threshold(values["threshold"])
        return command(*args, measurement=Measurement(**values), **kwargs)

    for option in reversed(_MEASUREMENT_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def run_ranking(request, *, command: str, quiet: bool, executor=None):
    """Run :func:`ckptsel.pipeline.rank_runs` with its opening line and one progress bar on stderr
    (``executor``: default, the one the request's engine settings ask for)."""
    from ckptsel.cli.progress import CollectProgress
    from ckptsel.pipeline import rank_runs

    err = stderr_console(quiet=quiet)  # progress; warnings and failures always print
    progress = None

    def start(plan) -> None:
        nonlocal progress
        err.print(f"[bold]ckptsel {command}[/]: {plan.describe()}")
        progress = CollectProgress(err, plan.checkpoints).__enter__()

    try:
        result = rank_runs(request, on_start=start, on_progress=lambda event: progress and progress.update(event),
                           executor=executor)
    finally:
        if progress is not None:
            progress.__exit__(None, None, None)
    nothing_measured(result.ranking.checkpoints)  # exit 2, not 3
    return result


EXIT_PARTIAL = 3  # some checkpoints could not be measured; the others are reported (ckptsel.cli)


def nothing_measured(rows) -> None:
    """Exit 2 (a :class:`CkptselError`) when not one checkpoint could be measured; ``rows`` as
    for :func:`unmeasured`."""
    from ckptsel.errors import CkptselError

    rows = list(rows)
    errors = unmeasured(rows)
    if rows and len(errors) == len(rows):
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise CkptselError(f"no checkpoint could be measured: {errors[0]}{more}")


def unmeasured(rows) -> list[str]:
    """One line per checkpoint that could not be measured, naming it: ``rows`` have a ``path`` and an
    ``error`` (a ranking's :class:`ckptsel.select.CheckpointMetrics`, verify's ``Measured``)."""
    return [row.error if str(row.path) in row.error else f"{row.path}: {row.error}" for row in rows if row.error]


def exit_partial(failures: list[str], command: str) -> None:
    """Name each checkpoint that could not be measured (:func:`unmeasured`) and exit 3; nothing
    to do without failures."""
    from rich.markup import escape

    if not failures:
        return
    alert = stderr_console()
    for reason in failures:
        alert.print(f"[red]failed:[/] {escape(reason)}", soft_wrap=True)
    alert.print(f"{command}: {len(failures)} checkpoint(s) could not be measured; the others are reported (exit 3)",
                soft_wrap=True)
    raise SystemExit(EXIT_PARTIAL)


def _threshold(value: str | None):
    if value is None or value in ("auto", "auto-run"):
        return value
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number (nats/token) nor 'auto' / 'auto-run'",
                                 param_hint="--threshold")
