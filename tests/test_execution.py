"""Execution is a parameter (ckptsel.execution): the executor handed to the ranking pipeline and to
verify is the one that runs the measurement, one whose workers run elsewhere gives the in-process
results, and only the registry reads the engine's Ray setting."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

import ckptsel
from ckptsel.execution import InProcessExecutor, executor_for
from ckptsel.settings import EngineSettings


class CountingExecutor:
    """In this process, as the default, writing down what it is handed."""

    in_process = True
    slots = 1

    def __init__(self):
        self.maps: list[tuple[str, int]] = []  # (worker name, number of items) per map
        self.entered = 0

    def __enter__(self):
        self.entered += 1
        return self

    def __exit__(self, *exc) -> None:
        pass

    def map(self, fn, items, *args):
        items = list(items)
        self.maps.append((fn.__name__, len(items)))
        for position, item in enumerate(items):
            yield position, fn(item, *args)


class ElsewhereExecutor:
    """Workers "elsewhere", as Ray's: the worker, its items and arguments go through pickle, every
    item is submitted at once, and the results come back last item first."""

    in_process = False

    def __init__(self, slots: int):
        self.slots = slots
        self.maps: list[tuple[str, int]] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def map(self, fn, items, *args):
        fn, items, args = pickle.loads(pickle.dumps((fn, list(items), args)))
        self.maps.append((fn.__name__, len(items)))
        results = [pickle.loads(pickle.dumps(fn(item, *args))) for item in items]
        return ((position, results[position]) for position in reversed(range(len(items))))


def any_sample(text: str, reference: str) -> bool:
    """The alternative-solution grader of these tests: any sample that is not the target counts, so
    the first checkpoint's samples fix the set and the ``alt`` kind is measured."""
    return True


def _rank(run, cache, executor=None) -> tuple[dict, dict]:
    """The run's ranking JSON (without its cache counts) and the cache counts."""
    from ckptsel.pipeline import RankRequest, rank_runs
    from ckptsel.recipes import load_recipe, override

    recipe = override(load_recipe(run / "recipe.yaml"), sampling={"k": 2},
                      proxies={"alt_grader": f"python:{__name__}:any_sample", "alt_min_accuracy": 0.0})
    request = RankRequest(paths=(run,), recipe=recipe, data=run / "train.jsonl", max_examples=6,
                          engine=EngineSettings(device="cpu"), cache_dir=cache)
    out = rank_runs(request, executor=executor).to_json()
    return {k: v for k, v in out.items() if k != "cache"}, out["cache"]


@pytest.fixture(scope="module")
def reference(learning_run, tmp_path_factory):
    """The learning run ranked with the default executor (this process), the alternative NLL its proxy."""
    ranking, cache = _rank(learning_run, tmp_path_factory.mktemp("reference"))
    assert cache["measured"] == 4 and ranking["proxy"] == "alt_nll" and ranking["alt_coverage"] > 0
    return ranking


def test_an_executor_handed_to_the_pipeline_runs_the_measurement(learning_run, reference, tmp_path):
    executor = CountingExecutor()
    ranking, cache = _rank(learning_run, tmp_path, executor)
    assert executor.entered >= 1
    # One item per checkpoint, then each one's alternative NLL where it lacks it: the first checkpoint's
    # samples fixed the set, so every checkpoint measured it in its own load, and nothing is loaded twice.
    assert executor.maps == [("measure", 4), ("measure_alt", 4)]
    assert cache["measured"] == 4
    assert ranking == reference
    again = CountingExecutor()
    assert _rank(learning_run, tmp_path, again)[1]["measured"] == 0  # all stored: nothing loaded
    assert again.maps == [("measure", 4), ("measure_alt", 4)]


@pytest.mark.parametrize("slots", [1, 2])
def test_workers_elsewhere_give_the_in_process_ranking(learning_run, reference, tmp_path, slots):
    executor = ElsewhereExecutor(slots)
    ranking, cache = _rank(learning_run, tmp_path, executor)
    assert ranking == reference
    assert {name for name, _ in executor.maps} == {"measure_items"}
    if slots == 1:  # the first checkpoint alone, the rest with everything, then the first's alternative NLL
        assert executor.maps == [("measure_items", 1), ("measure_items", 3), ("measure_items", 1)]
    else:  # everything but the alternative NLL at once, harvested in training order, then that NLL
        assert executor.maps == [("measure_items", 4), ("measure_items", 0), ("measure_items", 4)]
    # A checkpoint loaded again for its alternative NLL is still one measured checkpoint (4 + 0 from the cache).
    assert cache == {"measured": 4, "from_cache": 0}
    rerun = ElsewhereExecutor(slots)
    assert _rank(learning_run, tmp_path, rerun)[1]["measured"] == 0
    assert all(n == 0 for _, n in rerun.maps)


def test_verify_runs_on_the_executor_it_is_given(tiny_run, tokenizer, tmp_path):
    from ckptsel.data import load_data
    from ckptsel.discover import discover
    from ckptsel.recipes import load_recipe, override
    from ckptsel.store import Store
    from ckptsel.verify import verify_file

    checkpoints = discover([tiny_run])
    recipe = override(load_recipe(tiny_run / "recipe.yaml"), sampling={"temperature": 0.0})
    examples = load_data(tiny_run / "test.jsonl", recipe, tokenizer=tokenizer).examples[:3]
    engine = EngineSettings(device="cpu", dtype="float32")
    results = {}
    for name, executor in [("here", CountingExecutor()), ("elsewhere", ElsewhereExecutor(2))]:
        with Store.open(tmp_path / name) as store:
            result = verify_file(checkpoints, examples, recipe, store, source="test", engine=engine,
                                 max_new_tokens=12, executor=executor)
            samples = [store.get_many(m.fingerprint, result.settings_key, "verify", [ex.uid for ex in examples])
                       for m in result.checkpoints]
        assert executor.maps == [("evaluate" if name == "here" else "evaluate_checkpoint", len(checkpoints))]
        assert all(m.error is None and m.n == len(examples) for m in result.checkpoints)
        results[name] = ([m.accuracy for m in result.checkpoints],
                         [[s[ex.uid].samples for ex in examples] for s in samples])
    assert results["here"] == results["elsewhere"]


def test_the_engine_settings_choose_the_executor_in_one_place():
    from ckptsel.execution.ray import RayExecutor

    assert isinstance(executor_for(EngineSettings()), InProcessExecutor)
    ray = executor_for(EngineSettings(ray="auto", ray_cpus=3))  # nothing started before it is entered
    assert isinstance(ray, RayExecutor) and (ray.address, ray.cpus, ray.in_process) == ("auto", 3, False)
    package = Path(ckptsel.__file__).parent
    readers = sorted(str(path.relative_to(package)) for path in package.rglob("*.py")
                     if any(isinstance(node, ast.Attribute) and node.attr in ("ray", "ray_cpus")
                            for node in ast.walk(ast.parse(path.read_text()))))
    assert readers == ["execution/__init__.py"]


def test_the_in_process_executor_runs_each_item_when_asked():
    ran = []
    results = InProcessExecutor().map(lambda item, offset: ran.append(item) or item + offset, [1, 2, 3], 10)
    assert ran == []
    assert next(results) == (0, 11) and ran == [1]  # the caller acts on one result before the next item runs
    assert list(results) == [(1, 12), (2, 13)] and ran == [1, 2, 3]
