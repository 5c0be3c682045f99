"""The optional vLLM sampling backend, against a fake ``vllm`` module (vLLM is not installed here).

The fake records what ckptsel asks of it (engine options, per-request sampling parameters,
prompt token ids, LoRA requests) and answers every sample with "#### <seed mod 7 + sample index>"
followed by EOS, so the decoded texts are known.
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
import weakref
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from ckptsel.cli import main
from ckptsel.discover import Checkpoint
from ckptsel.errors import CkptselError
from ckptsel.formats import PEFT_ADAPTER, SAFETENSORS
from ckptsel.measure.sampling import sample_seed
from ckptsel.settings import EngineSettings, SamplingSettings

pytestmark = pytest.mark.filterwarnings("ignore")


@dataclass
class _Completion:
    token_ids: list[int]


@dataclass
class _RequestOutput:
    outputs: list[_Completion]


class FakeVllm:
    """The parts of vLLM's public API ckptsel uses, recording their arguments."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.engines: list[dict] = []  # LLM(**options), in order
        self.alive_at_start: list[int] = []  # engines still referenced when each new one started
        self.calls: list[tuple[list, list, object]] = []  # generate(prompts, params, lora_request)
        self._refs: list[weakref.ref] = []
        fake = self

        class LLM:
            def __init__(self, **options):
                fake.alive_at_start.append(sum(ref() is not None for ref in fake._refs))
                fake.engines.append(options)
                fake._refs.append(weakref.ref(self))

            def generate(self, prompts, params, use_tqdm=True, lora_request=None):
                fake.calls.append((prompts, params, lora_request))
                return [_RequestOutput([fake.completion(p, j) for j in range(p.n)]) for p in params]

        class SamplingParams:
            def __init__(self, **kwargs):
                self.__dict__.update(kwargs)

        class LoRARequest:
            def __init__(self, name, int_id, path):
                self.name, self.int_id, self.path = name, int_id, path

        self.module = types.ModuleType("vllm")
        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams
        self.lora = types.ModuleType("vllm.lora")
        self.request = types.ModuleType("vllm.lora.request")
        self.request.LoRARequest = LoRARequest
        self.module.lora = self.lora
        self.lora.request = self.request

    def completion(self, params, j: int) -> _Completion:
        ids = self.tokenizer(self.text(params.seed, j), add_special_tokens=False)["input_ids"]
        return _Completion(ids + [self.tokenizer.eos_token_id])

    @staticmethod
    def text(seed, j: int) -> str:
        return f"#### {(seed or 0) % 7 + j}"


@pytest.fixture
def fake_vllm(monkeypatch, tokenizer):
    fake = FakeVllm(tokenizer)
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    monkeypatch.setitem(sys.modules, "vllm.lora", fake.lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", fake.request)
    return fake


def _full(path) -> Checkpoint:
    return Checkpoint(path=path, format=SAFETENSORS)


def _adapter(path, base="/models/base", rank=4) -> Checkpoint:
    return Checkpoint(path=path, format=PEFT_ADAPTER, base_model=base, lora_rank=rank)


def _sample(sampler, tokenizer, prompts, sampling, budgets=None, keys=None):
    keys = keys or [f"uid{i}" for i in range(len(prompts))]
    budgets = budgets or [16] * len(prompts)
    return sampler.sample(None, tokenizer, prompts, sampling=sampling, max_new_tokens=budgets, keys=keys)


def test_one_request_per_prompt_with_k_samples_its_seed_and_its_budget(fake_vllm, tokenizer, tmp_path):
    from ckptsel.measure.vllm_backend import VllmSampler

    sampling = SamplingSettings(k=3, temperature=0.7, top_p=0.9, seed=5)
    prompts, keys = ["1 + 2 =\n", "10 + 20 =\n"], ["a", "b"]
    with VllmSampler(EngineSettings(device="cpu", dtype="float32", backend="vllm")) as sampler:
        sampler.use(_full(tmp_path / "checkpoint-2"))
        out = _sample(sampler, tokenizer, prompts, sampling, budgets=[11, 29], keys=keys)

    (engine,) = fake_vllm.engines
    assert engine["model"] == str(tmp_path / "checkpoint-2") and engine["dtype"] == "float32" and engine["seed"] == 5
    assert "enable_lora" not in engine
    (call,) = fake_vllm.calls
    sent, params, lora = call
    assert lora is None
    assert [p["prompt_token_ids"] for p in sent] == tokenizer(prompts, add_special_tokens=True)["input_ids"]
    assert [p.n for p in params] == [3, 3]
    assert [p.seed for p in params] == [sample_seed(5, "a", 0), sample_seed(5, "b", 0)]
    assert [p.max_tokens for p in params] == [11, 29]
    assert {(p.temperature, p.top_p) for p in params} == {(0.7, 0.9)}
    assert all(tokenizer.eos_token_id in p.stop_token_ids for p in params)
    # Decoded by ckptsel's tokenizer, EOS dropped, in sample order.
    assert out == [[FakeVllm.text(p.seed, j) for j in range(3)] for p in params]


def test_greedy_is_one_unseeded_completion_per_prompt(fake_vllm, tokenizer, tmp_path):
    from ckptsel.measure.vllm_backend import VllmSampler

    with VllmSampler(EngineSettings(backend="vllm")) as sampler:
        sampler.use(_full(tmp_path))
        out = _sample(sampler, tokenizer, ["1 + 1 =\n", "2 + 2 =\n"], SamplingSettings(k=5, temperature=0.0))
    params = fake_vllm.calls[0][1]
    assert [(p.n, p.seed, p.temperature) for p in params] == [(1, None, 0.0)] * 2
    assert [len(samples) for samples in out] == [1, 1]


def test_adapters_of_one_base_share_an_engine_with_distinct_lora_ids(fake_vllm, tokenizer, tmp_path):
    from ckptsel.measure.vllm_backend import VllmSampler

    sampling = SamplingSettings(k=2)
    adapters = [_adapter(tmp_path / f"checkpoint-{s}") for s in (2, 4, 6)]
    with VllmSampler(EngineSettings(backend="vllm")) as sampler:
        for ckpt in [*adapters, adapters[0]]:  # the first again: its id is kept
            sampler.use(ckpt)
            _sample(sampler, tokenizer, ["1 + 1 =\n"], sampling)
            _sample(sampler, tokenizer, ["2 + 2 =\n"], sampling)  # a second chunk, same adapter
        sampler.use(_adapter(tmp_path / "wide", rank=16))  # needs a larger max_lora_rank: a new engine
        _sample(sampler, tokenizer, ["1 + 1 =\n"], sampling)

    assert [(e["model"], e["enable_lora"], e["max_lora_rank"]) for e in fake_vllm.engines] == [
        ("/models/base", True, 8), ("/models/base", True, 16)
    ]
    requests = [call[2] for call in fake_vllm.calls]
    assert [r.int_id for r in requests] == [1, 1, 2, 2, 3, 3, 1, 1, 4]
    assert [r.path for r in requests[:8:2]] == [str(c.path) for c in [*adapters, adapters[0]]]
    assert len({r.name for r in requests}) == 4


def test_each_full_checkpoint_gets_a_new_engine_after_the_last_is_freed(fake_vllm, tokenizer, tmp_path):
    from ckptsel.measure.vllm_backend import VllmSampler

    paths = [tmp_path / f"checkpoint-{s}" for s in (2, 4, 6)]
    with VllmSampler(EngineSettings(backend="vllm")) as sampler:
        for path in paths:
            sampler.use(_full(path))
            _sample(sampler, tokenizer, ["1 + 1 =\n"], SamplingSettings(k=2))
            _sample(sampler, tokenizer, ["2 + 2 =\n"], SamplingSettings(k=2))
        assert sampler.engines_built == 3
        sampler.use(_adapter(tmp_path / "adapter"))  # a different model: the engine goes at once
        assert fake_vllm._refs[-1]() is None
    assert [e["model"] for e in fake_vllm.engines] == [str(p) for p in paths]
    assert fake_vllm.alive_at_start == [0, 0, 0]


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from ckptsel.lab.quick import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("lab") / "run", n_checkpoints=2)


def _rank_args(run, cache, *extra):
    return [
        "rank", str(run), "--data", str(run / "train.jsonl"), "--recipe", str(run / "recipe.yaml"),
        "--cache-dir", str(cache), "--max-examples", "4", "-k", "2", "--quiet", "--json", *extra,
    ]


def test_rank_with_backend_vllm_stores_under_its_own_key(fake_vllm, tiny_run, tmp_path):
    from ckptsel.collect import settings_key
    from ckptsel.recipes import load_recipe, override
    from ckptsel.store import Store

    result = CliRunner().invoke(main, _rank_args(tiny_run, tmp_path, "--backend", "vllm"), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    recipe = override(load_recipe(str(tiny_run / "recipe.yaml")), sampling={"k": 2})
    assert out["settings_key"] == settings_key(recipe, EngineSettings(backend="vllm"))
    assert out["settings_key"] != settings_key(recipe, EngineSettings())
    checkpoints = [r["path"] for r in out["checkpoints"]]
    assert [e["model"] for e in fake_vllm.engines] == checkpoints  # one engine per full checkpoint
    assert fake_vllm.alive_at_start == [0] * len(checkpoints)
    params = [p for call in fake_vllm.calls for p in call[1]]
    assert len(params) == 4 * len(checkpoints) and {p.n for p in params} == {2}

    uids = _uids(tiny_run, 4)
    with Store.open(tmp_path) as store:
        records = store.get_many(out["checkpoints"][0]["fingerprint"], out["settings_key"], "sample", uids)
    assert {uid: records[uid].samples for uid in uids} == {
        uid: tuple(FakeVllm.text(sample_seed(0, uid, 0), j) for j in range(2)) for uid in uids
    }


def _uids(run, n):
    from ckptsel.collect import select_examples
    from ckptsel.data import load_examples
    from ckptsel.recipes import load_recipe
    from ckptsel.settings import SelectionSettings

    examples = load_examples(run / "train.jsonl", load_recipe(str(run / "recipe.yaml")))
    return [ex.uid for ex in select_examples(examples, SelectionSettings(max_examples=n))]


def test_hf_keys_are_unchanged_by_the_backend_setting():
    from ckptsel.collect import PER_EXAMPLE_BUDGET, settings_key
    from ckptsel.settings import Recipe

    recipe = Recipe()
    payload = {"recipe": recipe.measurement_key(), "dtype": "float32", "max_new_tokens": PER_EXAMPLE_BUDGET}
    before = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    assert settings_key(recipe, EngineSettings(device="cpu")) == before
    assert settings_key(recipe, EngineSettings(device="cpu", backend="vllm")) != before


def test_backend_vllm_without_vllm_is_one_line_exit_2(monkeypatch, tiny_run, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    result = CliRunner().invoke(main, _rank_args(tiny_run, tmp_path, "--backend", "vllm"))
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert "vllm is not installed" in message and "Traceback" not in message
    assert len(message.splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing measured, no store created

    from ckptsel.measure.vllm_backend import VllmSampler

    with pytest.raises(CkptselError, match="vllm is not installed"):
        VllmSampler(EngineSettings(backend="vllm"))  # the library path says the same
