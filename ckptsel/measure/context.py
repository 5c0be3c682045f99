"""What every measurement kind may use beside the loaded model (ckptsel.kinds)."""

from __future__ import annotations

from dataclasses import dataclass

from ckptsel.settings import EngineSettings, ProxySettings


@dataclass
class MeasureContext:
    """The settings, the grader, the sampling budgets (uid -> max new tokens), the vLLM sampler
    (``--backend vllm``; a :class:`ckptsel.measure.vllm_backend.VllmSampler`) and the run's
    alternative-solution harvest (a :class:`ckptsel.proxies.Harvest`, read by the ``alt`` kind).

    The sampler and the harvest are typed loosely so that ``ckptsel.measure`` stays below the
    proxies that use it (ckptsel/DESIGN.md, "Layers").
    """

    engine: EngineSettings
    grader: object
    proxies: ProxySettings
    budgets: dict[str, int]
    vllm: object | None = None
    harvest: object | None = None
