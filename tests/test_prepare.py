"""One run preparation (ckptsel.prepare): the request's runs with their checked, rendered, selected rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptsel.errors import DataError


def _request(run: Path, cache: Path, **kw):
    from ckptsel.prepare import RankRequest
    from ckptsel.recipes import load_recipe

    return RankRequest(paths=(run,), recipe=load_recipe(str(run / "recipe.yaml")), data=run / "train.jsonl",
                       cache_dir=cache, **kw)


def test_prepare_gives_each_run_its_checked_subset_and_keeps_the_rendered_rows(tiny_run, tmp_path, monkeypatch):
    from ckptsel import tokenizers
    from ckptsel.prepare import ARCHITECTURE, CONTEXT, GRADER, prepare

    run = Path(tiny_run)
    (p,) = prepare(_request(run, tmp_path / "cache", max_examples=5))
    n_rows = len((run / "train.jsonl").read_text().splitlines())
    assert p.run.path == run and p.data == run / "train.jsonl" and p.offset == 0
    assert len(p.examples) == 5 and p.heldout == []
    assert p.rendered.n_rows == n_rows and {e.uid for e in p.examples} <= set(p.rendered.budgets)
    assert p.checks == (ARCHITECTURE, GRADER, CONTEXT)

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("the rendered rows are in the store: no tokenizer is loaded")

    monkeypatch.setattr(tokenizers, "load_tokenizer", no_tokenizer)
    (again,) = prepare(_request(run, tmp_path / "cache", max_examples=5))
    assert again.examples == p.examples and again.rendered == p.rendered


def test_prepare_refuses_a_row_longer_than_the_context(tiny_run, tmp_path):
    import dataclasses
    import json

    from ckptsel.prepare import prepare

    rows = [json.loads(line) for line in (Path(tiny_run) / "train.jsonl").read_text().splitlines()]
    rows[2] = {**rows[2], "question": "1+" * 400 + "1=?"}
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    request = _request(Path(tiny_run), tmp_path / "cache")
    with pytest.raises(DataError, match=r"long.jsonl:3: .* longer than the model's context"):
        prepare(dataclasses.replace(request, data=data))
    (p,) = prepare(dataclasses.replace(request, data=data, skip_bad=True))
    assert p.examples and all(e.index != 2 for e in p.examples)  # the long row dropped, with --skip-bad
