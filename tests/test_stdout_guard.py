"""Only ckptsel's own output reaches stdout: whatever another thread prints (Ray's error listener
prints a lost node's "Raylet is terminated" there at any moment), whatever native code or a child
process writes to descriptor 1, and whatever is printed after the command returned (Ray's shutdown
at exit) goes to stderr."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from ckptsel.cli import main

NOISY = r"""
import atexit, os, sys, threading, time
import ckptsel.discover
from ckptsel.cli import main

stop = threading.Event()

def chatter():  # as Ray's listener thread does, from the moment it started until the process ends
    while not stop.is_set():
        print("\x1b[33m(raylet)\x1b[0m Raylet is terminated. Termination is unexpected.", file=sys.stdout, flush=True)
        os.write(1, b"native line on descriptor 1\n")
        time.sleep(0.001)

discover_runs = ckptsel.discover.discover_runs

def noisy_discover_runs(*args, **kwargs):  # the library starts inside the command, as ray.init does
    threading.Thread(target=chatter, daemon=True).start()
    os.system("echo a child process writing to its inherited stdout")
    time.sleep(0.05)
    return discover_runs(*args, **kwargs)

ckptsel.discover.discover_runs = noisy_discover_runs
atexit.register(lambda: print("printed at exit, after the command", flush=True))
main(sys.argv[1:])
"""


def _run(*args):
    return subprocess.run([sys.executable, "-c", NOISY, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_other_threads_native_writes_and_exit_time_prints_go_to_stderr(tmp_path):
    (tmp_path / "run" / "checkpoint-1").mkdir(parents=True)  # one broken checkpoint: ls lists it, exit 1
    done = _run("ls", tmp_path / "run", "--json")
    assert done.returncode == 1, done.stderr
    listed = json.loads(done.stdout)  # exactly one JSON document, nothing before or after it
    assert [row["kind"] for row in listed] == ["error"]
    assert "Raylet is terminated" in done.stderr and "native line" in done.stderr
    assert "printed at exit" in done.stderr and "a child process" in done.stderr


def test_the_tables_still_reach_stdout_and_errors_stderr(tmp_path):
    (tmp_path / "run" / "checkpoint-1").mkdir(parents=True)
    table = _run("ls", tmp_path / "run")
    assert "checkpoint-1" in table.stdout and "Raylet" not in table.stdout
    missing = _run("ls", tmp_path / "nope")
    assert missing.returncode == 2 and missing.stdout.strip() == ""
    assert "no such file or directory" in missing.stderr


def test_a_second_in_process_invocation_still_writes_its_output(tmp_path):
    """The first command's guard is sealed when it returns; the next command gets its own, so its
    output is not sent to stderr by the first one's seal."""
    (tmp_path / "run" / "checkpoint-1").mkdir(parents=True)
    first = CliRunner().invoke(main, ["ls", str(tmp_path / "run"), "--json"])
    second = CliRunner().invoke(main, ["ls", str(tmp_path / "run"), "--json"])
    assert json.loads(first.stdout) == json.loads(second.stdout)
