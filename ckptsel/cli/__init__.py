"""The ``ckptsel`` command: one click group; each subcommand lives in its own module.

Command modules import only click (and the standard library) at the top; torch,
transformers and the rest are imported inside the command function, so ``ckptsel --help``
stays fast and torch-free.

Exit codes (the gate depends on them):

    0  success (gate: pass)
    1  gate: the candidate failed the policy; other commands: the work itself failed
       (ls: every checkpoint found is broken)
    2  usage or input error (bad option, unreadable data, broken settings file)
    3  partial failure: some checkpoints could not be measured (the rest were reported)
    4  internal error: a bug in ckptsel or a library it calls, not bad input (one line;
       ``ckptsel --debug ...`` or ``CKPTSEL_DEBUG=1`` prints the traceback)

An unexpected exception never exits 1, which the gate reserves for "the candidate failed".
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback

import click

from ckptsel import __version__
from ckptsel.errors import CkptselError

# One explicit table: command name -> "module:attribute". Nothing registers by import side effect.
COMMANDS: dict[str, str] = {
    "ls": "ckptsel.cli.ls:ls",
    "data": "ckptsel.cli.data:data",
    "rank": "ckptsel.cli.rank:rank",
    "curate": "ckptsel.cli.curate:curate",
    "merge": "ckptsel.cli.merge:merge",
    "gate": "ckptsel.cli.gate:gate",
    "lab": "ckptsel.cli.lab:lab",
    "demo": "ckptsel.cli.demo:demo",
    "verify": "ckptsel.cli.verify:verify",
    "report": "ckptsel.cli.report:report",
    "cache": "ckptsel.cli.cache:cache",
}


EXIT_INTERNAL = 4


class InputError(click.ClickException):
    """A one-line user-facing error with exit code 2."""

    exit_code = 2


class InternalError(click.ClickException):
    """An unexpected exception, as one line with exit code 4 (the traceback only with --debug)."""

    exit_code = EXIT_INTERNAL


def debug_enabled(ctx: click.Context | None = None) -> bool:
    """``ckptsel --debug`` or ``CKPTSEL_DEBUG=1``: show tracebacks and ckptsel's debug log."""
    ctx = ctx or click.get_current_context(silent=True)
    if ctx is not None and ctx.find_root().params.get("debug"):
        return True
    return os.environ.get("CKPTSEL_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


class _Group(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CkptselError as exc:
            raise InputError(str(exc)) from None
        except (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except Exception as exc:  # a bug, not bad input: its own exit code, never the gate's 1
            if debug_enabled(ctx):
                traceback.print_exception(exc, file=sys.stderr)
            first = (str(exc).strip().splitlines() or [""])[0]
            raise InternalError(f"internal error: {type(exc).__name__}: {first} "
                                "(run with --debug or CKPTSEL_DEBUG=1 for the traceback)") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ckptsel")
@click.option("--debug", is_flag=True, envvar="CKPTSEL_DEBUG",
              help="Print tracebacks and ckptsel's debug log (env CKPTSEL_DEBUG=1).")
def main(debug):
    """Choose, flag and merge fine-tuning checkpoints from the training data alone.

    \b
    ckptsel ls ./run                       what checkpoints were found, and how they are read
    ckptsel data train.jsonl --recipe gsm8k  how training rows render and grade
    ckptsel rank ./run --data train.jsonl --recipe gsm8k   rank the checkpoints, recommend one
    ckptsel merge ./run/checkpoint-800 ./run/checkpoint-1000 -o merged   average two checkpoints
    """
    # Only the command's own output on stdout: other threads' prints (Ray's error listener) and
    # whatever is written after the command returns (Ray's shutdown) go to stderr.
    from ckptsel.cli.stdout import guard_stdout

    click.get_current_context().call_on_close(guard_stdout().seal)
    # Our own progress bars replace the libraries' (tqdm on stderr would garble --json pipelines).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s" if debug else "warning: %(message)s")
    # --debug: ckptsel's debug log too, e.g. the traceback behind a one-line "measurement failed".
    logging.getLogger("ckptsel").setLevel(logging.DEBUG if debug else logging.NOTSET)

