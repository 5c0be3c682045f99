"""Sample diversity (ckptsel.diversity): one metric-table entry, and it reaches every output."""

from __future__ import annotations

import json
import math

import pytest

from ckptsel import diversity


def test_distinct_fraction_counts_normalised_solutions():
    assert diversity.distinct_fraction(["a b", "a  b ", "a b"]) == pytest.approx(1 / 3)  # whitespace does not count
    assert diversity.distinct_fraction(["x", "y", "z", "x"]) == pytest.approx(3 / 4)
    assert math.isnan(diversity.distinct_fraction(["only one"]))


def test_mean_edit_distance_is_zero_for_copies_and_grows_with_difference():
    assert diversity.mean_edit_distance(["12+3", "12+3"]) == 0.0
    # "abcd" vs "abcx": 1 edit in 4; each vs "wxyz": 4 in 4 -> mean (0.25 + 1 + 1) / 3
    assert diversity.mean_edit_distance(["abcd", "abcx", "wxyz"]) == pytest.approx(0.75)
    assert math.isnan(diversity.mean_edit_distance([]))


def test_diversity_appears_in_json_table_and_report(tiny_run, tmp_path):
    """Declared once in ckptsel.columns; rank --json, rank's table and the HTML report show it."""
    from click.testing import CliRunner

    from ckptsel.cli import main

    args = ["rank", str(tiny_run), "--data", str(tiny_run / "train.jsonl"), "--recipe", str(tiny_run / "recipe.yaml"),
            "--cache-dir", str(tmp_path / "cache"), "--max-examples", "4"]
    out = CliRunner().invoke(main, [*args, "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)["checkpoints"]
    values = [r["sample_diversity"] for r in rows]
    assert all(v is not None and 0.0 <= v <= 1.0 for v in values)
    assert all(1 / 5 - 1e-9 <= r["distinct_samples"] <= 1.0 for r in rows)  # k = 5 samples
    table = CliRunner().invoke(main, args)
    assert "sample diversity" in table.stdout and f"{values[0]:.3f}" in table.stdout
    (tmp_path / "ranking.json").write_text(out.stdout)
    report = CliRunner().invoke(main, ["report", str(tmp_path / "ranking.json"), "-o", str(tmp_path / "r.html")])
    assert report.exit_code == 0, report.output
    html = (tmp_path / "r.html").read_text()
    assert "sample diversity" in html and f"{values[0]:.3f}" in html
