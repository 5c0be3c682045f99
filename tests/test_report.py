"""ckptsel report: a self-contained page whose plots encode the ranking's numbers; the CLI; the browser check."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptsel.cli import main
from ckptsel.report import build_inputs, render_report, write_report
from ckptsel.report.charts import build_charts, stage_bands
from ckptsel.report.svg import nice_step, ticks
from ckptsel.select import Ranking
from ckptsel.stages import Flag

STEPS = [100, 200, 300, 400, 500]
PM = [0.12, 0.31, 0.45, 0.52, 0.50]


def rank_json(**extra_columns) -> dict:
    """A hand-made `ckptsel rank --json` result: five checkpoints, the last one over-memorized."""
    rows = []
    for j, (step, pm) in enumerate(zip(STEPS, PM)):
        row = {"index": j, "path": f"/runs/r/checkpoint-{step}", "step": step, "epoch": j + 1.0, "train_loss": 1 - 0.1 * j,
               "fingerprint": f"fp{j}", "train_acc": 0.2 * (j + 1), "premem_acc": pm, "premem_ci": [pm - 0.04, pm + 0.05],
               "memorized_frac": 0.2 * j, "copy_rate": 0.1 * j, "target_nll": 1.0 / (j + 1), "entropy": 0.5,
               "stage": ["underfit", "generalizing", "generalizing", "generalizing", "over-memorized"][j],
               "flag": Flag(1.0, 1.0, 0.05, 0.8, 0.5, "alt_nll", 1.2, 0.8, 1.5, 0.25).to_json() if j == 4 else None,
               "error": None}
        for key, values in extra_columns.items():
            row[key] = values[j]
        rows.append(row)
    return {"checkpoints": rows, "recommended": {"index": 3, "path": rows[3]["path"], "step": 400},
            "rule": "highest pre-memorization accuracy among unflagged checkpoints", "stage_rule": "a stage rule",
            "threshold": {"rule": "nll", "used": 0.1}, "n_examples": 200, "warnings": ["few checkpoints"]}


def ranking(**extra_columns) -> Ranking:
    """The same, read back as the report takes it."""
    return Ranking.from_json(rank_json(**extra_columns))


def svgs(html: str) -> dict[str, str]:
    return dict(re.findall(r'<svg class="chart" id="svg-([^"]+)"(.*?)</svg>', html, flags=re.S))


def points(svg: str, series: str) -> list[tuple[float, float]]:
    """(cx, cy) of one series' data points."""
    group = re.search(rf'<g class="series [^"]*" data-series="{re.escape(series)}">(.*?)</g>', svg, flags=re.S).group(1)
    return [(float(x), float(y)) for x, y in re.findall(r'<circle class="pt" cx="([-\d.]+)" cy="([-\d.]+)"', group)]


def frame(svg: str):
    plot = [float(v) for v in re.search(r'data-plot="([^"]+)"', svg).group(1).split(",")]
    xd = [float(v) for v in re.search(r'data-x-domain="([^"]+)"', svg).group(1).split(",")]
    yd = [float(v) for v in re.search(r'data-y-domain="([^"]+)"', svg).group(1).split(",")]
    return plot, xd, yd


# --------------------------------------------------------------------------- pure helpers


def test_ticks_are_round_and_inside():
    assert nice_step(1.0) == 0.2
    assert nice_step(470) == 100
    assert ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert ticks(87, 513, target=7) == [100, 200, 300, 400, 500]


def test_label_boxes_overlap_only_when_they_share_area():
    from ckptsel.report.svg import overlaps

    assert overlaps((0, 0, 10, 10), (5, 5, 15, 15))
    assert not overlaps((0, 0, 10, 10), (10, 0, 20, 10))  # touching edges leave both labels readable
    assert not overlaps((0, 0, 10, 10), (0, 11, 10, 20))


def test_stage_bands_merge_runs_and_split_halfway():
    bands = stage_bands([100, 200, 300, 400], ["underfit", "generalizing", "generalizing", "over-memorized"])
    assert bands == [(100, 150, "underfit"), (150, 350, "generalizing"), (350, 400, "over-memorized")]


# --------------------------------------------------------------------------- the page


def test_page_is_self_contained_with_one_svg_per_plot():
    html = render_report(ranking())
    assert not re.search(r'(?:src|href)\s*=\s*["\']?\s*(?:https?:)?//', html, flags=re.I)
    assert "http://" not in html and "https://" not in html and "<script" not in html and "@import" not in html
    charts = build_charts(build_inputs(ranking()))
    assert [c.id for c in charts] == ["accuracy", "memorisation", "perplexity"]
    assert html.count("<svg") == len(charts) == html.count("<figure")
    assert "★ Recommended: checkpoint-400 (step 400)" in html
    assert "Over-memorized: checkpoint-500" in html and "few checkpoints" in html


def test_point_positions_encode_the_ranking_values():
    html = render_report(ranking())
    svg = svgs(html)["accuracy"]
    (left, top, right, bottom), (x0, x1), (y0, y1) = frame(svg)
    assert (y0, y1) == (0.0, 1.0)  # accuracies on a fixed 0..1 axis
    found = points(svg, "pre-memorization accuracy (predicted test)")
    assert len(found) == len(PM)
    for (cx, cy), step, pm in zip(found, STEPS, PM):
        assert x0 + (cx - left) / (right - left) * (x1 - x0) == pytest.approx(step, abs=0.05)
        assert y0 + (bottom - cy) / (bottom - top) * (y1 - y0) == pytest.approx(pm, abs=1e-3)
    # the recommended checkpoint's marker sits at step 400
    marker_x = float(re.search(r'<g class="marker[^"]*"><line x1="([\d.]+)"', svg).group(1))
    assert x0 + (marker_x - left) / (right - left) * (x1 - x0) == pytest.approx(400, abs=0.05)
    # the stage band behind the over-memorized checkpoint starts halfway between 400 and 500
    band_x = float(re.search(r'<rect class="band band-over-memorized" x="([\d.]+)"', svg).group(1))
    assert x0 + (band_x - left) / (right - left) * (x1 - x0) == pytest.approx(450, abs=0.05)


def test_optional_plots_appear_with_their_numbers():
    # MoE pathway metrics nested per row, as Ranking.to_json writes them
    extra = ranking(alt_nll=[1.0, 0.9, 0.8, 0.85, 1.2], perturb_gap=[0.1, 0.2, 0.3, 0.5, 0.9],
                    pathways=[{"distance": d, "consistency": 1 - c, "complexity": c, "distance_exact": j != 4,
                               "distance_stderr": 0.0 if j != 4 else 0.031, "n_examples": 10, "n_compared": 10,
                               "n_unique": 8, "mean_length": 4.0, "per_layer": {}}
                              for j, (d, c) in enumerate(zip([9.0, 7.0, 5.0, 4.0, 4.5], [0.37, 0.3, 0.2, 0.1, 0.1]))])
    verification = {"source": "test.jsonl", "mode": "greedy",
                    "checkpoints": [{"fingerprint": f"fp{j}", "accuracy": PM[j] + 0.02, "ci": [PM[j] - 0.05, PM[j] + 0.07]}
                                    for j in range(5)]}
    truth = {"checkpoints": {str(s): {"step": s, "test_accuracy": 0.1 * j, "test_nll": 1.0} for j, s in enumerate(STEPS)}}
    merge = {"name": "recommend", "rule": "the lowest alt_nll",
             "rows": [{"candidate": "step 400", "premem_acc": 0.52, "alt_nll": 0.61},
                      {"candidate": "½ step 300 + ½ step 400", "premem_acc": 0.55, "alt_nll": 0.47, "chosen": True}]}
    html = render_report(extra, verification={"verifications": [verification]}, ground_truth=truth, merges=[merge])
    found = svgs(html)
    assert set(found) == {"accuracy", "memorisation", "perplexity", "perturbation", "pathway-distance",
                          "pathway-complexity", "predicted-vs-measured", "merge-recommend"}
    assert html.count("<svg") == 8
    assert "<th>pathway distance</th>" in html and "<td class=\"num\">0.370</td>" in html  # complexity, step 100
    # an estimated distance (sampled pairs) carries its standard error; exact ones do not
    assert ">4.500 ± 0.031</td>" in html and html.count(" ± ") == 1
    # scatter: x is the prediction, y the measurement, on one shared domain
    (left, top, right, bottom), (x0, x1), (y0, y1) = frame(found["predicted-vs-measured"])
    scatter = points(found["predicted-vs-measured"], "ckptsel verify (test.jsonl)")
    for (cx, cy), pm in zip(scatter, PM):
        assert x0 + (cx - left) / (right - left) * (x1 - x0) == pytest.approx(pm, abs=1e-3)
        assert y0 + (bottom - cy) / (bottom - top) * (y1 - y0) == pytest.approx(pm + 0.02, abs=1e-3)
    # measured = predicted + 0.02: Σ(y - x)² = 5 × 0.0004, Σ(y - ȳ)² = 0.1114
    assert f"R² (identity) {1 - 0.002 / 0.1114:.2f}, R² (fitted) 1.00, Spearman 1.00" in html
    # pathway distance: y domain padded around 4..9, point 0 at 9.0
    (left, top, right, bottom), _, (y0, y1) = frame(found["pathway-distance"])
    cx, cy = points(found["pathway-distance"], "pathway distance")[0]
    assert y0 + (bottom - cy) / (bottom - top) * (y1 - y0) == pytest.approx(9.0, abs=1e-2)
    # the comparison table: the chosen candidate starred, the deciding proxy, the rule
    assert "<td>★ ½ step 300 + ½ step 400</td>" in html and '<td class="num">0.470</td>' in html
    assert "<b>Rule:</b> the lowest alt_nll." in html
    bars = re.findall(r'<rect class="bar"[^>]*data-y="([\d.]+)"', found["merge-recommend"])
    assert [float(b) for b in bars] == [0.52, 0.55]


def test_measured_accuracy_comes_from_the_store(tmp_path):
    from ckptsel.store import Store
    from ckptsel.verify.run import Measured, Verification, save_summary

    with Store.open(tmp_path) as store:
        v = Verification("held.jsonl", "gsm8k", "greedy", "key1", 10, 20, [])
        save_summary(store, Measured(1, "/runs/r/checkpoint-200", 200, "fp1", accuracy=0.4, ci=(0.2, 0.6), n=10), v)
        inputs = build_inputs(ranking(), store=store)
    assert inputs.measured == {1: {"accuracy": 0.4, "ci": [0.2, 0.6], "source": "held.jsonl", "mode": "greedy"}}


def test_write_report_and_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    out = write_report(ranking(), tmp_path / "r" / "report.html", png_dir=tmp_path / "png")
    assert out.read_text().startswith("<!DOCTYPE html>")
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert pngs == ["accuracy.png", "memorisation.png", "perplexity.png"]
    assert (tmp_path / "png" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["report.html"]  # no temp file left


def test_cli_report_from_rank_json(tmp_path):
    (tmp_path / "rank.json").write_text(json.dumps(rank_json()))
    result = CliRunner().invoke(main, ["report", str(tmp_path / "rank.json"), "-o", str(tmp_path / "out.html"),
                                       "--cache-dir", str(tmp_path / "cache"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"report": str(tmp_path / "out.html"), "png": []}
    assert (tmp_path / "out.html").read_text().count("<svg") == 3


def test_cli_report_bad_ranking_file_is_one_line(tmp_path):
    (tmp_path / "rank.json").write_text("{not json")
    result = CliRunner().invoke(main, ["report", str(tmp_path / "rank.json"), "-o", str(tmp_path / "out.html")])
    assert result.exit_code == 2
    assert "rank.json: line 1: not valid JSON" in result.output and "Traceback" not in result.output


def test_cli_report_names_the_bad_field_of_a_ranking_file(tmp_path):
    data = rank_json()
    data["checkpoints"][2]["premem_acc"] = "high"
    (tmp_path / "rank.json").write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["report", str(tmp_path / "rank.json"), "-o", str(tmp_path / "out.html")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "rank.json: checkpoints[2].premem_acc: expected a number, got 'high'" in " ".join(result.output.split())
    assert not (tmp_path / "out.html").exists()


@pytest.mark.slow
def test_cli_report_on_a_lab_run(tmp_path):
    """A run folder: data, recipe and ground truth found beside the checkpoints; ranked through the cache."""
    from ckptsel.lab.quick import train_tiny_run

    run = train_tiny_run(tmp_path / "run", n_train=32, n_test=8, epochs=1, n_checkpoints=2, ground_truth=True)
    args = ["report", str(run), "-o", str(tmp_path / "report.html"), "--cache-dir", str(tmp_path / "cache"),
            "--device", "cpu", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    html = (tmp_path / "report.html").read_text()
    assert "held-out accuracy (lab ground truth)" in html and "lab ground truth: " in html
    assert "★ Recommended: checkpoint-" in html


# --------------------------------------------------------------------------- a real browser


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    page = tmp_path / "report.html"
    truth = {"checkpoints": {str(s): {"step": s, "test_accuracy": p - 0.03} for s, p in zip(STEPS, PM)}}
    write_report(ranking(), page, ground_truth=truth)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "report_browser_check.py"
    done = subprocess.run([sys.executable, str(script), str(page), "--expect-svgs", "4",
                           "--screenshot", str(tmp_path / "shot.png")], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "svg elements: 4" in done.stdout and "console errors: 0" in done.stdout
    assert (tmp_path / "shot.png").read_bytes()[:4] == b"\x89PNG"


def test_example_groups_follow_pre_memorization_credit():
    from ckptsel.report.html import example_groups

    groups = example_groups(premem=[0.6, 0.0, 0.4, 0.0], acc=[1.0, 1.0, 0.8, 0.0],
                            memorised_so_far=[True, True, False, True])
    assert groups == ["learned before memorising", "only by copying", "solved, not memorised", "not solved"]


def test_report_of_a_run_folder_shows_which_examples_were_learned_before_memorising(learning_run, tmp_path):
    import re

    page = tmp_path / "r.html"
    result = CliRunner().invoke(main, ["report", str(learning_run), "--data", str(learning_run / "train.jsonl"),
                                       "--max-examples", "8", "-k", "3", "--cache-dir", str(tmp_path / "cache"),
                                       "--quiet", "-o", str(page)])
    assert result.exit_code == 0, result.output
    html = page.read_text()
    assert "<h2>Examples at checkpoint-" in html and "only by copying" in html
    section = html[html.index("<h2>Examples at"):]
    counts = [int(c) for c in re.findall(r'<td class="num">(\d+)</td>', section[: section.index("</table>")])]
    assert len(counts) == 4 and sum(counts) == 8  # every measured example in exactly one group
