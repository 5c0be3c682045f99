"""The first run on a GPU: scoring, sampling and ``ckptsel rank`` in bf16 + SDPA, in one command.

Prints, under a header naming the machine and the versions of torch, CUDA, transformers, peft
and lm-eval (and writes with ``--json OUT``):

scoring   target-NLL scoring throughput: ckptsel's scorer (``score_token_pairs``) against
          lm-eval's HF ``loglikelihood`` (``HFLM`` handed the same model object, its softmax in
          float32 as ckptsel's) on identical requests: bench_scoring.py's, built from GSM8K
          training rows (``workload``: six requests per question; ``plain``: one). Target
          tokens per second, the ratio, the largest per-token disagreement between the two
          sides, and model-FLOPs utilisation:
              MFU = 2 x parameters x request tokens (prompt + target) / seconds / peak,
          the peak (dense bf16, datasheet) looked up from the device name: H100 SXM and H200
          989 TFLOP/s. ``counted`` is the FLOP rate of the work each side actually runs
          (token positions through the body, rows through the LM head; attention aside).
sampling  generated tokens per second, k samples per GSM8K question (T=0.8, top-p 0.95, no top-k):
          ckptsel's sampler (``sample_token_ids``) against a per-question ``model.generate``
          loop with the default (dynamic) KV cache, with a static cache
          (``cache_implementation="static"``, compilation disabled), and static + ``torch.compile``
          (transformers compiles the decoding step itself); and ckptsel's sampler with the model
          under ``torch.compile(dynamic=True)``. Each variant is warmed up on the two longest
          questions (for the compiling ones that warm-up is the compilation: its time, graphs
          and graph breaks are printed), then the variants run interleaved. A compile variant
          gets at most 150 s to compile, and starts only if it and the timed runs can end
          before the deadline (420 s after the imports); otherwise it is reported as skipped. The
          winner is named, "clearly" when its slowest repeat beats every other variant's
          fastest by 10%.
rank      ``ckptsel rank`` of an 8-checkpoint LoRA lab run trained on the spot
          (``ckptsel.lab.quick.train_tiny_run``), in this process through the CLI with
          ``--device cuda``: wall time and where it went: getting models ready
          (``CheckpointLoader.load``), each measurement kind (``ckptsel.kinds.KINDS``), and the
          rest (discovery, data, fingerprints, the store, ranking).
memory    ``torch.cuda.max_memory_allocated``, reset before each side and variant (the model's
          weights included; ``weights`` gives their share).

Models are built from configs with random weights (bench_common.py): ``qwen0.5b``, Qwen2.5-0.5B's
shape with its 151,936-token vocabulary, loaded by ckptsel's loader (bf16 and SDPA on CUDA).
``--cpu --quick`` runs every code path on the CPU with ``qwen-tiny`` (the same architecture at test
size) in float32, on few requests, compiling through ``aot_eager`` (no C++ build), in under 3
minutes on 2 cores; ``--quick`` alone does the same on the GPU in seconds.

    python benchmarks/gpu_check.py --json gpu.json            # CUDA machine: <= 8 minutes on an H100/H200
    python benchmarks/gpu_check.py --cpu --quick --json cpu.json

A machine without a package registry needs wheels: benchmarks/gpu_wheels.sh fetches them and
prints the one command to run there. Exit status 0 when every part ran and the two scorers agree
(within 1e-4 nats per token in float32, 5e-2 in bf16); 1 otherwise, after printing and writing
every figure that was measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import bench_common as bench

# Dense bf16 tensor-core peaks, FLOP/s, from the vendors' datasheets; the first name contained in
# the device's name wins (so "H100 PCIe" before "H100").
PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("A100", 312e12))
# Largest per-token |ckptsel - lm-eval| NLL difference accepted, by the dtype the model runs in.
AGREEMENT = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 5e-2}
CLEAR_WIN = 1.10


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much of each part to run."""

    size: str
    score_questions: int
    score_repeats: int
    lm_eval_batch: int
    sample_questions: int
    k: int
    max_new_tokens: int
    sample_repeats: int
    compile_backend: str
    rank_args: tuple[str, ...]  # extra ``ckptsel rank`` options
    compile_limit_s: float  # longest a compile variant's warm-up (its compilation) may take
    deadline_s: float | None  # a compile variant starts only if it can end, with the timed runs, before this


FULL = Plan("qwen0.5b", 128, 3, 32, 16, 5, 64, 2, "inductor", (), 150.0, 420.0)
QUICK = Plan(
    "qwen-tiny", 4, 1, 8, 2, 5, 16, 1, "aot_eager", ("--max-examples", "8", "-k", "2", "--max-new-tokens", "16"),
    120.0, None,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (float32)")
    parser.add_argument("--quick", action="store_true", help="test-size model, few requests (seconds on a GPU)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write every figure to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 with --cpu, else all)")
    parser.add_argument("--parts", default="scoring,sampling,rank", help="comma-separated subset to run")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="start a compile variant only if it can end by then (default 420 s; none with --quick)")
    parser.add_argument("--size", choices=bench.SIZES, default=None, help="model size (default: by --quick)")
    parser.add_argument("--questions", type=int, default=None, help="GSM8K questions for scoring and sampling")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="sampling budget per sample")
    parser.add_argument("--compile-limit-s", type=float, default=None,
                        help="longest a compile variant may compile (default 150 s; 120 with --quick)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor; "
                        "aot_eager with --quick)")
    args = parser.parse_args()
    threads = args.threads or (1 if args.cpu else os.cpu_count())
    bench.setup(threads)

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device here: pass --cpu (with --quick for the small check)", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    overrides = {"deadline_s": args.deadline_s, "size": args.size, "score_questions": args.questions,
                 "sample_questions": args.questions, "max_new_tokens": args.max_new_tokens,
                 "compile_backend": args.compile_backend, "compile_limit_s": args.compile_limit_s}
    plan = dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    device = torch.device("cpu" if args.cpu else "cuda")
    check = Check(device, plan, args.json)
    check.report["machine"] = machine(device, threads)
    print_header(check.report["machine"])
    check.save()

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"scoring", "sampling", "rank"}
    if unknown:
        print(f"--parts: unknown {sorted(unknown)}", file=sys.stderr)
        return 2
    # rank first: it needs none of the large model, and the sampling part's deadline then guards the end.
    if "rank" in parts:
        check.part("rank", check.rank)
    if {"scoring", "sampling"} & set(parts):
        check.part("model", check.load_model)
    if "scoring" in parts and check.model is not None:
        check.part("scoring", check.scoring)
    if "sampling" in parts and check.model is not None:
        check.part("sampling", check.sampling)
    check.release_model()
    shutil.rmtree(check.work, ignore_errors=True)
    total = time.perf_counter() - check.start
    check.report["total_s"] = total
    check.report["ok"] = not check.report["failures"]
    check.save()
    print(f"\ntotal {total:.1f} s; " + ("every part ran and the scorers agree" if check.report["ok"] else
          "FAILED: " + "; ".join(f"{k}: {v}" for k, v in check.report["failures"].items())))
    return 0 if check.report["ok"] else 1


# --------------------------------------------------------------------------- machine


def machine(device, threads: int) -> dict:
    import accelerate
    import lm_eval
    import peft
    import torch
    import transformers

    info = {
        "device": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "lm_eval": getattr(lm_eval, "__version__", "?"),
        "cpus": os.cpu_count(),
        "torch_threads": threads,
        "load_average": bench.load(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=props.total_memory / 2**30,
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
            driver=_driver_version(),
        )
        peak = peak_bf16(props.name)
        info["peak_bf16_flops"], info["peak_source"] = peak if peak else (None, f"no peak known for {props.name!r}")
    else:
        info.update(cpu=platform.processor() or platform.machine(), peak_bf16_flops=None, peak_source="CPU: no peak")
    return info


def peak_bf16(name: str) -> tuple[float, str] | None:
    """(FLOP/s, what it is) for a device name, or None when the table has no entry for it."""
    for key, flops in PEAK_BF16:
        if key in name:
            return flops, f"{key} dense bf16 datasheet peak, {flops / 1e12:.0f} TFLOP/s"
    return None


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             check=False, capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def print_header(info: dict) -> None:
    if info["device"] == "cuda":
        print(f"machine: {info['gpu']} ({info['gpu_memory_gib']:.1f} GiB, compute capability "
              f"{info['compute_capability']}, {info['multiprocessors']} SMs), driver {info['driver']}, "
              f"{info['cpus']} CPUs")
    else:
        print(f"machine: CPU {info['cpu']} x{info['cpus']}, {info['torch_threads']} torch thread(s), "
              f"load average {info['load_average']:.2f}")
    print(f"software: python {info['python']}, torch {info['torch']} (CUDA {info['cuda']}), transformers "
          f"{info['transformers']}, peft {info['peft']}, accelerate {info['accelerate']}, lm-eval {info['lm_eval']}")
    print(f"peak for MFU: {info['peak_source']}")


# --------------------------------------------------------------------------- the check


class Check:
    """The parts, the figures they leave in ``report``, and the JSON file kept up to date after each part."""

    def __init__(self, device, plan: Plan, out: Path | None):
        self.device, self.plan, self.out = device, plan, out
        self.start = time.perf_counter()
        self.report: dict = {"plan": dataclasses.asdict(plan), "failures": {}}
        self.model = self.tokenizer = self._loader = None
        self.work = Path(tempfile.mkdtemp(prefix="ckptsel-gpu-check-"))

    def part(self, name: str, fn) -> None:
        """Run one part; a failure is recorded (and printed) and the next part still runs."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a broken part must not lose the others' figures
            traceback.print_exc()
            self.report["failures"][name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            print(f"[{name}] FAILED: {self.report['failures'][name]}")
        self.save()

    def save(self) -> None:
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.report, indent=2, default=str))
        tmp.replace(self.out)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    # ----------------------------------------------------------------------- timing

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def measured(self):
        """Wall seconds (device work finished) and peak device memory (MiB; None on CPU) of the block."""
        import torch

        cuda = self.device.type == "cuda"
        self.sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        out: dict = {}
        start = time.perf_counter()
        yield out
        self.sync()
        out["seconds"] = time.perf_counter() - start
        out["peak_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else None

    def interleaved(self, sides: dict, repeats: int) -> dict[str, list[dict]]:
        """Each side ``repeats`` times, alternating the order (A B, B A, ...); per run: seconds, peak, return value."""
        names = list(sides)
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for r in range(repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                with self.measured() as m:
                    m["value"] = sides[name]()
                runs[name].append(m)
        return runs

    # ----------------------------------------------------------------------- model

    def load_model(self) -> None:
        """The model through ckptsel's loader: bf16 + SDPA on CUDA, float32 on the CPU, as ``ckptsel rank`` runs it."""
        from ckptsel.discover import discover
        from ckptsel.measure.loading import CheckpointLoader
        from ckptsel.settings import EngineSettings

        start = time.perf_counter()
        folder = bench.model_dir(self.plan.size)
        built = time.perf_counter() - start
        self._loader = CheckpointLoader.for_engine(EngineSettings(device=str(self.device)))
        with self.measured() as m:
            (ckpt,) = discover([folder])
            self.model, self.tokenizer = self._loader.load(ckpt)
        config = self.model.config
        params = sum(p.numel() for p in self.model.parameters())
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        attention = getattr(config, "_attn_implementation", None)
        self.report["model"] = {
            "size": self.plan.size, "params": params, "dtype": dtype, "attention": attention,
            "layers": config.num_hidden_layers, "hidden": config.hidden_size, "vocab": config.vocab_size,
            "build_s": built, "load_s": m["seconds"], "weights_mib": m["peak_mib"],
        }
        print(f"\nmodel: {self.plan.size}, {config.model_type}, {config.num_hidden_layers} layers, width "
              f"{config.hidden_size}, vocab {config.vocab_size:,}, {params / 1e6:,.1f}M parameters, {dtype}, "
              f"attention {attention}; built/found in {built:.1f} s, loaded in {m['seconds']:.1f} s"
              + (f", {m['peak_mib']:,.0f} MiB on the device" if m["peak_mib"] is not None else ""))

    def release_model(self) -> None:
        import gc

        import torch

        self.model = self.tokenizer = None
        if self._loader is not None:
            self._loader.close()
            self._loader = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ----------------------------------------------------------------------- scoring

    def scoring(self) -> None:
        import numpy as np
        from bench_scoring import WorkCounter, lm_eval_instances, requests_for
        from lm_eval.models.huggingface import HFLM

        from ckptsel.measure.scoring import encode_pairs, score_token_pairs

        model, tokenizer, plan = self.model, self.tokenizer, self.plan
        dtype = self.report["model"]["dtype"]
        tolerance = AGREEMENT[dtype]
        peak = self.report["machine"]["peak_bf16_flops"]
        params = self.report["model"]["params"]
        head_params = model.get_output_embeddings().weight.numel()
        body_params = params - model.get_input_embeddings().weight.numel()
        body_params -= 0 if model.config.tie_word_embeddings else head_params
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=plan.lm_eval_batch, device=str(self.device),
                  add_bos_token=True, max_length=model.config.max_position_embeddings, softmax_dtype="float32")
        examples = bench.gsm8k_examples(plan.score_questions)
        out = self.report.setdefault("scoring", {})
        print(f"\n[scoring] {len(examples)} GSM8K questions, {dtype}; lm-eval batch size {plan.lm_eval_batch}, "
              f"softmax float32; median of {plan.score_repeats}, interleaved")
        for name, requests in requests_for(examples).items():
            pairs = encode_pairs(tokenizer, [p for p, _ in requests], [t for _, t in requests], append_eos=True)
            instances = lm_eval_instances(lm, tokenizer, requests, pairs, name)
            n_target = sum(len(t) for _, t in pairs)
            n_request = sum(len(p) + len(t) for p, t in pairs)
            score_token_pairs(model, pairs[:2])  # warm-up, both sides, not counted
            lm.loglikelihood(instances[:2], disable_tqdm=True)
            counter = WorkCounter(model)

            def ours(counter=counter, pairs=pairs):
                counter.side = "ckptsel"
                return score_token_pairs(model, pairs)

            def theirs(counter=counter, instances=instances):
                counter.side = "lm-eval"
                return lm.loglikelihood(instances, disable_tqdm=True)

            try:
                runs = self.interleaved({"lm-eval": theirs, "ckptsel": ours}, plan.score_repeats)
            finally:
                counter.close()
            res = runs["ckptsel"][-1]["value"]
            diff = np.abs(-(res.nll * res.n_tokens) - np.array([ll for ll, _ in runs["lm-eval"][-1]["value"]]))
            per_token = diff / res.n_tokens
            figures = {
                "requests": len(pairs), "questions": len(examples), "target_tokens": n_target,
                "request_tokens": n_request, "max_per_token_diff": float(per_token.max()),
                "mean_per_token_diff": float(per_token.mean()), "tolerance": tolerance,
                "agree": bool(per_token.max() <= tolerance),
            }
            line = [f"\n  [{name}] {len(pairs)} requests, {n_target:,} target tokens ({n_request:,} with prompts)"]
            line.append(f"    agreement: max per-token |NLL difference| {per_token.max():.1e} nats "
                        f"(mean {per_token.mean():.1e}; allowed {tolerance:.0e} in {dtype})")
            for side in ("lm-eval", "ckptsel"):
                seconds = bench.median([r["seconds"] for r in runs[side]])
                positions, rows = (n // plan.score_repeats for n in counter.counts[side])
                counted = 2 * (positions * body_params + rows * head_params) / seconds
                memory = max((r["peak_mib"] for r in runs[side]), default=None) if self.device.type == "cuda" else None
                mfu = 2 * params * n_request / seconds / peak if peak else None
                figures[side] = {"target_tok_s": n_target / seconds, "seconds": seconds, "counted_flops": counted,
                                 "mfu": mfu, "peak_mib": memory, "positions": positions, "head_rows": rows,
                                 "runs_s": [r["seconds"] for r in runs[side]]}
                line.append(
                    f"    {side:8} {n_target / seconds:12,.0f} target tok/s  {seconds:7.3f} s  "
                    + (f"MFU {100 * mfu:5.1f}%  " if mfu is not None else "MFU n/a  ")
                    + f"counted {counted / 1e12:8.3f} TFLOP/s"
                    + (f"  peak {memory:,.0f} MiB" if memory is not None else "")
                )
            figures["ratio"] = figures["lm-eval"]["seconds"] / figures["ckptsel"]["seconds"]
            line.append(f"    ratio {figures['ratio']:.2f}x (ckptsel over lm-eval, target tok/s)")
            print("\n".join(line))
            out[name] = figures
            self.save()
            if not figures["agree"]:
                self.report["failures"][f"scoring/{name}"] = (
                    f"ckptsel and lm-eval disagree by {per_token.max():.1e} nats per token (allowed {tolerance:.0e})"
                )

    # ----------------------------------------------------------------------- sampling

    def sampling(self) -> None:
        import torch

        from ckptsel.measure.sampling import sample_seed, sample_token_ids

        model, tokenizer, plan, device = self.model, self.tokenizer, self.plan, self.device
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        settings = {"temperature": 0.8, "top_p": 0.95}
        # Longest first: a static cache sized by the first call then serves every later one (no recompiles).
        examples = sorted(bench.gsm8k_examples(plan.sample_questions), key=lambda ex: -len(tokenizer(ex.prompt)["input_ids"]))
        prompt_ids = [tokenizer(ex.prompt)["input_ids"] for ex in examples]
        rows = [ids for ids in prompt_ids for _ in range(plan.k)]
        seeds = [sample_seed(0, ex.uid, s) for ex in examples for s in range(plan.k)]
        mnt = plan.max_new_tokens
        out = self.report.setdefault("sampling", {"variants": {}})
        print(f"\n[sampling] {len(examples)} questions x k={plan.k}, max_new_tokens {mnt}, T=0.8, top-p 0.95, "
              f"prompts {sum(map(len, prompt_ids)) / len(prompt_ids):.0f} tokens on average; "
              f"compile backend {plan.compile_backend}")

        def ckptsel_side(m, questions=None):
            n = len(rows) if questions is None else questions * plan.k
            ids = sample_token_ids(m, rows[:n], seeds=seeds[:n], max_new_tokens=mnt, eos_ids={eos}, pad_id=pad,
                                   **settings)
            return sum(len(x) for x in ids)

        def generate_side(extra: dict, questions=None):
            total = 0
            for ids in prompt_ids[:questions]:
                prompt = torch.tensor([ids], device=device)
                gen = model.generate(
                    input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                    num_return_sequences=plan.k, max_new_tokens=mnt, eos_token_id=eos,
                    pad_token_id=pad, **settings, **extra,
                )
                for seq in gen[:, len(ids):].tolist():
                    total += seq.index(eos) if eos in seq else len(seq)
            return total

        compiled = {}

        def compiled_model():
            if "model" not in compiled:
                mode = "default" if plan.compile_backend != "inductor" else None
                compiled["model"] = torch.compile(model, dynamic=True, backend=plan.compile_backend, mode=mode)
            return compiled["model"]

        variants = {
            "ckptsel": (False, lambda q=None: ckptsel_side(model, q)),
            "generate": (False, lambda q=None: generate_side({}, q)),
            "generate_static": (False, lambda q=None: generate_side(
                {"cache_implementation": "static", "disable_compile": True}, q)),
            "generate_static_compile": (True, lambda q=None: generate_side(
                {"cache_implementation": "static", "compile_config": self._compile_config()}, q)),
            "ckptsel_compile": (True, lambda q=None: ckptsel_side(compiled_model(), q)),
        }
        ready, per_question = {}, {}
        warm = min(2, len(examples))  # questions in a warm-up: the longest ones
        for name, (compiles, fn) in variants.items():
            entry = out["variants"].setdefault(name, {})
            limit = plan.compile_limit_s
            if compiles and plan.deadline_s is not None:
                # What the timed runs will take, from the eager variants' warm-ups per question (x1.2 for safety;
                # ckptsel's batched sampler costs far less than that per question).
                reserve = 1.2 * plan.sample_repeats * len(examples) * sum(per_question.values())
                limit = min(limit, plan.deadline_s - self.elapsed() - reserve)
                if limit < 30:
                    entry["skipped"] = f"time: {self.elapsed():.0f} s gone, {reserve:.0f} s kept for the timed runs"
                    print(f"  {name:24} skipped ({entry['skipped']})", flush=True)
                    continue
            graphs = _dynamo_graphs()
            try:
                with self.measured() as m, _time_limit(limit if compiles else None):
                    # Two questions, not one: a batch of 1 would be compiled as a constant, and recompiled later.
                    fn(warm)
            except Exception as exc:  # noqa: BLE001 - a compiler error or the time limit must not lose the others
                entry["failed"] = _reason(exc)
                print(f"  {name:24} warm-up stopped: {entry['failed']}", flush=True)
                if compiles:
                    torch._dynamo.reset()
                else:
                    self.report["failures"][f"sampling/{name}"] = entry["failed"]
                continue
            entry["warmup_s"] = m["seconds"]
            if compiles:
                entry["graphs"], entry["graph_breaks"] = (a - b for a, b in zip(_dynamo_graphs(), graphs))
            else:
                per_question[name] = m["seconds"] / warm
            print(f"  {name:24} warmed up in {m['seconds']:.1f} s"
                  + (f" ({entry['graphs']} graphs, {entry['graph_breaks']} graph breaks)" if compiles else ""), flush=True)
            ready[name] = fn
        runs = self.interleaved({name: fn for name, fn in ready.items()}, plan.sample_repeats)
        for name, done in runs.items():
            rates = [r["value"] / r["seconds"] for r in done]
            memory = max((r["peak_mib"] for r in done), default=None) if device.type == "cuda" else None
            out["variants"][name].update(
                tok_s=bench.median(rates), tok_s_runs=rates, tokens=[r["value"] for r in done],
                seconds=[r["seconds"] for r in done], peak_mib=memory,
            )
        if "model" in compiled:
            torch._dynamo.reset()
        measured = {name: v for name, v in out["variants"].items() if "tok_s" in v}
        base = measured.get("generate", {}).get("tok_s")
        for name, v in measured.items():
            v["vs_generate"] = v["tok_s"] / base if base else None
            print(f"  {name:24} {v['tok_s']:10,.1f} generated tok/s"
                  + (f"  {v['vs_generate']:5.2f}x generate" if v["vs_generate"] else "")
                  + f"  warm-up {v['warmup_s']:6.1f} s"
                  + (f"  peak {v['peak_mib']:,.0f} MiB" if v["peak_mib"] is not None else "")
                  + f"  ({sum(v['tokens']):,} tokens in {', '.join(f'{s:.2f}' for s in v['seconds'])} s)")
        if measured:
            winner = max(measured, key=lambda n: measured[n]["tok_s"])
            slowest_win = min(measured[winner]["tok_s_runs"])
            others = [max(v["tok_s_runs"]) for n, v in measured.items() if n != winner]
            clear = plan.sample_repeats > 1 and all(slowest_win >= CLEAR_WIN * o for o in others)
            out["winner"], out["clear"] = winner, clear
            verdict = ("clearly (>= 10% over every other variant, every repeat)" if clear else
                       "not clearly (within 10%)" if plan.sample_repeats > 1 else "one repeat: not judged")
            print(f"  winner: {winner}, {verdict}"
                  + ("; keep it: ckptsel's sampler does not use it yet" if clear and winner != "ckptsel" else ""))

    def _compile_config(self):
        """transformers' automatic compile of the decoding step; forced on for the CPU, through ``compile_backend``."""
        from transformers import CompileConfig

        if self.plan.compile_backend == "inductor":
            config = CompileConfig()
        else:  # mode applies to inductor only
            config = CompileConfig(backend=self.plan.compile_backend, mode="default")
        if self.device.type != "cuda":
            config._compile_all_devices = True
        return config

    # ----------------------------------------------------------------------- rank

    def rank(self) -> None:
        from click.testing import CliRunner

        from ckptsel.cli import main as cli
        from ckptsel.discover import discover
        from ckptsel.lab.quick import train_tiny_run

        start = time.perf_counter()
        run = train_tiny_run(self.work / "lab", mode="lora", n_checkpoints=8, n_train=64)
        trained = time.perf_counter() - start
        n_ckpt = len(discover([run]))
        args = [
            "rank", str(run), "--data", str(run / "train.jsonl"), "--recipe", str(run / "recipe.yaml"),
            "--device", self.device.type, "--cache-dir", str(self.work / "cache"), "--json", "--quiet",
            *self.plan.rank_args,
        ]
        with self._phase_timers() as phases, self.measured() as m:
            result = CliRunner().invoke(cli, args)
        if result.exit_code != 0:
            raise RuntimeError(f"ckptsel rank exited {result.exit_code}: {result.output.strip()[-500:]}")
        ranked = json.loads(result.stdout)
        wall = m["seconds"]
        rest = wall - sum(phases.values())
        figures = {
            "checkpoints": n_ckpt, "ranked": len(ranked.get("checkpoints", [])), "train_s": trained, "wall_s": wall,
            "phases_s": {**phases, "rest": rest}, "peak_mib": m["peak_mib"], "args": args[1:],
        }
        self.report["rank"] = figures
        print(f"\n[rank] ckptsel rank, {n_ckpt} LoRA checkpoints of a lab run (trained here in {trained:.1f} s), "
              f"--device {self.device.type} {' '.join(self.plan.rank_args)}")
        print(f"  wall {wall:.2f} s" + (f", peak {m['peak_mib']:,.0f} MiB" if m["peak_mib"] is not None else ""))
        for name, seconds in figures["phases_s"].items():
            print(f"    {name:8} {seconds:7.2f} s  {100 * seconds / wall:5.1f}%")

    @contextmanager
    def _phase_timers(self):
        """Seconds in ``CheckpointLoader.load`` and in each ``kinds.KINDS`` measurement, while the block runs."""
        from ckptsel import kinds as measurement_kinds
        from ckptsel.measure.loading import CheckpointLoader

        phases: dict[str, float] = {"load": 0.0}

        def timed(name, fn):
            def wrapper(*a, **kw):
                self.sync()
                start = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    self.sync()
                    phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
            return wrapper

        kinds = dict(measurement_kinds.KINDS)
        original_load = CheckpointLoader.load
        CheckpointLoader.load = timed("load", original_load)
        for name, kind in kinds.items():
            measurement_kinds.KINDS[name] = dataclasses.replace(kind, measure=timed(name, kind.measure))
        try:
            yield phases
        finally:
            CheckpointLoader.load = original_load
            measurement_kinds.KINDS.update(kinds)


def _reason(exc: BaseException) -> str:
    """One line for ``exc``; a time limit hit inside the compiler (which wraps what it catches) is named as such."""
    seen = exc
    while seen is not None:
        if isinstance(seen, TimeoutError):
            return f"TimeoutError: {seen}"
        seen = seen.__cause__ or seen.__context__
    return (f"{type(exc).__name__}: {exc}".splitlines() or [type(exc).__name__])[0]


def _dynamo_graphs() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process, from dynamo's counters."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


@contextmanager
def _time_limit(seconds: float | None):
    """Raise TimeoutError in the block after ``seconds`` (main thread, POSIX); None: no limit."""
    import signal

    if seconds is None:
        yield
        return

    def stop(signum, frame):
        raise TimeoutError(f"over its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


if __name__ == "__main__":
    sys.exit(main())
