"""How long ``discover()`` takes on 100 checkpoints (target: < 1 s), and ``fingerprint()`` after it.

Two runs of 100 ``checkpoint-N/`` folders, each with a ``trainer_state.json`` whose
``log_history`` grows with N (a loss every 10 steps, an eval every 100, as a real run logs):

- tiny: one 2-layer Llama-shaped safetensors file with real random data, hard-linked into
  every checkpoint (the fingerprint hashes it byte for byte);
- 7b: Llama-2-7B-shaped checkpoints (291 bf16 tensors, 6.7B parameters) in three shards plus
  an index, written as sparse files: headers are real, the 13 GB of tensor data per
  checkpoint are holes, so the disk stays empty. Listing only reads headers, so this is
  the honest cost of listing big checkpoints; the fingerprint's sampled reads hit holes in
  the page cache here, so its number is a lower bound for a cold disk.

    python benchmarks/ls_speed.py            # prints one line per measurement
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import time
from pathlib import Path

import numpy as np

from ckptsel.discover import discover, fingerprint

N_CHECKPOINTS = 100
STEP = 50


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str, itemsize: int,
                      data: bool) -> None:
    """A safetensors file; ``data=False`` leaves the tensor bytes as a sparse hole."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        if data:
            f.write(np.random.default_rng(0).standard_normal(offset // 4, dtype=np.float32).tobytes())
        else:
            f.truncate(8 + len(raw) + offset)


def llama_shapes(layers: int, hidden: int, inter: int, vocab: int, kv: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                   p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)}
    return shapes


def trainer_state(step: int) -> str:
    history = [{"epoch": s / 1000, "grad_norm": 1.0, "learning_rate": 1e-5, "loss": 1.0 / s, "step": s}
               for s in range(10, step + 1, 10)]
    history += [{"epoch": s / 1000, "eval_loss": 0.5, "step": s} for s in range(100, step + 1, 100)]
    return json.dumps({"epoch": step / 1000, "global_step": step, "log_history": history}, indent=2)


def build_run(root: Path, size: str) -> None:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16"}
    template = root / "template"
    template.mkdir()
    (template / "config.json").write_text(json.dumps(config))
    if size == "tiny":
        write_safetensors(template / "model.safetensors", llama_shapes(2, 32, 64, 100, 16), "F32", 4, data=True)
        files = ["model.safetensors"]
    else:
        shapes = llama_shapes(32, 4096, 11008, 32000, 4096)
        names = list(shapes)
        thirds = [names[: len(names) // 3], names[len(names) // 3: 2 * len(names) // 3], names[2 * len(names) // 3:]]
        files = [f"model-0000{k + 1}-of-00003.safetensors" for k in range(3)]
        for file, part in zip(files, thirds):
            write_safetensors(template / file, {n: shapes[n] for n in part}, "BF16", 2, data=False)
        index = {"weight_map": {n: file for file, part in zip(files, thirds) for n in part}}
        (template / "model.safetensors.index.json").write_text(json.dumps(index))
        files.append("model.safetensors.index.json")
    for k in range(1, N_CHECKPOINTS + 1):
        folder = root / "run" / f"checkpoint-{k * STEP}"
        folder.mkdir(parents=True)
        for name in [*files, "config.json"]:
            os.link(template / name, folder / name)
        (folder / "trainer_state.json").write_text(trainer_state(k * STEP))


def main() -> None:
    for size in ("tiny", "7b"):
        with tempfile.TemporaryDirectory() as tmp:
            build_run(Path(tmp), size)
            run = Path(tmp) / "run"
            times = []
            for _ in range(3):
                start = time.perf_counter()
                found = discover(run)
                times.append(time.perf_counter() - start)
            assert len(found) == N_CHECKPOINTS and all(c.kind == "full" for c in found), found[0].error
            start = time.perf_counter()
            fps = {fingerprint(c) for c in found}
            fp_time = time.perf_counter() - start
            print(f"{size:>4}: discover() of {len(found)} checkpoints ({found[0].num_parameters:,} params each): "
                  f"first {times[0]:.3f} s, best of 3 {min(times):.3f} s; "
                  f"fingerprint() of all {fp_time:.3f} s ({len(fps)} distinct)")


if __name__ == "__main__":
    main()
