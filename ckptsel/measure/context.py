"""What every measurement kind may use beside the loaded model (ckptsel.kinds)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptsel.settings import EngineSettings, ProxySettings

if TYPE_CHECKING:
    from ckptsel.graders.base import Grader
    from ckptsel.measure.protocols import Sampler


@dataclass
class MeasureContext:
    """The settings, the grader, the sampling budgets (uid -> max new tokens), the vLLM sampler
    (``--backend vllm``; a :class:`ckptsel.measure.vllm_backend.VllmSampler`) and the run's
    alternative-solution harvest (a :class:`ckptsel.proxies.Harvest`, read by the ``alt`` kind).

    The harvest is typed loosely so that ``ckptsel.measure`` stays below the proxies that use it
    (ckptsel/DESIGN.md, "Layers").
    """

    engine: EngineSettings
    grader: Grader
    proxies: ProxySettings
    budgets: dict[str, int]
    vllm: Sampler | None = None  # --backend vllm; else measure.sampling.TransformersSampler
    harvest: object | None = None
