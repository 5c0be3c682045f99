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
"""

from __future__ import annotations

import importlib
import logging
import os

import click

from ckptsel import __version__
from ckptsel.errors import CkptselError

# One explicit table: command name -> "module:attribute". Nothing registers by import side effect.
COMMANDS: dict[str, str] = {
    "ls": "ckptsel.cli.ls:ls",
    "data": "ckptsel.cli.data:data",
    "rank": "ckptsel.cli.rank:rank",
    "merge": "ckptsel.cli.merge:merge",
    "gate": "ckptsel.cli.gate:gate",
    "lab": "ckptsel.cli.lab:lab",
    "demo": "ckptsel.cli.demo:demo",
    "verify": "ckptsel.cli.verify:verify",
    "report": "ckptsel.cli.report:report",
}


class InputError(click.ClickException):
    """A one-line user-facing error with exit code 2."""

    exit_code = 2


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


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ckptsel")
def main():
    """Choose, flag and merge fine-tuning checkpoints from the training data alone.

    \b
    ckptsel ls ./run                       what checkpoints were found, and how they are read
    ckptsel data train.jsonl --recipe gsm8k  how training rows render and grade
    ckptsel rank ./run --data train.jsonl --recipe gsm8k   rank the checkpoints, recommend one
    ckptsel merge ./run/checkpoint-800 ./run/checkpoint-1000 -o merged   average two checkpoints
    """
    # Our own progress bars replace the libraries' (tqdm on stderr would garble --json pipelines).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")

