"""Loader and Sampler (ckptsel.measure.protocols): every implementation says so, and the default sampler is the
seeded decoding measurement always used."""

from __future__ import annotations

from ckptsel.measure.protocols import LoadedCheckpoint, Loader, Sampler
from ckptsel.settings import EngineSettings, SamplingSettings


def test_each_loader_and_sampler_declares_its_protocol():
    from ckptsel.collect import _LazyLoader
    from ckptsel.integrations.transformers import _InMemoryLoader
    from ckptsel.measure.loading import CheckpointLoader
    from ckptsel.measure.loading import LoadedCheckpoint as from_loading
    from ckptsel.measure.sampling import TransformersSampler
    from ckptsel.measure.vllm_backend import VllmSampler

    assert all(Loader in cls.__mro__ for cls in (CheckpointLoader, _LazyLoader, _InMemoryLoader))
    assert all(Sampler in cls.__mro__ for cls in (TransformersSampler, VllmSampler))
    loaders = [CheckpointLoader("cpu", "float32"), _LazyLoader(EngineSettings()),
               _InMemoryLoader(None, None, None, EngineSettings())]
    assert all(isinstance(loader, Loader) and loader.base_loads == 0 for loader in loaders)
    assert isinstance(TransformersSampler(), Sampler) and not isinstance(object(), Sampler)
    assert from_loading is LoadedCheckpoint  # one (model, tokenizer) type, however it was loaded


def test_the_transformers_sampler_is_the_seeded_decoding(model, tokenizer):
    from ckptsel.measure.sampling import TransformersSampler, sample_completions

    prompts, keys = ["What is 2+3?\n", "Compute 7*6.\n", "Hi\n"], ["a", "b", "c"]
    settings = SamplingSettings(k=2, temperature=0.8, top_p=0.95, seed=3)
    got = TransformersSampler(batch_size=2).sample(model, tokenizer, prompts, sampling=settings,
                                                   max_new_tokens=[12, 8, 4], keys=keys)
    assert got == sample_completions(model, tokenizer, prompts, sampling=settings, max_new_tokens=[12, 8, 4],
                                     keys=keys)
    assert [len(g) for g in got] == [2, 2, 2] and got[0][0] != got[0][1]


def test_collect_without_a_loader_imports_no_torch():
    """The lazy loader is the default: measuring nothing (everything stored) loads nothing."""
    import subprocess
    import sys

    code = ("import sys\nfrom ckptsel.collect import _LazyLoader\nfrom ckptsel.settings import EngineSettings\n"
            "assert _LazyLoader(EngineSettings()).base_loads == 0\nprint('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
