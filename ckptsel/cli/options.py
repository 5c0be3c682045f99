"""Options shared by several commands, and the two consoles.

Results go to stdout (a rich table, or JSON with ``--json``); progress and warnings go
to stderr, so ``ckptsel rank ... --json > out.json`` stays clean.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress output.")


def stdout_console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False)


def stderr_console(quiet: bool = False):
    from rich.console import Console

    return Console(stderr=True, highlight=False, quiet=quiet)


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


# --------------------------------------------------------------------------- recipe options
# `ckptsel data`, `rank`, `gate` and `verify` render training rows the same way; they all take
# these options. Explicit options override the recipe's values; unset ones keep them.

_RECIPE_OPTIONS = (
    click.option(
        "--recipe",
        "recipe_name",
        metavar="NAME|FILE",
        help="A built-in recipe (gsm8k, math, metamath) or a recipe .yaml file. Default: generic templates.",
    ),
    click.option("--question-field", metavar="FIELD", help="Field holding the question (default: detected)."),
    click.option("--answer-field", metavar="FIELD", help="Field holding the target solution (default: detected)."),
    click.option(
        "--prompt-template",
        metavar="TEMPLATE",
        help=r'Prompt text, e.g. "{question}\nAnswer:"; placeholders are field names; \n and \t mean newline and tab.',
    ),
    click.option("--target-template", metavar="TEMPLATE", help='Target text, e.g. " {answer}"; same placeholders.'),
    click.option(
        "--chat-template/--no-chat-template",
        default=None,
        help="Render with the tokenizer's chat template (user = question, target = answer).",
    ),
    click.option("--system-prompt", metavar="TEXT", help="System message when rendering with the chat template."),
    click.option("--grader", metavar="NAME", help="Answer grader: gsm8k, math, number, exact, regex:<pattern>, ..."),
    click.option(
        "--eos/--no-eos",
        "append_eos",
        default=None,
        help="Whether the target ends with the tokenizer's EOS token, as SFT trainers do (default: yes).",
    ),
)

RECIPE_OPTION_NAMES = (
    "recipe_name", "question_field", "answer_field", "prompt_template", "target_template",
    "chat_template", "system_prompt", "grader", "append_eos",
)


def recipe_options(command):
    """Add the recipe options to a command; it receives one ``recipe`` argument (a ``Recipe``) instead.

    The recipe is built when the command runs, so a bad recipe file surfaces as a one-line
    ``RecipeError`` (exit code 2) and nothing heavy is imported at ``--help`` time.
    """
    import functools

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        values = {name: kwargs.pop(name) for name in RECIPE_OPTION_NAMES}
        return command(*args, recipe=build_recipe(**values), **kwargs)

    for option in reversed(_RECIPE_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def build_recipe(recipe_name=None, prompt_template=None, target_template=None, system_prompt=None, **data_values):
    """A ``Recipe`` from the recipe option values: the named recipe (or the defaults) with explicit values on top."""
    from ckptsel.recipes import load_recipe, override
    from ckptsel.settings import Recipe

    recipe = load_recipe(recipe_name) if recipe_name else Recipe()
    return override(
        recipe,
        data={
            "prompt_template": _unescape(prompt_template),
            "target_template": _unescape(target_template),
            "system_prompt": _unescape(system_prompt),
            **data_values,
        },
    )


def _unescape(text):
    r"""Read \n, \t and \\ typed on a command line as newline, tab and backslash."""
    if text is None:
        return None
    out, i = [], 0
    while i < len(text):
        pair = text[i : i + 2]
        if pair in ("\\n", "\\t", "\\\\"):
            out.append({"\\n": "\n", "\\t": "\t", "\\\\": "\\"}[pair])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


# --------------------------------------------------------------------------- engine options
# Every command that loads models takes these; the command receives ``engine`` (an
# ``EngineSettings``) and ``cache_dir`` (a Path or None = $CKPTSEL_CACHE / the user cache dir).

_ENGINE_OPTIONS = (
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N."),
    click.option(
        "--dtype",
        default="auto",
        show_default=True,
        type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
        help="auto = bfloat16 on GPU, float32 on CPU.",
    ),
    click.option("--batch-size", type=click.IntRange(min=1), help="Rows per forward pass (default: automatic)."),
    click.option("--allow-pickle", is_flag=True, help="Allow loading .bin (pickle) weights, with weights_only=True."),
    click.option("--trust-remote-code", is_flag=True, help="Allow model code shipped inside a checkpoint to run."),
    click.option(
        "--backend",
        default="hf",
        show_default=True,
        type=click.Choice(["hf", "vllm"]),
        help="vllm: sample with vLLM when installed (faster on GPU); scoring stays on transformers.",
    ),
    click.option(
        "--ray",
        "ray_address",
        is_flag=False,
        flag_value="local",
        metavar="[ADDRESS]",
        help="Measure checkpoints as Ray tasks, one GPU each (pip install 'ckptsel[ray]'): alone, starts Ray on this "
        "machine; 'auto' or HOST:PORT joins a cluster. Same results as without.",
    ),
    click.option("--ray-cpus", type=click.IntRange(min=1), default=1, show_default=True,
                 help="CPUs (and torch threads) per Ray task."),
    click.option(
        "--cache-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="CKPTSEL_CACHE",
        help="Result store folder [env CKPTSEL_CACHE; default: the user cache dir]. Never inside a checkpoint.",
    ),
)


def engine_options(command):
    """Add the engine options; the command receives ``engine`` and ``cache_dir``."""
    import functools

    @functools.wraps(command)
    def wrapper(*args, device, dtype, batch_size, allow_pickle, trust_remote_code, backend, ray_address, ray_cpus,
                **kwargs):
        from ckptsel.settings import EngineSettings

        engine = EngineSettings(
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            backend=backend,
            ray=ray_address,
            ray_cpus=ray_cpus,
            cache_dir=None if kwargs.get("cache_dir") is None else str(kwargs["cache_dir"]),
        )
        if backend == "vllm":  # a missing vllm is a usage error before any work
            from ckptsel.measure.vllm_backend import require_vllm

            require_vllm()
        if ray_address is not None:  # likewise a missing ray
            from ckptsel.execution.ray import require_ray

            require_ray()
        return command(*args, engine=engine, **kwargs)

    for option in reversed(_ENGINE_OPTIONS):
        wrapper = option(wrapper)
    return wrapper
