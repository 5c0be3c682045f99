"""Render a ckptsel report in headless Chromium: the plots are there, nothing errs, nothing is fetched.

    python benchmarks/report_browser_check.py report.html [--expect-svgs N] [--screenshot shot.png] [--dark]

Three Chromium runs, all with every host name unresolvable (a page that needed the network
would log failed requests):

1. ``--dump-dom``: the DOM after load -- counts the ``<svg>`` charts, their data points and
   the figures, and any ``src``/``href`` pointing off the page;
2. the same run's log (``--enable-logging=stderr``): console messages and errors, failed
   loads (``net::ERR``);
3. ``--screenshot`` (light, or dark with ``--dark``) for a person to look at.

Prints one line per check; exits 1 when a check fails. Needs Debian's ``chromium``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

OFFLINE = ["--host-resolver-rules=MAP * ~NOTFOUND", "--no-proxy-server"]
BASE = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run", *OFFLINE]
# Log lines that mean the page itself went wrong (Chromium's own start-up chatter is not the page's).
PAGE_ERRORS = re.compile(r"CONSOLE\(\d+\)|Uncaught|net::ERR_|Failed to load resource", re.I)


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        sys.exit("chromium not found: apt-get install -y chromium")
    return exe


def run(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), *BASE, *args], capture_output=True, text=True, timeout=timeout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("--expect-svgs", type=int, help="Fail unless the page has exactly this many charts.")
    parser.add_argument("--screenshot", type=Path, help="Write a full-page screenshot here.")
    parser.add_argument("--dark", action="store_true", help="Screenshot with the dark colour scheme.")
    parser.add_argument("--size", default="1280,2600", help="Window size for the screenshot (WIDTH,HEIGHT).")
    args = parser.parse_args()
    url = args.page.resolve().as_uri()
    ok = True

    dump = run(["--enable-logging=stderr", "--v=0", "--dump-dom", url])
    dom = dump.stdout
    n_svg = len(re.findall(r"<svg\b", dom))
    n_points = len(re.findall(r'<circle class="pt"', dom)) + len(re.findall(r'<rect class="bar"', dom))
    n_figures = len(re.findall(r"<figure\b", dom))
    print(f"dom: {len(dom)} characters, figures: {n_figures}")
    print(f"svg elements: {n_svg}, data points: {n_points}")
    if dump.returncode != 0 or not dom.strip():
        print(f"FAIL: chromium exited {dump.returncode} with no DOM")
        ok = False
    if args.expect_svgs is not None and n_svg != args.expect_svgs:
        print(f"FAIL: expected {args.expect_svgs} svg elements")
        ok = False
    if n_svg != n_figures:
        print("FAIL: a figure without its chart (or the reverse)")
        ok = False
    remote = re.findall(r'(?:src|href)\s*=\s*["\']?\s*((?:https?:)?//[^"\'\s>]+)', dom, flags=re.I)
    print(f"remote references: {len(remote)}")
    if remote:
        print(f"FAIL: the page points outside itself: {', '.join(remote[:5])}")
        ok = False
    errors = [line for line in dump.stderr.splitlines() if PAGE_ERRORS.search(line)]
    print(f"console errors: {len(errors)}")
    for line in errors[:10]:
        print(f"  {line}")
    ok = ok and not errors

    if args.screenshot is not None:
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        scheme = ["--blink-settings=preferredColorScheme=0", "--force-dark-mode"] if args.dark else []
        shot = run([*scheme, f"--window-size={args.size}", f"--screenshot={args.screenshot.resolve()}", url])
        written = args.screenshot.is_file() and args.screenshot.stat().st_size > 0
        print(f"screenshot: {args.screenshot} ({'dark' if args.dark else 'light'})" if written else "FAIL: no screenshot")
        ok = ok and written and shot.returncode == 0
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
