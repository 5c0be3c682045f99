"""Typed settings, validated once, in one place.

A recipe (``recipes/*.yaml``) is validated into :class:`Recipe`. The parts of it that
change a measurement are hashed into the result-store key (:meth:`Recipe.measurement_key`),
so changing a template or the sampling temperature never reuses stale results.
All models are frozen: a settings object is a value.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataSettings(_Frozen):
    """How a training row becomes (prompt, target) text, exactly as in training."""

    question_field: str | None = Field(
        None, description="Field holding the question; detected when None (question/problem/prompt/instruction/input/query)."
    )
    answer_field: str | None = Field(
        None, description="Field holding the target solution; detected when None (answer/solution/response/output/completion)."
    )
    prompt_template: str = Field(
        "{question}\n",
        description="Prompt text; placeholders are field names, plus {question} and {answer} for the detected fields.",
    )
    target_template: str = Field("{answer}", description="Target text; same placeholders as the prompt template.")
    chat_template: bool = Field(False, description="Render with the tokenizer's chat template instead of the templates.")
    system_prompt: str | None = Field(None, description="System message when rendering with the chat template.")
    append_eos: bool = Field(True, description="The target ends with the tokenizer's EOS token, as SFT trainers do.")
    grader: str = Field("gsm8k", description="Grader name from ckptsel.graders (e.g. gsm8k, math, number, exact, regex:<p>).")


class SamplingSettings(_Frozen):
    """Sampling for train accuracy (Kang et al. defaults: k=5, T=0.8, top-p=0.95)."""

    k: int = Field(5, ge=1, description="Samples per question.")
    temperature: float = Field(0.8, ge=0.0, description="0 means greedy (then k is forced to 1).")
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_new_tokens: int | None = Field(
        None, ge=1, description="Generation budget; None = derived from the longest target (x1.5 + 16)."
    )
    seed: int = Field(0, description="Base seed; each (example, sample) pair gets its own derived seed.")


PEAK_NLL_THRESHOLD = 1.0  # the peak-nll rule's nu when none is given (chosen on the lab's main grid)


def default_threshold(rule: str) -> float:
    """nu when a recipe gives none, on the scale of ``rule``'s measure."""
    return PEAK_NLL_THRESHOLD if rule == "peak-nll" else MemorizationSettings.model_fields["threshold"].default


class MemorizationSettings(_Frozen):
    """When an example counts as memorised (ckptsel/DESIGN.md, "Memorised": mean target NLL per token
    below nu, the costliest target token's NLL below nu, or copy rate >= 1/2)."""

    rule: Literal["nll", "peak-nll", "copy"] = Field(
        "nll", description="nll: the target's mean NLL per token below threshold (Kang et al.); peak-nll: every "
        "target token's NLL below threshold (its costliest token; default threshold 1.0); copy: samples copy the target.")
    threshold: float | Literal["auto"] = Field(
        0.100,
        description="nu in nats/token (GSM8K 0.100 = e^-2.3, MATH 0.183 = e^-1.7), or 'auto' to calibrate from copy rates.",
    )
    copy_fraction: float = Field(0.5, gt=0.0, le=1.0, description="Copy-rate level that counts as memorised.")

    @field_validator("threshold")
    @classmethod
    def _positive(cls, v):
        if v != "auto" and not v > 0:
            raise ValueError("threshold must be a positive number of nats per token, or 'auto'")
        return v

    @model_validator(mode="after")
    def _peak_default(self):
        """The peak-nll rule's own default nu: a single token's NLL is on another scale than a mean."""
        if "threshold" not in self.model_fields_set:
            object.__setattr__(self, "threshold", default_threshold(self.rule))
        return self

    @property
    def nll_measure(self) -> str:
        """The stored measure nu is compared with: ``nll`` (mean per token) or ``peak_nll`` (costliest token)."""
        return "peak_nll" if self.rule == "peak-nll" else "nll"


class PathwaySettings(_Frozen):
    """How MoE pathways are read from the stored routing weights (ckptsel/DESIGN.md, "Pathways").

    None of this changes a measurement: the scoring pass stores each example's per-layer
    routing probabilities, and pathways are cut from them at ranking time, so changing the
    cut-off or the order re-ranks from the store without loading a checkpoint.
    """

    cutoff: float = Field(
        0.8, gt=0.0, le=1.0, description="Keep a layer's experts, largest first, until their weight reaches this (Li et al.: 0.8)."
    )
    order: Literal["weight", "expert"] = Field(
        "weight", description="Order of a layer's kept experts in the pathway: by decreasing weight, or by expert id (a set)."
    )
    max_examples: int | None = Field(
        None, ge=2, description="Pathways kept for the distance at most (a seeded subset, applied before max_pairs; "
        "its sampling error is not in the reported stderr). None: all; max_pairs bounds the cost."
    )
    max_pairs: int | None = Field(
        50_000, ge=2, description="Distances computed per mean at most: beyond this many pairs of distinct pathways, "
        "the mean is estimated on this many seeded random pairs, with its standard error. None: always exact."
    )
    seed: int = Field(0, description="Seed of the subset and of the sampled pairs.")


class ProxySettings(_Frozen):
    """How the over-memorization proxies are measured on the training questions (ckptsel/DESIGN.md).

    The perturbations are named in ``ckptsel.proxies.PERTURBATIONS``. The alternative-solution
    set is harvested from the run's earliest checkpoints: one checkpoint at a time, in training
    order, until ``alt_min_coverage`` of the examples have a correct sample that differs from
    their training target (on a question the checkpoint answers reliably), or
    ``alt_max_sources`` checkpoints have contributed; it is then fixed.
    """

    perturbations: tuple[str, ...] = Field(
        ("preamble", "format", "instruction"), min_length=1, description="Prompt perturbations, by name."
    )
    alt_min_coverage: float = Field(
        0.2, ge=0.0, le=1.0, description="Fraction of examples with an alternative solution that fixes the set."
    )
    alt_max_sources: int = Field(
        3, ge=1, description="Most checkpoints harvested from; each past the first may cost one extra load."
    )
    alt_min_accuracy: float = Field(
        0.6,
        ge=0.0,
        le=1.0,
        description="Harvest a question only where at least this fraction of the k samples is correct: "
        "a lucky final answer after a broken trace is not a solution.",
    )
    alt_grader: str | None = Field(
        None,
        description="Grader that decides which samples are alternative solutions (None: the recipe's). A stricter "
        "one that checks the steps, not only the final answer, keeps broken traces out of the set.",
    )



class OvermemSettings(_Frozen):
    """Stages and the over-memorized flag (ckptsel/DESIGN.md, "Stages and the over-memorized flag").

    A checkpoint is flagged over-memorized when all three hold: its train accuracy is within
    ``acc_margin`` of the run's best, its memorised fraction is at least ``memorized_min``, and
    its perplexity proxy is at least ``1 + proxy_rise`` times the proxy's minimum over the
    checkpoints up to it that are not underfit. Otherwise it is underfit when its predicted test
    accuracy (pre-memorization accuracy) is below ``underfit_fraction`` of the run's best, and
    generalizing if not. Defaults validated on the lab (``benchmarks/overmem_validation.py``,
    ``benchmarks/pick_validation.py``).
    """

    proxy: Literal["auto", "heldout_nll", "alt_nll", "perturb_nll"] = Field(
        "auto",
        description="Perplexity proxy of the flag; auto = held-out NLL when given, else alternative-solution NLL "
        "when its coverage suffices, else the perturbed-prompt NLL.",
    )
    acc_margin: float = Field(0.1, ge=0.0, le=1.0, description="'Near the run's best' train accuracy.")
    memorized_min: float = Field(
        0.99, ge=0.0, le=1.0, description="Memorised fraction that counts as high: at 0.99 (nearly) every measured "
        "example is memorised, so pre-memorization accuracy can rise by at most 0.01 more and further training "
        "can only sharpen; below it the run may still be learning (benchmarks/pick_validation.py: 0.5 flagged "
        "runs that were still gaining held-out accuracy)."
    )
    proxy_rise: float = Field(0.25, gt=0.0, description="Relative rise of the proxy over its running minimum.")
    underfit_fraction: float = Field(
        0.8, ge=0.0, le=1.0, description="Below this share of the best predicted test accuracy: underfit (stage "
        "(a); the flag's proxy baseline starts after it). 0.75 did better on the lab's main grid and worse on a "
        "grid nobody tuned on (benchmarks/pick_validation.py), so it stays 0.8."
    )
    min_alt_coverage: float = Field(
        0.05, ge=0.0, le=1.0, description="auto uses the alternative-solution NLL only above this coverage."
    )
    recommend_se: float = Field(
        1.0, ge=0.0, description="Recommendation: checkpoints within this many standard errors of the best "
        "predicted accuracy (paired gap) count as equally accurate; the lowest proxy among them wins "
        "(benchmarks/pick_validation.py: 2 did better on the lab's main grid and worse on the held-out one)."
    )
    proxy_tie: float = Field(
        0.05, ge=0.0, description="Recommendation: proxy values within this share of the lowest count as equal."
    )
    prefer: Literal["accuracy", "robustness"] = Field(
        "accuracy", description="Recommendation: 'accuracy' passes a flagged checkpoint over only for an unflagged "
        "one as accurate (Ruan et al.: accuracy, then perplexity); 'robustness' recommends the best unflagged one."
    )


class Recipe(_Frozen):
    """A named preset: data rendering, grading, sampling, the memorisation rule, the proxies, the
    stage thresholds and pathway reading.

    Only ``data`` and ``sampling`` are in :meth:`measurement_key`. ``stages`` and ``pathways``
    are read at ranking time from stored measurements; the measurements ``proxies`` changes
    carry their own keys (the perturbation set names its series, the alternative-solution
    harvest is keyed by the proxy settings), so a recipe that sets it re-measures only those.
    """

    name: str = "custom"
    description: str = ""
    data: DataSettings = DataSettings()
    sampling: SamplingSettings = SamplingSettings()
    memorization: MemorizationSettings = MemorizationSettings()
    pathways: PathwaySettings = PathwaySettings()
    proxies: ProxySettings = ProxySettings()
    stages: OvermemSettings = OvermemSettings()

    def measurement_key(self) -> str:
        """Hash of everything that changes a stored measurement (not the memorisation rule or pathway reading)."""
        payload = {"data": self.data.model_dump(), "sampling": self.sampling.model_dump()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class EngineSettings(_Frozen):
    """Where and how models run. Only ``dtype`` and a non-default ``backend`` change results, so only they enter the store key."""

    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:N.")
    dtype: str = Field("auto", description="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")
    batch_size: int | None = Field(None, ge=1, description="Rows per forward pass; None = automatic (a token budget).")
    trust_remote_code: bool = False
    allow_pickle: bool = Field(False, description="Load .bin (pickle) weights, with weights_only=True.")
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="Sampling backend: hf (transformers) or vllm (when installed; faster on GPU, samples differ). "
        "Scoring always runs on transformers.",
    )
    ray: str | None = Field(
        None, description="Measure checkpoints as Ray tasks: 'local' starts Ray here, 'auto' or HOST:PORT joins a "
        "cluster; None measures in this process. Results are the same either way.",
    )
    ray_cpus: int = Field(1, ge=1, description="CPUs (and torch threads) per Ray task; tasks take one GPU each "
                          "where the cluster has GPUs.")
    cache_dir: str | None = Field(
        None, description="The cache folder (--cache-dir): converted copies of checkpoints that transformers cannot "
        "read as they lie (FSDP, DeepSpeed ZeRO) are kept there; None: $CKPTSEL_CACHE or the user cache dir.",
    )


class SelectionSettings(_Frozen):
    """Which examples are measured: a fixed, seeded subset shared by every checkpoint."""

    max_examples: int | None = Field(None, ge=1, description="Measure at most this many training examples.")
    examples_seed: int = Field(0, description="Seed of the subset drawn when max_examples is set.")


