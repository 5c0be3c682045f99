"""Options shared by several commands, and the two consoles.

Results go to stdout (a rich table, or JSON with ``--json``); progress and warnings go
to stderr, so ``ckptsel rank ... --json > out.json`` stays clean.
"""

from __future__ import annotations

import json
import sys

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
