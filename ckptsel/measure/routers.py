"""Router capture: each example's MoE routing distribution, read off the scoring pass.

The pathway metrics (Li, Fan & Zhou 2025; ``ckptsel.pathways``) need, per example and MoE
layer, the router's softmax probabilities averaged over the example's target tokens: an
array ``(layers, experts)``. They come from the same teacher-forced forward pass that
scores the target NLL, so they cost no extra pass::

    with capture_routers(model) as routers:
        out = model(input_ids=ids, attention_mask=mask, **routers.forward_kwargs)
        w = routers.reduce(target_token_mask(prompt_lens, target_lens, width), out)  # (B, L, E)
    g = routers.gate_vectors()                                                      # (L, E, H)

Where the logits come from. transformers 5 models declare their router module and the
output index that holds its logits in ``_can_record_outputs["router_logits"]``; that is
what ``output_router_logits=True`` records (with forward hooks of its own) and returns as
``outputs.router_logits``. ``source="output"`` uses exactly that path. Models without the
declaration (older or remote-code MoE models) are read with our own forward hooks on the
gate: a module named ``gate`` or ``router`` that is an ``nn.Linear`` with one output per
expert (``source="hooks"``; it can be forced on any model, and the two agree exactly).
``output_router_logits`` also makes the model compute its load-balancing loss, which the
hooks avoid; either adds a few percent to the scoring pass of a tiny OLMoE, within the
run-to-run noise (``benchmarks/pathway_speed.py``).

Conventions of the families we support (transformers 5.23), all the same where it matters:

==========  ============================  ===========================================
family      router (module, weight)       routing
==========  ============================  ===========================================
OLMoE       ``mlp.gate`` (E, H)           softmax over all E in float32, then top-k;
                                          top-k renormalised iff ``norm_topk_prob``
Qwen2-MoE   ``mlp.gate`` (E, H)           same; plus a shared expert behind a sigmoid
                                          gate, which is not routed and not captured
Qwen3-MoE   ``mlp.gate`` (E, H)           same; ``mlp_only_layers`` and
                                          ``decoder_sparse_step`` make some layers
                                          dense: those have no router and no column
Mixtral     ``mlp.gate`` (E, H) (on disk  softmax over all E, top-k always renormalised
            ``block_sparse_moe.gate``)
==========  ============================  ===========================================

We capture the full softmax over all experts, *before* top-k and its renormalisation, so
``norm_topk_prob`` and ``num_experts_per_tok`` do not change the captured weights; every
layer's probabilities sum to 1 per token. For a router whose model scores with something
other than a softmax (DeepSeek-V3's sigmoid), the softmax of its logits keeps the experts'
order but not the model's exact weights; such model types are logged once.

Which tokens. "The example's tokens" (ckptsel/DESIGN.md) are, here, the positions whose *input*
token is a target token: the router decision made while reading y_t. With the scoring
pass's layout (prompt, then target, then right padding) that is positions
``len(prompt) .. len(prompt) + len(target) - 1``, the appended EOS included; prompt and
padding positions are excluded, so padding never changes an example's weights.

On-disk layouts. transformers 5.23 saves these families per expert (``experts.N.gate_proj``
or Mixtral's ``experts.N.w1``) and loads both that and the fused layout
(``experts.gate_up_proj``, ``experts.down_proj``, as written with
``save_pretrained(save_original_format=False)``) to identical logits, so no conversion is
needed here (``tests/test_routers.py`` checks both for all four families).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ckptsel.discover import moe_from_config
from ckptsel.errors import CkptselError

log = logging.getLogger(__name__)

Source = Literal["auto", "output", "hooks"]

# Model types whose routing weights are the softmax of the router logits (checked against
# their transformers 5.23 modeling code). Others get the softmax too, with a log line.
SOFTMAX_ROUTERS = frozenset({"olmoe", "flex_olmo", "qwen2_moe", "qwen3_moe", "mixtral", "minimax"})
# Module names the hook fallback treats as routers, when they map hidden states to experts.
GATE_NAMES = ("gate", "router")

_warned_types: set[str] = set()


@dataclass(frozen=True)
class RouterLayout:
    """Where a model's routers are: module names in layer order, and what they return.

    ``index`` is the element of a tuple output that holds the logits (None: the output
    is the logits tensor). ``declared`` says whether the model itself declares these
    modules as its router-logit source.
    """

    names: tuple[str, ...]
    modules: tuple[torch.nn.Module, ...] = field(repr=False)
    index: int | None
    num_experts: int
    declared: bool
    model_type: str


def unwrap(model) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def find_routers(model) -> RouterLayout | None:
    """The router modules of an MoE model, in layer order; None for a dense model."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if config is not None else None
    model_type = getattr(text_config, "model_type", "") or ""
    declared = _declared_routers(base)
    if declared is not None:
        named, index = declared
    else:
        num_experts = _config_experts(text_config)
        named = [
            (name, m)
            for name, m in base.named_modules()
            if name.rsplit(".", 1)[-1] in GATE_NAMES
            and isinstance(m, torch.nn.Linear)
            and num_experts is not None
            and m.out_features == num_experts
        ]
        index = None
    if not named:
        return None
    num_experts = _router_experts(named[0][1]) or _config_experts(text_config)
    if num_experts is None:
        raise CkptselError(f"{model_type or type(base).__name__}: cannot tell how many experts its router scores")
    return RouterLayout(
        names=tuple(n for n, _ in named),
        modules=tuple(m for _, m in named),
        index=index,
        num_experts=num_experts,
        declared=declared is not None,
        model_type=model_type,
    )


def declares_experts(model) -> bool:
    """Whether the model's config declares routed experts (as discovery reads it), routers found or not."""
    config = getattr(unwrap(model), "config", None)
    return config is not None and _config_experts(config.get_text_config()) is not None


def _declared_routers(base) -> tuple[list[tuple[str, torch.nn.Module]], int] | None:
    """Routers as the model declares them for ``output_router_logits`` (transformers 5)."""
    specs = (getattr(base, "_can_record_outputs", None) or {}).get("router_logits")
    if specs is None:
        return None
    specs = specs if isinstance(specs, list) else [specs]
    matched: list[tuple[str, torch.nn.Module]] = []
    indices = set()
    for spec in specs:
        target = getattr(spec, "target_class", spec if isinstance(spec, type) else None)
        layer_name = getattr(spec, "layer_name", None)
        indices.add(getattr(spec, "index", 1))
        for name, module in base.named_modules():
            if target is None or not isinstance(module, target):
                continue
            if layer_name and f".{layer_name.strip('.')}." not in f".{name}.":
                continue
            matched.append((name, module))
    if len(indices) != 1 or not matched:
        return None  # several sources with different layouts (e.g. JetMoE): read the gates instead
    order = {name: i for i, (name, _) in enumerate(base.named_modules())}
    matched.sort(key=lambda nm: order[nm[0]])
    return matched, indices.pop()


def _router_experts(module: torch.nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _config_experts(config) -> int | None:
    return moe_from_config(config.to_dict())[0] if config is not None else None


class RouterCapture:
    """Collects router logits of one forward pass at a time; see :func:`capture_routers`.

    ``forward_kwargs`` must be passed to the model call (``output_router_logits=True`` when
    reading the model's own output, nothing when reading hooks). Each forward pass of the
    model replaces what the previous one captured.
    """

    def __init__(self, layout: RouterLayout, source: Literal["output", "hooks"]):
        self.layout = layout
        self.source = source
        self._logits: list[torch.Tensor] = []

    @property
    def layer_names(self) -> tuple[str, ...]:
        return self.layout.names

    @property
    def num_layers(self) -> int:
        return len(self.layout.names)

    @property
    def num_experts(self) -> int:
        return self.layout.num_experts

    @property
    def forward_kwargs(self) -> dict[str, bool]:
        return {"output_router_logits": True} if self.source == "output" else {}

    def _record(self, module, args, output) -> None:
        if module is self.layout.modules[0]:  # the first router starts a new forward pass
            self._logits = []
        logits = output[self.layout.index] if isinstance(output, (tuple, list)) else output
        self._logits.append(logits.detach())

    def _clear(self) -> None:
        self._logits = []

    def reduce(self, target_mask: torch.Tensor, outputs=None) -> np.ndarray:
        """Per-example routing weights ``(batch, layers, experts)``, float32, from the last pass.

        ``target_mask`` (batch, seq) is True at the positions to average over (see
        :func:`target_token_mask`). A row with no True position gets NaN. ``outputs`` is the
        model's return value, needed when ``source == "output"``.
        """
        if self.source == "output":
            logits = getattr(outputs, "router_logits", None) if outputs is not None else None
            if logits is None:
                raise RuntimeError("source='output': pass the model outputs of a call made with forward_kwargs")
        else:
            logits = self._logits
        if len(logits) != self.num_layers:
            raise RuntimeError(f"captured {len(logits)} router outputs, expected {self.num_layers} (one forward pass)")
        weights = router_means(logits, target_mask)
        self._clear()
        return weights

    def gate_vectors(self) -> np.ndarray:
        """The routers' expert vectors g_{l,e} (rows of each gate weight), ``(layers, experts, hidden)``."""
        rows = []
        for name, module in zip(self.layout.names, self.layout.modules):
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != self.num_experts:
                raise CkptselError(f"router {name}: no (experts, hidden) weight to read expert vectors from")
            rows.append(weight.detach().float().cpu().numpy())
        return np.stack(rows)


def router_means(logits: Sequence[torch.Tensor], target_mask: torch.Tensor) -> np.ndarray:
    """Softmax each layer's router logits and average them over the masked positions.

    ``logits``: one tensor per layer, ``(batch * seq, experts)`` (how the routers flatten
    their input) or ``(batch, seq, experts)``. Returns ``(batch, layers, experts)`` float32.
    """
    mask = target_mask.to(device=logits[0].device, dtype=torch.float32)
    batch, seq = mask.shape
    counts = mask.sum(dim=1, keepdim=True)  # (batch, 1)
    out = []
    for layer_logits in logits:
        probs = torch.softmax(layer_logits.float().reshape(batch, seq, -1), dim=-1)
        out.append(torch.bmm(mask[:, None, :], probs)[:, 0, :] / counts)  # (batch, experts)
    return torch.stack(out, dim=1).cpu().numpy()


def target_token_mask(prompt_lengths: Sequence[int], target_lengths: Sequence[int], width: int) -> torch.Tensor:
    """Bool ``(batch, width)``: True where the input token is a target token.

    Rows are laid out prompt, target, right padding, as the scoring pass lays them out.
    """
    positions = torch.arange(width)[None, :]
    start = torch.as_tensor(list(prompt_lengths))[:, None]
    end = start + torch.as_tensor(list(target_lengths))[:, None]
    return (positions >= start) & (positions < end)


def _supports_output(model) -> bool:
    """Whether the top-level forward accepts ``output_router_logits`` (a PEFT wrapper passes it on)."""
    params = inspect.signature(unwrap(model).forward).parameters
    return "output_router_logits" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@contextlib.contextmanager
def capture_routers(model, source: Source = "auto") -> Iterator[RouterCapture]:
    """Capture router logits while the block runs; works on PEFT-wrapped models.

    ``source``: ``auto`` reads ``outputs.router_logits`` when the model declares its
    routers, forward hooks on the gates otherwise; ``output`` / ``hooks`` force one.
    Raises :class:`CkptselError` for a model without routers (a dense model).
    """
    layout = find_routers(model)
    if layout is None:
        raise CkptselError(f"{type(unwrap(model)).__name__}: not a mixture-of-experts model (no router modules found)")
    if layout.model_type not in SOFTMAX_ROUTERS and layout.model_type not in _warned_types:
        _warned_types.add(layout.model_type)
        log.warning("%s: routing weights are taken as the softmax of the router logits", layout.model_type or "model")
    if source == "auto":
        source = "output" if layout.declared and _supports_output(model) else "hooks"
    elif source == "output" and not layout.declared:
        raise CkptselError(f"{layout.model_type}: the model does not return router logits; use source='hooks'")
    capture = RouterCapture(layout, source)
    handles = []
    try:
        if source == "hooks":
            handles.extend(m.register_forward_hook(capture._record) for m in layout.modules)
        yield capture
    finally:
        for handle in handles:
            handle.remove()
        capture._clear()
