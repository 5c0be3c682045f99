"""Checkpoint formats (ckptsel/formats/): fingerprints pinned byte for byte, the registry's detection
order, and a new format that is one class plus its registration."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

import ckptsel
import ckptsel.formats.hashing as hashing
import ckptsel.formats.registry as registry
from ckptsel.cli import main
from ckptsel.discover import _folder_fingerprint, describe, fingerprint
from ckptsel.errors import CheckpointError
from ckptsel.formats import BROKEN, PEFT_ADAPTER, PICKLE, SAFETENSORS, CheckpointFormat, format_of
from ckptsel.formats.files import read_json, read_safetensors_header

# --- hand-made folders: bytes only, so their fingerprints depend on nothing but this file ------------


def safetensors_bytes(tensors: dict) -> bytes:
    """safetensors bytes for {name: (dtype, shape, data)}."""
    header, blob = {}, b""
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(blob), len(blob) + len(data)]}
        blob += data
    raw = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
    return struct.pack("<Q", len(raw)) + raw + blob


def f32(*xs) -> bytes:
    return struct.pack(f"<{len(xs)}f", *xs)


TENSORS = {
    "model.embed_tokens.weight": ("F32", [4, 3], f32(*[i / 7 for i in range(12)])),
    "model.norm.weight": ("BF16", [4], bytes(range(8))),
    "lm_head.weight": ("F32", [2, 4], f32(*[1.5 - i for i in range(8)])),
    # 20 kB: more than three 4 KiB windows, so the sampled hash differs from the whole one
    "model.layers.0.mlp.down_proj.weight": ("F32", [40, 128], f32(*[(i % 97) / 13 for i in range(40 * 128)])),
}
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
          "transformers_version": "4.0.0", "hidden_size": 3}
ADAPTER_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}


def full(folder: Path, sharded: bool = False) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    if not sharded:
        (folder / "model.safetensors").write_bytes(safetensors_bytes(TENSORS))
        return folder
    names = list(TENSORS)
    parts = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for shard, keys in parts.items():
        (folder / shard).write_bytes(safetensors_bytes({k: TENSORS[k] for k in keys}))
    index = {"metadata": {}, "weight_map": {k: s for s, ks in parts.items() for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def pickled(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "pytorch_model.bin").write_bytes(bytes(i * 7 % 251 for i in range(300_000)))  # hashed, never unpickled
    return folder


def adapter(folder: Path, base: str, pickle: bool = False) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({**ADAPTER_CONFIG, "base_model_name_or_path": base}))
    if pickle:
        (folder / "adapter_model.bin").write_bytes(bytes(range(200)))
    else:
        (folder / "adapter_model.safetensors").write_bytes(safetensors_bytes({
            "base_model.model.layers.0.q_proj.lora_A.weight": ("F32", [2, 3], f32(1, 2, 3, 4, 5, 6)),
            "base_model.model.layers.0.q_proj.lora_B.weight": ("F32", [3, 2], f32(6, 5, 4, 3, 2, 1))}))
    return folder


@pytest.fixture
def folders(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # the hub id below is in no cache
    _folder_fingerprint.cache_clear()
    base = full(tmp_path / "base")
    return {
        "single": full(tmp_path / "single"),
        "sharded": full(tmp_path / "sharded", sharded=True),
        "pickle": pickled(tmp_path / "pickle"),
        "adapter_on_folder": adapter(tmp_path / "lora", str(base)),
        "adapter_on_hub_id": adapter(tmp_path / "lora-hub", "org/base-7b"),
        "pickled_adapter": adapter(tmp_path / "lora-bin", str(base), pickle=True),
    }


# Computed by the string-kind code before ckptsel/formats/ existed: every result store written
# since keys its results by these bytes, so a change here orphans every user's cache.
PINNED = {
    "whole": {
        "single": "3f5c5cef405687bb599b0310233b65eaafc8a99c497287cdd0ec99b753222eac",
        "sharded": "3f5c5cef405687bb599b0310233b65eaafc8a99c497287cdd0ec99b753222eac",
        "pickle": "b4da31fcd82b03f0e6bb3214c0b4f6c47e7f76f80307f2dd0cfc06bf394bd6e1",
        "adapter_on_folder": "06249ccfdeea16e2e5c145dd78de5b8b3cc3c6b2b3e8c95bd9990d19f187b1b5",
        "adapter_on_hub_id": "5b095b58b7e2ff6dde16c62be5d055894044fc26020af1475f43e72b15793569",
        "pickled_adapter": "917329eb3a34cc8ff09a5f52ecec585ef7218b2c895de6d776009f88e3c91a52",
    },
    "sampled": {
        "single": "eeb4bdfa83d275b2fa0d4fe7542ac41510a98c4ff30b3ab2883738a8eb9888e9",
        "sharded": "eeb4bdfa83d275b2fa0d4fe7542ac41510a98c4ff30b3ab2883738a8eb9888e9",
        "pickle": "7604a44d28caf3d5ad91ef347bb4d7da62f4b3c6736cc7de76fd0711542c0224",
        "adapter_on_folder": "64505f40325b7ef96fee14ea2a73ce61b9308394afe319f224af6a9be5684f55",
        "adapter_on_hub_id": "5b095b58b7e2ff6dde16c62be5d055894044fc26020af1475f43e72b15793569",
        "pickled_adapter": "ca72516b44016d11a762bec47ab20d0990336cde1605d1ce8aebb6b7f4e4a6a0",
    },
}


@pytest.mark.parametrize("mode", ["whole", "sampled"])
def test_fingerprints_are_pinned(folders, monkeypatch, mode):
    if mode == "sampled":  # the large-checkpoint path: windows instead of every byte
        monkeypatch.setattr(hashing, "WHOLE_LIMIT", 0)
    found = {name: describe(folder) for name, folder in folders.items()}
    assert {name: c.format for name, c in found.items()} == {
        "single": SAFETENSORS, "sharded": SAFETENSORS, "pickle": PICKLE,
        "adapter_on_folder": PEFT_ADAPTER, "adapter_on_hub_id": PEFT_ADAPTER, "pickled_adapter": PEFT_ADAPTER}
    assert {name: fingerprint(c) for name, c in found.items()} == PINNED[mode]


def test_registry_order_decides_overlapping_layouts(folders, tmp_path):
    both = shutil.copytree(folders["single"], tmp_path / "both")
    shutil.copy(folders["pickle"] / "pytorch_model.bin", both)
    assert format_of(both) is SAFETENSORS  # safetensors win over .bin in one folder
    shutil.copy(folders["adapter_on_folder"] / "adapter_config.json", both)
    assert format_of(both) is PEFT_ADAPTER  # adapter_config.json decides
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=re.escape(
            "no weights: no model*.safetensors, pytorch_model*.bin, pytorch_model_fsdp_0/, global_stepN/ "
            "(DeepSpeed) or adapter_config.json")):
        format_of(tmp_path / "empty")


def test_a_broken_folder_gets_the_broken_format_and_keeps_what_was_read(folders):
    (folders["single"] / "config.json").unlink()
    ckpt = describe(folders["single"])
    assert ckpt.format is BROKEN and ckpt.kind == "error" and ckpt.error == "no config.json next to the weights"
    assert ckpt.num_parameters == 12 + 4 + 8 + 40 * 128 and ckpt.weight_format == "safetensors"
    with pytest.raises(CheckpointError, match="cannot fingerprint a broken checkpoint"):
        fingerprint(ckpt)
    assert ckpt.format.merge_refusal(ckpt) == "no config.json next to the weights"


def test_json_keeps_its_fields_in_order_and_names_the_format(folders):
    row = describe(folders["adapter_on_folder"]).to_dict()
    assert list(row) == ["path", "kind", "step", "tokens", "epoch", "train_loss", "error", "weight_files",
                         "weight_format", "architecture", "dtype", "num_parameters", "num_experts", "experts_per_token",
                         "base_model", "lora_rank", "lora_alpha", "target_modules", "notes", "run", "format"]
    assert (row["kind"], row["format"], row["weight_format"]) == ("adapter", "peft", "safetensors")
    assert row["weight_files"] == [str(folders["adapter_on_folder"] / "adapter_model.safetensors")]


def test_merge_asks_the_format(folders):
    from ckptsel.merge import MergeError, plan_merge

    with pytest.raises(MergeError, match="pickle weights .*merge reads safetensors only"):
        plan_merge([folders["pickle"], folders["single"]])
    with pytest.raises(MergeError, match="pickle weights"):
        plan_merge([folders["pickled_adapter"], folders["adapter_on_folder"]])
    with pytest.raises(MergeError, match=r"cannot mix LoRA adapters \(lora\) with full models \(single\)"):
        plan_merge([folders["adapter_on_folder"], folders["single"]])
    assert plan_merge([folders["single"], folders["sharded"]]).adapters is False
    assert plan_merge([folders["adapter_on_folder"]], method="linear").adapters is True


# --- a new format is one class plus its registration -------------------------------------------------


class ToyFormat(CheckpointFormat):
    """A folder marked by a ``TOY`` file, its weights a safetensors file named ``weights.toy``."""

    name = "toy"
    looks_for = "TOY"

    def __init__(self):
        self.loads = 0

    def detect(self, folder: Path) -> bool:
        return (folder / "TOY").is_file()

    def describe(self, ckpt, base_model):
        weights = ckpt.path / "weights.toy"
        ckpt.weight_files, ckpt.weight_format = [weights], "safetensors"
        ckpt.num_parameters = read_safetensors_header(weights).num_parameters
        ckpt.architecture = read_json(ckpt.path / "config.json")["architectures"][0]

    def label(self, ckpt) -> str:
        return "toy weights.toy"

    def load(self, ckpt, options):
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM

        self.loads += 1
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt.path), dtype=options.dtype)
        missing, unexpected = model.load_state_dict(load_file(ckpt.path / "weights.toy"), strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
        model.tie_weights()
        return model.to(options.device)


FAST = ["--max-examples", "6", "-k", "2", "--max-new-tokens", "24", "--quiet", "--json"]


def _rank(run: Path, cache: Path) -> dict:
    args = ["rank", str(run), "--data", str(run / "train.jsonl"), "--recipe", str(run / "recipe.yaml"),
            "--cache-dir", str(cache), *FAST]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_registered_format_is_listed_and_ranked_without_touching_other_modules(tiny_run, tmp_path, monkeypatch):
    toy_run = shutil.copytree(tiny_run, tmp_path / "toy-run")
    checkpoints = sorted(toy_run.glob("checkpoint-*"))
    for folder in checkpoints:
        (folder / "model.safetensors").rename(folder / "weights.toy")
        (folder / "TOY").touch()
    listed = CliRunner().invoke(main, ["ls", str(toy_run), "--json"])
    assert listed.exit_code == 1 and {r["kind"] for r in json.loads(listed.stdout)} == {"error"}  # not registered

    toy = ToyFormat()
    monkeypatch.setattr(registry, "FORMATS", (toy, *registry.FORMATS))
    rows = json.loads(CliRunner().invoke(main, ["ls", str(toy_run), "--json"]).stdout)
    assert [(r["kind"], r["format"], r["error"]) for r in rows] == [("full", "toy", None)] * len(checkpoints)
    assert rows[0]["num_parameters"] == describe(tiny_run / checkpoints[0].name).num_parameters > 0
    table = CliRunner().invoke(main, ["ls", str(toy_run)], env={"COLUMNS": "200"}).output
    assert "toy weights.toy" in table and "0 broken" in table

    ranked = _rank(toy_run, tmp_path / "toy-cache")
    assert toy.loads == len(checkpoints)  # each read through ToyFormat.load, none from a cache
    original = _rank(tiny_run, tmp_path / "cache")
    keys = ("step", "train_acc", "target_nll", "premem_acc", "fingerprint")
    rows = [[[r[k] for k in keys] for r in out["checkpoints"]] for out in (ranked, original)]
    assert rows[0] == rows[1]  # the same weights, read another way: the same numbers
    assert all(r["error"] is None for r in ranked["checkpoints"])


def test_no_product_code_outside_formats_branches_on_kind_strings():
    """The kind string stays only as what `ls --json` prints; code asks the format object."""
    test = re.compile(r"""\b(kind|weight_format)\s*(==|!=|in)\s*[\[({]?\s*"""
                      r"""["'](full|adapter|error|safetensors|pickle)["']""")
    package = Path(ckptsel.__file__).parent
    offenders = [f"{path.relative_to(package)}:{n}" for path in package.rglob("*.py")
                 if "formats" not in path.relative_to(package).parts[:1]
                 for n, line in enumerate(path.read_text().splitlines(), 1) if test.search(line)]
    assert offenders == []
