"""The metric table (ckptsel.columns): every per-checkpoint number declared once, and read from there."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ckptsel import columns
from ckptsel.columns import BY_KEY, COLUMNS, MEASURES, Inputs, compute_columns, table_columns
from ckptsel.select import CheckpointMetrics


def _inputs(c: int = 3, n: int = 4) -> Inputs:
    rng = np.random.default_rng(0)
    m = {measure.name: rng.uniform(0.01, 1.0, (c, 2 if measure.heldout else n)) for measure in MEASURES}
    memorised = m["nll"] < 0.3
    return Inputs(m, memorised, np.ones((c, n), bool), 0.1)


def test_keys_are_unique_and_every_band_names_a_column():
    assert len({c.key for c in COLUMNS}) == len(COLUMNS)
    for c in COLUMNS:
        assert c.show in ("always", "measured", "json") and c.cell.split(":")[0] in ("value", "ci", "band")
        if (partner := columns.band_partner(c)) is not None:
            assert partner in BY_KEY and BY_KEY[partner].show == "json"  # shown in the band's cell only


def test_every_computed_column_gives_one_value_per_checkpoint():
    out = compute_columns(_inputs())
    assert set(out) == {c.key for c in COLUMNS if c.compute is not None}
    assert all(v.shape == (3,) for v in out.values())
    assert not math.isnan(out["heldout_nll"][0])  # held-out measures have their own width


def test_the_table_shows_always_columns_and_measured_ones_with_a_value():
    shown = [c.key for c in table_columns(lambda key: key == "heldout_nll")]
    assert "heldout_nll" in shown and "train_acc" in shown and "premem_nu_low" not in shown
    assert "proxy_ratio" not in [c.key for c in table_columns(lambda key: True)]  # JSON only


def test_a_ranking_row_reads_columns_as_attributes_and_writes_every_key_to_json():
    row = CheckpointMetrics(index=0, path="p", step=1, epoch=None, train_loss=None, fingerprint="f",
                            values={"premem_acc": 0.5})
    assert row.premem_acc == 0.5 and math.isnan(row.alt_nll)
    with pytest.raises(AttributeError):
        row.not_a_column  # noqa: B018
    out = row.row_json(moe=False)
    assert {c.key for c in COLUMNS} <= set(out) and out["premem_acc"] == 0.5 and out["alt_nll"] is None
    assert "values" not in out and "pathways" not in out
