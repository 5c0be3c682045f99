"""ckptsel merge: mergekit parity, exact LoRA merges, provenance, atomic output."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
from click.testing import CliRunner

from ckptsel.cli import main
from conftest import save_tiny_llama

torch = pytest.importorskip("torch")


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def models(tmp_path_factory, tokenizer):
    """A base and three fine-tuned full checkpoints of one tiny Llama (different random weights)."""
    root = tmp_path_factory.mktemp("full")
    return {name: save_tiny_llama(root / name, tokenizer, seed=seed)
            for name, seed in (("base", 0), ("a", 1), ("b", 2), ("c", 3))}


# Three adapters of one run, deliberately unlike each other: ranks 4/2/4, alpha 8/16/8, rsLoRA
# on the second, an extra target module (o_proj) on the second, LoRA on the embedding, and a
# fully trained lm_head (modules_to_save). Weights are random so every ΔW is non-zero.
_ADAPTERS = (
    dict(r=4, lora_alpha=8, use_rslora=False, target_modules=["q_proj", "v_proj", "embed_tokens"]),
    dict(r=2, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "embed_tokens", "o_proj"]),
    dict(r=4, lora_alpha=8, use_rslora=False, target_modules=["q_proj", "v_proj", "embed_tokens"]),
)


def _save_adapter(base, path, seed, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(init_lora_weights=False, modules_to_save=["lm_head"], **lora))
    for name, p in model.named_parameters():
        if "modules_to_save" in name:
            p.data += 0.1 * torch.randn_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("lora")
    return [_save_adapter(models["base"], root / f"adapter{k}", 10 + k, **cfg) for k, cfg in enumerate(_ADAPTERS)]


def _tensors(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _hashes(*folders):
    """sha256 of every file under the folders: inputs must be byte-identical after a merge."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(*args):
    return CliRunner().invoke(main, ["merge", *map(str, args)])


# --- full checkpoints: mergekit -----------------------------------------------------------------


def test_linear_merge_equals_mergekit_yaml_exactly(models, tmp_path):
    inputs = [models["a"], models["b"], models["c"]]
    before = _hashes(*inputs)
    result = _run(*inputs, "--weights", "1,2,3", "-o", tmp_path / "ours", "-q")
    assert result.exit_code == 0, result.output

    from mergekit.scripts.run_yaml import main as mergekit_yaml

    config = tmp_path / "merge.yml"
    config.write_text("merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {p}\n    parameters:\n      weight: {w}\n" for p, w in zip(inputs, (1, 2, 3))))
    theirs = CliRunner().invoke(mergekit_yaml, [str(config), str(tmp_path / "theirs")])
    assert theirs.exit_code == 0, theirs.output

    ours, ref = _tensors(tmp_path / "ours"), _tensors(tmp_path / "theirs")
    assert set(ours) == set(ref) and len(ours) > 10
    assert max((ours[k] - ref[k]).abs().max().item() for k in ref) == 0.0
    # and it is the weighted average (1/6, 2/6, 3/6) of the inputs
    src = [_tensors(p) for p in inputs]
    key = "model.layers.1.mlp.down_proj.weight"
    expected = (src[0][key] + 2 * src[1][key] + 3 * src[2][key]) / 6
    assert torch.allclose(ours[key], expected, atol=1e-6)
    assert _hashes(*inputs) == before


def test_output_carries_tokenizer_card_and_sidecar(models, tmp_path):
    from ckptsel.discover import describe, fingerprint
    from ckptsel.merge import merge, plan_merge

    out = tmp_path / "merged"
    plan = plan_merge([models["a"], models["b"]], weights=[1, 3], out=out)
    why = {"pre_memorization_accuracy": 0.4375, "candidates": [{"candidate": "1/4+3/4", "nll": 1.25}]}
    stages = []
    merge(plan, out, justification=why, progress=stages.append)

    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md", "ckptsel_merge.json", "mergekit_config.yml"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "ckptsel_merge.json").read_text())
    assert meta["method"] == "linear" and meta["weights"] == [1.0, 3.0]
    assert meta["normalized_weights"] == [0.25, 0.75]
    assert [i["fingerprint"] for i in meta["inputs"]] == [fingerprint(describe(models[n])) for n in "ab"]
    assert meta["output_fingerprint"] == fingerprint(describe(out))
    assert meta["justification"]["pre_memorization_accuracy"] == 0.4375
    card = (out / "README.md").read_text()
    for item in meta["inputs"]:
        assert item["path"] in card and item["fingerprint"][:16] in card
    assert "| 1/4+3/4 | 1.25 |" in card and "0.4375" in card
    assert stages == ["fingerprint", "build", "provenance", "built", "published"]
    # nothing but the target is left in the parent folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_slerp_and_ties_configs(models):
    from ckptsel.merge import plan_merge
    from ckptsel.merge.full import mergekit_config

    slerp = mergekit_config(plan_merge([models["a"], models["b"]], method="slerp", weights=[1, 3]))
    assert slerp["parameters"] == {"t": 0.75}
    assert slerp["base_model"] == {"model": {"path": str(models["a"])}}
    ties = mergekit_config(plan_merge([models["a"], models["b"]], method="ties", base_model=models["base"],
                                      parameters={"density": 0.5}))
    assert ties["parameters"] == {"density": 0.5, "normalize": True}
    assert ties["base_model"] == {"model": {"path": str(models["base"])}}
    assert [m["parameters"]["weight"] for m in ties["models"]] == [1.0, 1.0]


def test_ties_merge_runs_with_base(models, tmp_path):
    result = _run(models["a"], models["b"], "--method", "ties", "--base-model", models["base"],
                  "--param", "density=0.5", "-o", tmp_path / "ties", "--json", "-q")
    assert result.exit_code == 0, result.output
    meta = json.loads(result.output)
    assert meta["method"] == "ties" and meta["parameters"] == {"density": 0.5}
    assert meta["base_fingerprint"] and meta["base_model"] == str(models["base"])
    merged, base, a = (_tensors(p) for p in (tmp_path / "ties", models["base"], models["a"]))
    key = "model.layers.0.self_attn.q_proj.weight"
    # density 0.5 keeps about half of each task vector: the merge differs from base and from a
    assert not torch.equal(merged[key], base[key]) and not torch.equal(merged[key], a[key])


# --- LoRA adapters: exact ΔW ----------------------------------------------------------------------


def test_lora_scale_and_concatenation_are_exact():
    from ckptsel.merge.lora import LoraFactors, concat_ranks, lora_scale

    assert lora_scale(16, 4) == 4.0 and lora_scale(16, 4, rslora=True) == 8.0
    g = torch.Generator().manual_seed(0)
    f1 = LoraFactors(torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g), scale=2.0)
    f2 = LoraFactors(torch.randn(4, 5, generator=g), torch.randn(3, 4, generator=g), scale=0.5)
    A, B = concat_ranks([(0.25, f1), (0.75, f2)])
    assert A.shape == (6, 5) and B.shape == (3, 6)
    explicit = 0.25 * delta_weight(f1) + 0.75 * delta_weight(f2)
    assert (B @ A - explicit).abs().max().item() < 1e-12
    # averaging A and B separately (the wrong way) is not the same
    naive = ((f1.B.double() + f1.B.double()) / 2) @ ((f1.A.double() + f1.A.double()) / 2) * 2.0
    assert (naive - explicit).abs().max().item() > 0.1


def test_svd_truncation_matches_eckart_young():
    from ckptsel.merge.lora import relative_error, truncate_rank

    # ΔW = U diag(3, 2, 1) Vᵀ, written as B (4×3) @ A (3×5)
    u, _ = torch.linalg.qr(torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    v, _ = torch.linalg.qr(torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    B, A = u * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), v.T
    A2, B2, tail, total = truncate_rank(A, B, 2)
    assert A2.shape == (2, 5) and B2.shape == (4, 2)
    assert math.isclose(relative_error(tail, total), math.sqrt(1 / 14), rel_tol=1e-12)
    best = u[:, :2] @ torch.diag(torch.tensor([3.0, 2.0], dtype=torch.float64)) @ v[:, :2].T
    assert (B2 @ A2 - best).abs().max().item() < 1e-12
    A3, B3, tail3, _ = truncate_rank(A, B, 8)  # a rank above the true one is exact
    assert A3.shape[0] == 3 and tail3 < 1e-20 and (B3 @ A3 - B @ A).abs().max().item() < 1e-12


def _reference(base, adapters, weights, dtype=torch.float64):
    """Σ_k w_k · (base merged with adapter k), built by peft itself: the explicit average."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    total = None
    for w, path in zip(weights, adapters):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), path)
        state = model.merge_and_unload().state_dict()
        total = {k: w * v for k, v in state.items()} if total is None else {k: total[k] + w * state[k] for k in state}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    model.load_state_dict(total)
    return model


def test_lora_merge_equals_explicit_average_of_deltas(models, adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    before = _hashes(models["base"], *adapters)
    for name, extra in (("adapter", ()), ("adapter64", ("--dtype", "float64")), ("full", ("--full",))):
        result = _run(*adapters, "--weights", "1,2,3", "-o", tmp_path / name, "-q", *extra)
        assert result.exit_code == 0, result.output
    assert _hashes(models["base"], *adapters) == before

    reference = _reference(models["base"], adapters, [1 / 6, 2 / 6, 3 / 6])
    ref_state = reference.state_dict()
    ids = torch.tensor([[1, 40, 41, 42, 17, 18, 60, 70, 2]])
    with torch.no_grad():
        ref_logits = reference(ids).logits

    def loaded(name):
        base = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float64)
        if name == "full":
            return AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float64)
        return PeftModel.from_pretrained(base, tmp_path / name).merge_and_unload()

    for name in ("adapter", "adapter64", "full"):
        model = loaded(name)
        state = model.state_dict()
        weight_diff = max((state[k] - ref_state[k]).abs().max().item() for k in ref_state)
        with torch.no_grad():
            logit_diff = (model(ids).logits - ref_logits).abs().max().item()
        assert logit_diff < 1e-6, (name, logit_diff)
        assert weight_diff < (1e-10 if name == "adapter64" else 1e-5), (name, weight_diff)

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 10 and config["lora_alpha"] == 10 and not config["use_rslora"]  # 4+2+4, scale 1
    assert set(config["rank_pattern"].values()) == {2}  # o_proj only in the rank-2 adapter
    meta = json.loads((tmp_path / "full" / "ckptsel_merge.json").read_text())
    assert meta["output"] == "full" and meta["inputs_kind"] == "adapter"


def test_lora_rank_truncation_reports_error(adapters, tmp_path):
    result = _run(*adapters, "--rank", "3", "-o", tmp_path / "r3", "--json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)["report"]
    assert report["rank"] == 3 and 0.05 < report["svd_relative_error"] < 1.0
    assert report["svd_max_module_error"] >= report["svd_relative_error"]
    exact = _run(*adapters, "--rank", "10", "-o", tmp_path / "r10", "--json", "-q")
    assert json.loads(exact.output)["report"]["svd_relative_error"] < 1e-6


def _model_stock_direct(w0, ws):
    """Model Stock on full tensors, written out: offsets from the base, mean pairwise cosine of the
    flattened offsets, t = N·cos / (1 + (N−1)·cos), result t·mean(W_k) + (1 − t)·W_0."""
    offsets = [(w - w0).reshape(-1) for w in ws]
    pairs = [(a, b) for i, a in enumerate(offsets) for b in offsets[i + 1:]]
    cos = sum(float(a @ b / (a.norm() * b.norm())) for a, b in pairs) / len(pairs)
    n = len(ws)
    t = n * cos / (1 + (n - 1) * cos)
    return t * sum(ws) / n + (1 - t) * w0, t


def test_model_stock_of_lora_deltas_equals_direct_computation():
    from ckptsel.merge.lora import LoraFactors, concat_ranks, lora_gram, mean_cosine, stock_ratio

    # The ratio on known angles: parallel offsets keep their average (t = 1), orthogonal ones the
    # base (t = 0), two at 60° move 2/3 of the way, and an antiparallel pair is the singular case.
    assert stock_ratio(1.0, 3) == 1.0 and stock_ratio(0.0, 2) == 0.0 and stock_ratio(-1.0, 2) == 0.0
    assert math.isclose(stock_ratio(0.5, 2), 2 / 3)
    gram = torch.tensor([[4.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 9.0]], dtype=torch.float64)
    assert math.isclose(mean_cosine(gram), (0.5 + 0 + 0) / 3)

    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(6, 5, dtype=torch.float64, generator=g)
    shared = torch.randn(6, 5, dtype=torch.float64, generator=g)  # a common direction: the angles are acute
    factors = []
    for r, scale in ((2, 2.0), (3, 0.5), (2, 1.5)):
        B, A = torch.randn(6, r, dtype=torch.float64, generator=g), torch.randn(r, 5, dtype=torch.float64, generator=g)
        factors.append(LoraFactors(A, B, scale))
    # Give every ΔW the shared component (exactly, as an extra rank-5 term folded into B·A).
    u, s, vh = torch.linalg.svd(shared, full_matrices=False)
    factors = [LoraFactors(torch.cat([f.A, vh]), torch.cat([f.B, u * s / f.scale], dim=1), f.scale) for f in factors]
    deltas = [delta_weight(f) for f in factors]
    expected, t_direct = _model_stock_direct(w0, [w0 + d for d in deltas])

    gram = lora_gram(factors)
    flat = torch.stack([d.reshape(-1) for d in deltas])
    assert torch.allclose(gram, flat @ flat.T, rtol=1e-12, atol=1e-10)
    t = stock_ratio(mean_cosine(gram), 3)
    assert 0.3 < t < 1 and math.isclose(t, t_direct, rel_tol=1e-12)
    A, B = concat_ranks([(t / 3, f) for f in factors])
    assert (w0 + B @ A - expected).abs().max().item() < 1e-12
    assert lora_gram([factors[0], None])[1].abs().max().item() == 0  # a missing module is a zero ΔW


def test_lora_model_stock_matches_mergekit_on_the_full_models(models, adapters, tmp_path):
    """model_stock of the adapters, computed on their ΔW, equals mergekit's model_stock of the full
    models they stand for (base + ΔW_k each) with the base as anchor."""
    fulls = []
    for k, adapter in enumerate(adapters):
        fulls.append(tmp_path / f"full{k}")
        assert _run(adapter, "--full", "--dtype", "float32", "-o", fulls[-1], "-q").exit_code == 0
    reference = _run(*fulls, "--method", "model_stock", "--base-model", models["base"], "-o", tmp_path / "ref", "-q")
    assert reference.exit_code == 0, reference.output
    before = _hashes(models["base"], *adapters)
    for name, extra in (("full", ("--full",)), ("adapter", ())):
        result = _run(*adapters, "--method", "model_stock", "-o", tmp_path / name, "--json", "-q", *extra)
        assert result.exit_code == 0, result.output
        ratio = json.loads(result.output)["report"]["model_stock_ratio"]
        # Random adapters are nearly orthogonal: small ratios, of either sign (mergekit allows t < 0 too).
        assert -1 < ratio["min"] < ratio["mean"] < ratio["max"] < 1
    assert _hashes(models["base"], *adapters) == before

    ref, ours = _tensors(tmp_path / "ref"), _tensors(tmp_path / "full")
    assert set(ours) == set(ref)
    worst = max((ours[k].double() - ref[k].double()).abs().max().item() for k in ref)
    assert worst < 1e-6, worst
    base = _tensors(models["base"])
    changed = [k for k in ref if not torch.equal(ref[k], base[k])]
    assert any("q_proj" in k for k in changed) and any("lm_head" in k or "embed" in k for k in changed)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    as_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["base"]),
                                           tmp_path / "adapter").merge_and_unload().state_dict()
    assert max((as_adapter[k] - ref[k]).abs().max().item() for k in ref if k in as_adapter) < 1e-5
    meta = json.loads((tmp_path / "adapter" / "ckptsel_merge.json").read_text())
    assert meta["method"] == "model_stock" and meta["weights"] is None and "--method model_stock" in meta["command"]

    # The saved full tensors (lm_head here) take their offsets from the base: a hub id will not do.
    remote = []
    for k in (0, 2):
        remote.append(tmp_path / f"remote{k}")
        shutil.copytree(adapters[k], remote[-1])
        config = json.loads((remote[-1] / "adapter_config.json").read_text())
        (remote[-1] / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/model"}))
    refused = _run(*remote, "--method", "model_stock", "-o", tmp_path / "remote", "-q")
    assert refused.exit_code == 2 and "need the base model as a local folder" in refused.output
    assert not (tmp_path / "remote").exists()


# --- bad input: one line, exit code 2 -------------------------------------------------------------


def test_bad_requests_fail_in_one_line(models, adapters, tmp_path, tokenizer):
    other_base = save_tiny_llama(tmp_path / "other-base", tokenizer, seed=9)
    stranger = _save_adapter(other_base, tmp_path / "stranger", 5, r=2, lora_alpha=4, target_modules=["q_proj"])
    dora = _save_adapter(models["base"], tmp_path / "dora", 6, r=2, lora_alpha=4, target_modules=["q_proj"],
                         use_dora=True)
    out = tmp_path / "out"
    cases = [
        ((models["a"], adapters[0]), "cannot mix LoRA adapters"),
        ((adapters[0], stranger), "different base models"),
        ((models["a"], models["b"], "--weights", "1,2,3"), "--weights has 3 values for 2 checkpoints"),
        ((models["a"], models["b"], "--weights", "1,x"), "'x' is not a number"),
        ((models["a"], models["b"], "--method", "magic"), "unknown method 'magic'; known: linear, slerp"),
        ((models["a"], models["b"], "--method", "ties"), "ties needs --base-model"),
        ((models["a"], models["b"], models["c"], "--method", "slerp"), "slerp merges exactly 2 checkpoints"),
        ((models["a"], models["b"], "--param", "density=0.5"), "--param density: not a parameter of linear"),
        ((models["a"], models["b"], "--method", "karcher", "--weights", "1,2"), "karcher takes no --weights"),
        ((models["a"], models["b"], "--method", "model_stock", "--base-model", models["a"]),
         "is also one of the checkpoints"),
        ((adapters[0], dora), "use_dora is set"),
        ((adapters[0], adapters[1], "--method", "ties"), "--method linear or model_stock only"),
        ((adapters[0], adapters[1], "--method", "model_stock", "--weights", "1,2"), "model_stock takes no --weights"),
        ((models["a"], models["b"], "--rank", "4"), "--rank applies to merges of LoRA adapters"),
        ((models["a"], models["b"]), None),
    ]
    for args, message in cases:
        result = _run(*args, "-o", out, "-q")
        if message is None:
            assert result.exit_code == 0, result.output
            continue
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (message, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    refused = _run(models["a"], models["b"], "-o", out, "-q")
    assert refused.exit_code == 2 and "already exists; pass --force" in refused.output
    overlap = _run(models["a"], models["b"], "-o", models["a"], "--force", "-q")
    assert overlap.exit_code == 2 and "overlaps input" in overlap.output


def test_help_lists_every_method_and_stays_torch_free():
    from ckptsel.merge.plan import METHODS

    code = ("import sys\nfrom click.testing import CliRunner\nfrom ckptsel.cli import main\n"
            "r = CliRunner().invoke(main, ['merge', '--help'])\nprint(r.output)\n"
            "print('HEAVY', [m for m in ('torch', 'transformers', 'peft', 'mergekit') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    text = " ".join(out.split())
    listed = set(re.findall(r"\w+", text[text.index("lazy loading):"):text.index("LoRA adapters of one base")]))
    assert listed >= set(METHODS), set(METHODS) - listed


# --- atomic output ------------------------------------------------------------------------------


def test_force_replaces_atomically_and_without_exchange(models, tmp_path, monkeypatch):
    from ckptsel.merge import output

    out = tmp_path / "m"
    assert _run(models["a"], models["b"], "-o", out, "-q").exit_code == 0
    first = _tensors(out)["lm_head.weight"].clone()
    assert _run(models["a"], models["b"], "--weights", "1,3", "-o", out, "--force", "-q").exit_code == 0
    second = _tensors(out)["lm_head.weight"]
    assert not torch.equal(first, second)
    monkeypatch.setattr(output, "_exchange", lambda a, b: False)  # filesystems without RENAME_EXCHANGE
    assert _run(models["a"], models["b"], "-o", out, "--force", "-q").exit_code == 0
    assert torch.equal(_tensors(out)["lm_head.weight"], first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_leftovers_of_dead_processes_are_cleaned_or_restored(tmp_path):
    from ckptsel.merge.output import clean_leftovers

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".m.ckptsel-partial-{dead.pid}-0123abcd").mkdir()
    old = tmp_path / f".kept.ckptsel-replaced-{dead.pid}-0123abcd"
    old.mkdir()
    (old / "config.json").write_text("{}")
    (tmp_path / f".live.ckptsel-partial-{os.getpid()}-0123abcd").mkdir()  # our own: alive, kept
    assert len(clean_leftovers(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".live.ckptsel-partial-{os.getpid()}-0123abcd", "kept"]
    assert (tmp_path / "kept" / "config.json").is_file()


def test_disk_space_is_checked_before_writing(models, tmp_path, monkeypatch):
    from ckptsel.merge import output

    monkeypatch.setattr(output.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    result = _run(models["a"], models["b"], "-o", tmp_path / "m", "-q")
    assert result.exit_code == 2 and "not enough free disk space" in result.output
    assert list(tmp_path.iterdir()) == []


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from ckptsel.merge import merge, plan_merge
    adapters, out, force = sys.argv[1:4], sys.argv[4], sys.argv[5] == "1"

    def progress(stage):
        print(stage, flush=True)
        if stage == "built":      # everything written to the temporary folder, not yet in place
            time.sleep(120)

    merge(plan_merge(adapters, weights=[1, 2, 3]), out, force=force, progress=progress)
""")


def _merge_and_kill(adapters, out, force):
    """Start a merge in a subprocess, SIGKILL it once its output is fully staged."""
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, *map(str, adapters), str(out), str(int(force))],
                            stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(300, proc.kill)  # a hung subprocess fails the test instead of blocking it
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.strip() == "built":
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == -signal.SIGKILL and line.strip() == "built"


def test_kill_9_leaves_nothing_or_the_old_target(adapters, tmp_path):
    out = tmp_path / "merged"
    _merge_and_kill(adapters, out, force=False)
    assert not out.exists()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.ckptsel-partial-")]
    assert len(partial) == 1 and (partial[0] / "adapter_model.safetensors").is_file()

    assert _run(*adapters, "-o", out, "-q").exit_code == 0  # the next run cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]

    before = _hashes(out)
    _merge_and_kill(adapters, out, force=True)
    assert _hashes(out) == before  # the old target, untouched


def test_weights_follow_the_argument_order(models, tmp_path):
    from ckptsel.merge import plan_merge

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-500").symlink_to(models["a"])
    (run / "checkpoint-400").symlink_to(models["b"])
    plan = plan_merge([run / "checkpoint-500", run / "checkpoint-400"], weights=[3, 1])
    assert [(c.path.name, c.step) for c in plan.inputs] == [("checkpoint-500", 500), ("checkpoint-400", 400)]
    assert plan.normalized_weights == (0.75, 0.25)
    whole_run = plan_merge([run])  # a run expands to its checkpoints in step order
    assert [c.step for c in whole_run.inputs] == [400, 500]


def delta_weight(f) -> "torch.Tensor":
    """ΔW = scale · B @ A in float64, shaped like the weight it is added to: the oracle for the merges."""
    d = f.scale * (f.B.double() @ f.A.double())
    return d.T if f.transpose else d
