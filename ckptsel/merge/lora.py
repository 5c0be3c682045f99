"""Exact merges of LoRA adapters of one base: the weighted sum of their weight deltas.

A LoRA adapter changes a target weight by ΔW = s·B·A (B: out×r, A: r×in), with
s = alpha/r, or alpha/√r under rsLoRA (peft's ``scaling``). Merging checkpoints k with
weights w_k (normalised to sum 1) means

    ΔW = Σ_k w_k · s_k · B_k · A_k.

Averaging the A's and B's separately is *not* this (the cross terms B_j·A_k appear), so it
is not done. Instead the ranks are concatenated, which is exact:

    Σ_k w_k s_k B_k A_k = [B_1 … B_K] · [w_1 s_1 A_1 ; … ; w_K s_K A_K]

an adapter of rank Σ r_k with scale 1 (alpha = r, no rsLoRA). ``--rank R`` truncates it by
SVD (computed on the small r×r core after two QR factorisations, never on the out×in
matrix) and reports the relative Frobenius error ‖ΔW − ΔW_R‖ / ‖ΔW‖. With ``--full`` the
sum is added to the base weights instead, giving a plain model.

Model Stock (Jang et al. 2024, arXiv 2403.19522; ``--method model_stock``) is exact here too.
Per weight tensor it interpolates from the base toward the average of the fine-tuned weights
by t = N·cosθ / (1 + (N−1)·cosθ), θ the mean pairwise angle between the offsets W_k − W_0.
For adapters the offsets *are* the ΔW_k (the base cancels), so the merge is

    ΔW = t · (1/N) Σ_k s_k · B_k · A_k

with t per module: a linear merge with weights t/N, concatenated like any other. The angles
come from the Gram matrix ⟨ΔW_i, ΔW_j⟩_F = s_i s_j Σ (B_iᵀB_j) ⊙ (A_i A_jᵀ), r×r products
only; the definition (flattened tensors, norms clamped at 1e-6, t = 0 where the denominator
vanishes) is mergekit's, whose full-weight result it reproduces (``tests/test_merge.py``).

Layers whose weight is stored as in×out (GPT-2's Conv1D, ``fan_in_fan_out``) and embeddings
(peft's ``lora_embedding_A/B``) take the transpose, ΔW = (s·B·A)ᵀ. Full tensors saved with an
adapter (``modules_to_save``, resized embedding ``base_layer``, trained biases) are averaged
with the same weights, so the result is exactly the weighted average of the full models the
adapters stand for; under model_stock their offsets are taken from the base's own tensors
(so the base must be a local folder), exactly as for the full models.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ckptsel.merge.output import CARRIED_FILES, copy_files
from ckptsel.merge.plan import MergeError, MergePlan, adapter_config

log = logging.getLogger(__name__)

PREFIX = "base_model.model."   # peft's prefix on every saved key
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?:(?P<lin>lora_[AB])\.weight|(?P<emb>lora_embedding_[AB]))$")
_TORCH_DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64,
}


# --- pure math -------------------------------------------------------------------------------


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """peft's scaling: alpha / r, or alpha / sqrt(r) for rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


@dataclass
class LoraFactors:
    """One adapted module: ΔW = scale · B @ A, transposed when ``transpose``."""

    A: torch.Tensor          # r × in (embeddings: r × num_embeddings)
    B: torch.Tensor          # out × r
    scale: float
    transpose: bool = False  # fan_in_fan_out layers and embeddings store the weight as in × out
    embedding: bool = False  # saved as lora_embedding_A/B


def concat_ranks(terms: Sequence[tuple[float, LoraFactors]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in float64 with B @ A = Σ c_k · s_k · B_k @ A_k exactly (scale 1, rank Σ r_k)."""
    A = torch.cat([c * f.scale * f.A.double() for c, f in terms], dim=0)
    B = torch.cat([f.B.double() for _, f in terms], dim=1)
    return A, B


def lora_gram(factors: Sequence[LoraFactors | None]) -> torch.Tensor:
    """G[i, j] = ⟨ΔW_i, ΔW_j⟩_F (float64) without forming any ΔW: s_i·s_j·Σ (B_iᵀ B_j) ⊙ (A_i A_jᵀ).

    ``None`` stands for an adapter without this module (ΔW = 0). The transpose of
    fan-in-fan-out layers does not change a Frobenius inner product.
    """
    n = len(factors)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for i, fi in enumerate(factors):
        for j, fj in enumerate(factors[: i + 1]):
            if fi is None or fj is None:
                continue
            inner = ((fi.B.double().T @ fj.B.double()) * (fi.A.double() @ fj.A.double().T)).sum()
            gram[i, j] = gram[j, i] = fi.scale * fj.scale * inner.cpu()
    return gram


def mean_cosine(gram: torch.Tensor) -> float:
    """Model Stock's cosθ: the mean over pairs i < j of the offsets' cosine, from their Gram matrix
    (norm products clamped at 1e-6 and cosines at [−1, 1], as mergekit does)."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    i, j = torch.triu_indices(len(gram), len(gram), 1)
    return float((gram[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1).mean())


def stock_ratio(cos: float, n: int) -> float:
    """Model Stock's interpolation ratio t = N·cosθ / (1 + (N−1)·cosθ) toward the average of N
    fine-tuned weights (Jang et al. 2024); 0 (keep the base) where the denominator vanishes."""
    denominator = 1 + (n - 1) * cos
    return 0.0 if abs(denominator) < 1e-6 else n * cos / denominator


def truncate_rank(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-``rank`` factors of B @ A (Eckart–Young), and (tail², total²) of its singular values.

    B @ A = Q_B R_B R_Aᵀ Q_Aᵀ with QR of B and Aᵀ; the SVD of the small core R_B R_Aᵀ gives
    the singular values and vectors of the full product. The kept singular values are split
    as √σ on each side, so neither factor dominates if the adapter is trained further.
    """
    q_b, r_b = torch.linalg.qr(B)
    q_a, r_a = torch.linalg.qr(A.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    k = min(rank, int(s.numel()))
    root = s[:k].sqrt()
    B_k = (q_b @ u[:, :k]) * root
    A_k = root[:, None] * (vh[:k] @ q_a.T)
    return A_k, B_k, float((s[k:] ** 2).sum()), float((s**2).sum())


def relative_error(tail_sq: float, total_sq: float) -> float:
    """‖ΔW − ΔW_R‖_F / ‖ΔW‖_F from the squared singular-value sums (0 when ΔW = 0)."""
    return math.sqrt(tail_sq / total_sq) if total_sq > 0 else 0.0


# --- reading adapters ------------------------------------------------------------------------


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key matching the end of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class AdapterWeights:
    """An adapter as factors per module plus the full tensors saved with it."""

    config: dict
    modules: dict[str, LoraFactors]   # module name as peft names it (no base_model.model. prefix)
    tensors: dict[str, torch.Tensor]  # other saved tensors, by saved key
    dtype: torch.dtype


def read_adapter(folder: Path, config: dict) -> AdapterWeights:
    """Load an adapter's tensors (small: a few MB to a few hundred) and pair up A and B."""
    from safetensors.torch import load_file

    state = load_file(folder / "adapter_model.safetensors")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    tensors: dict[str, torch.Tensor] = {}
    embedding: set[str] = set()
    for key, value in state.items():
        m = _LORA_KEY.match(key.removeprefix(PREFIX))
        if m is None:
            tensors[key] = value
            continue
        part = (m["lin"] or m["emb"])[-1]
        halves.setdefault(m["module"], {})[part] = value
        if m["emb"]:
            embedding.add(m["module"])
    rslora = bool(config.get("use_rslora"))
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    modules = {}
    for name, pair in halves.items():
        if set(pair) != {"A", "B"} or pair["A"].ndim != 2 or pair["B"].ndim != 2:
            raise MergeError(f"{folder.name}/adapter_model.safetensors: module {name} has "
                             f"{'/'.join(sorted(pair))} but not a 2-D lora_A and lora_B pair")
        r = pair["A"].shape[0]
        if pair["B"].shape[1] != r:
            raise MergeError(f"{folder.name}: module {name}: lora_A has rank {r}, lora_B {pair['B'].shape[1]}")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        is_emb = name in embedding
        modules[name] = LoraFactors(pair["A"], pair["B"], lora_scale(alpha, r, rslora),
                                    transpose=is_emb or fan_in_fan_out, embedding=is_emb)
    dtypes = Counter(t.dtype for t in state.values())
    return AdapterWeights(config, modules, tensors, dtypes.most_common(1)[0][0])


def _read_all(plan: MergePlan) -> list[AdapterWeights]:
    adapters = [read_adapter(c.path, adapter_config(c)) for c in plan.inputs]
    keys = [set(a.tensors) for a in adapters]
    for ckpt, k in zip(plan.inputs[1:], keys[1:]):
        if k != keys[0]:
            extra = sorted(k ^ keys[0])[0]
            raise MergeError(f"{ckpt.path.name}: saved full tensors differ from {plan.inputs[0].path.name}'s ({extra})")
    return adapters


def _merged_factors(plan: MergePlan, adapters: list[AdapterWeights], device: torch.device):
    """Per module: (A, B) of the exact merged ΔW (modules some adapters lack contribute 0), and
    model_stock's ratio t per module (empty for linear merges)."""
    names = sorted(set().union(*(a.modules for a in adapters)))
    out, ratios = {}, {}
    for name in names:
        factors = [_to(a.modules[name], device) if name in a.modules else None for a in adapters]
        present = [f for f in factors if f is not None]
        first = present[0]
        if any(f.B.shape[0] != first.B.shape[0] or f.A.shape[1] != first.A.shape[1] for f in present):
            raise MergeError(f"module {name}: LoRA shapes differ between adapters (not the same base)")
        if plan.method == "model_stock":
            ratios[name] = stock_ratio(mean_cosine(lora_gram(factors)), len(factors))
            weights = [ratios[name] / len(factors)] * len(factors)
        else:
            weights = plan.normalized_weights
        A, B = concat_ranks([(w, f) for w, f in zip(weights, factors) if f is not None])
        out[name] = (A, B, first.transpose, first.embedding)
    return out, ratios


def _to(f: LoraFactors, device: torch.device) -> LoraFactors:
    return LoraFactors(f.A.to(device), f.B.to(device), f.scale, f.transpose, f.embedding)


def _merged_tensors(plan: MergePlan, adapters: list[AdapterWeights]) -> dict[str, torch.Tensor]:
    """The full tensors saved with the adapters, merged (float64): their weighted average, or for
    model_stock the base tensor moved toward their average by the tensor's own ratio."""
    keys = list(adapters[0].tensors)
    if plan.method != "model_stock":
        return {key: sum(w * a.tensors[key].double() for w, a in zip(plan.normalized_weights, adapters))
                for key in keys}
    base = _base_tensors(plan, keys)
    out = {}
    for key in keys:
        if adapters[0].tensors[key].shape != base[key].shape:
            raise MergeError(f"model_stock: {key} has shape {tuple(adapters[0].tensors[key].shape)}, the base's "
                             f"{_base_key(key)} {tuple(base[key].shape)} (a resized vocabulary has no offset)")
        offsets = torch.stack([a.tensors[key].double().reshape(-1) - base[key].reshape(-1) for a in adapters])
        t = stock_ratio(mean_cosine(offsets @ offsets.T), len(adapters))
        out[key] = base[key] + t * offsets.mean(0).reshape(base[key].shape)
    return out


def _base_tensors(plan: MergePlan, saved_keys: list[str]) -> dict[str, torch.Tensor]:
    """The base's tensors behind the adapters' saved full tensors (model_stock's anchor for them)."""
    from safetensors import safe_open

    if not saved_keys:
        return {}
    if plan.base is None:
        raise MergeError(f"model_stock: the adapters carry full tensors ({saved_keys[0]}), which need the base "
                         f"model as a local folder; {plan.base_model} is not one (pass --base-model PATH)")
    wanted = {_base_key(k): k for k in saved_keys}
    out = {}
    for shard in plan.base.weight_files:
        with safe_open(shard, framework="pt") as f:
            for key in set(f.keys()) & set(wanted):
                out[wanted[key]] = f.get_tensor(key).double()
    missing = sorted(set(saved_keys) - set(out))
    if missing:
        raise MergeError(f"base model {plan.base.path}: no tensor {_base_key(missing[0])} "
                         f"for the adapters' {missing[0]}")
    return out


def _device(plan: MergePlan) -> torch.device:
    from ckptsel.measure.loading import resolve_device

    return resolve_device(plan.device)


# --- writing an adapter ----------------------------------------------------------------------


def build_adapter(plan: MergePlan, folder: Path) -> dict:
    """Write the merged adapter (exact by rank concatenation, or SVD-truncated to ``plan.rank``)
    into ``folder``; returns a report with the ranks and, when truncated, the relative error."""
    from safetensors.torch import save_file

    adapters = _read_all(plan)
    dtype = _TORCH_DTYPES[plan.dtype] if plan.dtype else adapters[0].dtype
    factors, ratios = _merged_factors(plan, adapters, _device(plan))
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    tail = total = 0.0
    worst = 0.0
    for name, (A, B, _, embedding) in factors.items():
        if plan.rank is not None:
            A, B, t, s = truncate_rank(A, B, plan.rank)
            tail, total, worst = tail + t, total + s, max(worst, relative_error(t, s))
        ranks[name] = A.shape[0]
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        state[f"{PREFIX}{name}.{a_key}"] = A.to("cpu", dtype).contiguous()
        state[f"{PREFIX}{name}.{b_key}"] = B.to("cpu", dtype).contiguous()
    for key, value in _merged_tensors(plan, adapters).items():
        state[key] = value.to(dtype).contiguous()
    save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = _merged_config(plan, [a.config for a in adapters], ranks)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _copy_tokenizer(plan, folder)
    report = {"modules": len(ranks), "rank": Counter(ranks.values()).most_common(1)[0][0] if ranks else 0,
              **_ratio_report(ratios)}
    if plan.rank is not None:
        report["svd_relative_error"] = relative_error(tail, total)
        report["svd_max_module_error"] = worst
    log.info("merged adapter: %d modules, rank %s", report["modules"], report["rank"])
    return report


def _merged_config(plan: MergePlan, configs: list[dict], ranks: dict[str, int]) -> dict:
    """adapter_config.json for the merged factors: scale 1 everywhere (alpha = r, no rsLoRA)."""
    config = dict(configs[0])
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else configs[0]["r"]
    odd = {re.escape(name): k for name, k in ranks.items() if k != r}
    config.update(r=r, lora_alpha=r, use_rslora=False, rank_pattern=odd, alpha_pattern=dict(odd),
                  base_model_name_or_path=plan.base_model, inference_mode=True)
    targets = [c.get("target_modules") for c in configs]
    layers = [(c.get("layers_to_transform"), c.get("layers_pattern")) for c in configs]
    if any(t != targets[0] for t in targets) or any(x != layers[0] for x in layers):
        # Different targets: name exactly the adapted modules (peft full-matches a string).
        config.update(target_modules="|".join(re.escape(n) for n in sorted(ranks)),
                      layers_to_transform=None, layers_pattern=None)
    return config


def _copy_tokenizer(plan: MergePlan, folder: Path) -> None:
    """Tokenizer and generation config from the first input that has them, else the base."""
    sources = [c.path for c in plan.inputs] + ([plan.base.path] if plan.base else [])
    for src in sources:
        if (src / "tokenizer_config.json").is_file():
            copy_files(src, folder, CARRIED_FILES)
            return


# --- writing a full model --------------------------------------------------------------------


def _base_key(saved_key: str) -> str:
    """Saved full-tensor key -> base checkpoint key: drop peft's prefix and ``.base_layer``."""
    return saved_key.removeprefix(PREFIX).replace(".base_layer.", ".")


def build_on_base(plan: MergePlan, folder: Path) -> dict:
    """Write base + ΔW (and the averaged full tensors) as a plain model, shard by shard in the
    base's own layout, with the base's config and generation config."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    adapters = _read_all(plan)
    device = _device(plan)
    factors, ratios = _merged_factors(plan, adapters, device)
    replace = {_base_key(k): v for k, v in _merged_tensors(plan, adapters).items()}
    deltas = {f"{name}.weight": (A, B, transpose) for name, (A, B, transpose, _) in factors.items()}
    base = plan.base
    folder_of_base = plan.model_folder(base)  # a base in a layout read through a converted copy: that copy
    if folder_of_base != base.path:
        from ckptsel.discover import describe

        base = describe(folder_of_base)
    in_base = set()
    for shard in base.weight_files:
        with safe_open(shard, framework="pt") as f:
            in_base.update(f.keys())
    missing = sorted((set(deltas) | set(replace)) - in_base)
    if missing:
        raise MergeError(f"base model {base.path}: no tensor {missing[0]} for the adapters' module "
                         f"(is this the base the adapters were trained on?)")
    out_dtype = _TORCH_DTYPES[plan.dtype] if plan.dtype else None
    total_bytes = 0
    for shard in base.weight_files:
        tensors = {}
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                w = f.get_tensor(key)
                dtype = out_dtype if out_dtype is not None and w.is_floating_point() else w.dtype
                if key in replace or key in deltas:
                    merged = replace[key] if key in replace else w.double()
                    if key in deltas:
                        A, B, transpose = deltas[key]
                        d = B @ A
                        merged = merged.to(device) + (d.T if transpose else d)
                    w = merged.to("cpu", dtype)
                else:
                    w = w.to(dtype)
                tensors[key] = w.contiguous()
                total_bytes += w.numel() * w.element_size()
        save_file(tensors, folder / shard.name, metadata={"format": "pt"})
    _write_index(base.path, folder, total_bytes)
    _write_config(base.path, folder, plan.dtype)
    copy_files(base.path, folder, ("generation_config.json",))
    _copy_tokenizer(plan, folder)
    log.info("merged %d adapters into %s: %d modules changed", len(adapters), base.path.name, len(deltas))
    return {"modules": len(deltas), "replaced_tensors": len(replace), **_ratio_report(ratios)}


def _ratio_report(ratios: dict[str, float]) -> dict:
    """model_stock's ratios t over the modules (what the card and sidecar show); nothing for linear."""
    if not ratios:
        return {}
    values = list(ratios.values())
    return {"model_stock_ratio": {"min": min(values), "mean": math.fsum(values) / len(values), "max": max(values)}}


def _write_index(base: Path, folder: Path, total_bytes: int) -> None:
    index = base / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = total_bytes
        (folder / index.name).write_text(json.dumps(data, indent=2) + "\n")


def _write_config(base: Path, folder: Path, dtype: str | None) -> None:
    config = json.loads((base / "config.json").read_text())
    if dtype is not None:
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
