"""DeepSpeed ZeRO checkpoints (stages 1-3), as ``engine.save_checkpoint`` and the Trainer write them.

Layout: a Trainer ``checkpoint-N/`` (``config.json``, the tokenizer, a ``latest`` file naming the tag
folder, a copied ``zero_to_fp32.py``) holding ``global_stepN/`` with the shards:

    mp_rank_00_model_states.pt                      stages 1-2: module (16-bit) weights, parameter shapes
    zero_pp_rank_R_mp_rank_00_model_states.pt       stage 3: one per data-parallel rank, no weights
    zero_pp_rank_R_mp_rank_00_optim_states.pt       every stage: rank R's partition of the fp32 master weights
                                                    (and the optimizer's moments)

With ZeRO-3 and ``stage3_gather_16bit_weights_on_model_save=false`` (the default) no consolidated
weight file exists; when the Trainer did write ``model.safetensors`` beside ``global_stepN/`` (ZeRO-1/2,
or ZeRO-3 with that option on), the folder is an ordinary safetensors checkpoint (the registry tries
that format first). A tag folder given on its own (``run/global_stepN/`` from a DeepSpeed loop, GPT-NeoX)
is read the same way, its config from the run folder or ``--base-model``.

Listing reads the shards' pickles without running them (:func:`ckptsel.formats.files.read_torch_pickle`):
the world size, the stage, the parameter shapes, and whether every rank's shard is there and from the
same run. Loading converts once into the cache (ckptsel/formats/converted.py) with DeepSpeed's own
``zero_to_fp32`` routines on CPU (the extra ``ckptsel[deepspeed]``; ZeRO-1/2 with its readers and a writer
of ours that keeps one copy of the weights, :func:`_convert_zero12`): the shards are pickles, so this
needs ``--allow-pickle``, and every ``torch.load`` DeepSpeed makes runs with ``weights_only=True``
(forced by torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), with only DeepSpeed's loss-scaler, stage-enum and
fragment-address classes allowed besides tensors. The copy holds the fp32 master weights.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import re
from pathlib import Path

from ckptsel.errors import CheckpointError, CkptselError
from ckptsel.formats.base import Checkpoint, LoadOptions
from ckptsel.formats.converted import converted_copy, env_set
from ckptsel.formats.files import read_torch_pickle
from ckptsel.formats.hf import ConvertedFolder, copy_model_files, describe_from, model_source

LATEST = "latest"
OPTIM = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
MODEL = re.compile(r"(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt")
INSTALL = "pip install 'ckptsel[deepspeed]'"
# Classes DeepSpeed pickles into its shards besides tensors and containers: allowed in its weights_only loads.
_DEEPSPEED_GLOBALS = (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                      ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                      ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                      ("deepspeed.utils.tensor_fragment", "fragment_address"))


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def _has_states(folder: Path) -> bool:
    return any(folder.glob("*_model_states.pt"))


class DeepSpeedZero(ConvertedFolder):
    name = "deepspeed-zero"
    fingerprint_tag = "deepspeed-zero"
    kind = "full"
    looks_for = "global_stepN/ (DeepSpeed)"

    def detect(self, folder: Path) -> bool:
        if _has_states(folder):  # the tag folder itself
            return True
        if not (folder / LATEST).is_file():
            return False
        tags = [p for p in folder.iterdir() if p.is_dir() and _has_states(p)]
        # A folder of several tag folders is a run of them (ckptsel/discover.py), not one checkpoint.
        return len(tags) == 1 or (not tags and (folder / "zero_to_fp32.py").is_file())

    def owns(self, folder: Path) -> list[Path]:
        return [] if _has_states(folder) else [p for p in folder.iterdir() if p.is_dir() and _has_states(p)]

    def tag_folder(self, ckpt: Checkpoint) -> Path:
        """The folder with the shards: the checkpoint's own, or the one its ``latest`` file names."""
        if _has_states(ckpt.path):
            return ckpt.path
        tag = (ckpt.path / LATEST).read_text(errors="replace").strip()
        if not tag or "/" in tag or tag in (".", ".."):
            raise CheckpointError(f"{LATEST}: does not name a tag folder ({tag!r})")
        if not (ckpt.path / tag).is_dir():
            raise CheckpointError(f"{LATEST} names {tag}/, which is missing")
        if not _has_states(ckpt.path / tag):
            raise CheckpointError(f"{tag}/: no *_model_states.pt (an interrupted save?)")
        return ckpt.path / tag

    def describe(self, ckpt: Checkpoint, base_model: str | None) -> None:
        folder = self.tag_folder(ckpt)
        tag = folder.name
        optim, model = _shards(folder, OPTIM), _shards(folder, MODEL)
        if any(mp for _, mp in [*optim, *model]):
            raise CheckpointError(f"{tag}/: model-parallel shards (mp_rank > 0); DeepSpeed's conversion reads "
                                  "data-parallel ZeRO checkpoints only")
        if not optim:
            raise CheckpointError(f"{tag}/: no *_optim_states.pt (ZeRO keeps the fp32 weights there; was the "
                                  "checkpoint saved without its optimizer?)")
        states = _read(folder, _names(folder, MODEL)[0])
        world = states.get("dp_world_size") if isinstance(states, dict) else None
        if not isinstance(world, int) or world < 1:
            raise CheckpointError(f"{tag}/{_names(folder, MODEL)[0]}: no dp_world_size (not a DeepSpeed checkpoint?)")
        stage = _stage(states)
        expected = set(range(world))
        ranks = {r for r, _ in optim}
        if missing := sorted(expected - ranks):
            raise CheckpointError(f"{tag}/zero_pp_rank_{missing[0]}_mp_rank_00_optim_states.pt: missing (rank "
                                  f"{missing[0]} of {world}; a rank did not finish saving)")
        per_rank_model = {int(r) for r, _ in model if r is not None}
        if per_rank_model:
            stage = 3
            if missing := sorted(expected - per_rank_model):
                raise CheckpointError(f"{tag}/zero_pp_rank_{missing[0]}_mp_rank_00_model_states.pt: missing (rank "
                                      f"{missing[0]} of {world})")
        if ranks - expected or per_rank_model - expected:
            extra = sorted((ranks | per_rank_model) - expected)[0]
            raise CheckpointError(f"{tag}/zero_pp_rank_{extra}_mp_rank_00_optim_states.pt: shards of another world "
                                  f"size ({len(ranks)} optimizer shards, mp_rank_00 says dp_world_size {world})")
        for name in _names(folder, OPTIM):  # every shard from a run of this world size
            part = _partition_count(_read(folder, name))
            if part is not None and part != world:
                raise CheckpointError(f"{tag}/{name}: a shard of a {part}-rank run among {world}-rank shards")
        ckpt.weight_files = [folder / n for n in sorted(_names(folder, MODEL) + _names(folder, OPTIM))]
        ckpt.weight_format = "pickle"
        shapes = [s for group in states.get("param_shapes") or [] if isinstance(group, dict) for s in group.values()]
        ckpt.num_parameters = sum(math.prod(s) for s in shapes if isinstance(s, tuple)) or None
        ckpt.dtype = "float32"  # the conversion rebuilds the fp32 master weights
        describe_from(ckpt, model_source(ckpt, base_model))
        ckpt.notes.append(f"ZeRO-{stage or '?'}: converted once with DeepSpeed's zero_to_fp32 (needs --allow-pickle)")
        if not deepspeed_installed():
            ckpt.notes.append(f"DeepSpeed is not installed: {INSTALL}")

    def label(self, ckpt: Checkpoint) -> str:
        ranks = sum(1 for f in ckpt.weight_files if OPTIM.fullmatch(f.name))
        stage = "3" if any(f.name.startswith("zero_pp_rank_") and MODEL.fullmatch(f.name) for f in ckpt.weight_files) \
            else "1/2"
        return f"DeepSpeed ZeRO-{stage}, {ranks} rank{'s' * (ranks != 1)} → converted copy"

    def check_load(self, ckpt: Checkpoint, options: LoadOptions) -> None:
        if not options.allow_pickle:
            raise CheckpointError(f"{ckpt.path}: DeepSpeed's .pt shards are pickles; pass --allow-pickle to convert "
                                  "them (read with weights_only=True)")
        if not deepspeed_installed():
            # The same for every ZeRO checkpoint: a usage error (exit 2), not a broken checkpoint.
            raise CkptselError(f"{ckpt.path}: reading DeepSpeed ZeRO checkpoints needs DeepSpeed: {INSTALL}")

    def model_folder(self, ckpt: Checkpoint, options: LoadOptions) -> Path:
        self.check_load(ckpt, options)
        folder = self.tag_folder(ckpt)

        def convert(out: Path) -> None:
            import inspect

            from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

            if "safe_serialization" not in inspect.signature(convert_zero_checkpoint_to_fp32_state_dict).parameters:
                raise CkptselError(f"this DeepSpeed's zero_to_fp32 cannot write safetensors; upgrade it: {INSTALL}")
            try:
                with _weights_only():
                    if not _convert_zero12(folder, out):  # ZeRO-3 (or frozen parameters): DeepSpeed's own writer
                        convert_zero_checkpoint_to_fp32_state_dict(str(folder.parent), str(out), max_shard_size="2GB",
                                                                   safe_serialization=True, tag=folder.name)
            except (ValueError, FileNotFoundError, RuntimeError, KeyError, EOFError) as exc:
                lines = str(exc).strip().splitlines()
                raise CheckpointError(f"{ckpt.path.name}/{folder.name}: DeepSpeed's conversion failed: "
                                      f"{lines[0][:200] if lines else type(exc).__name__}") from None
            copy_model_files(ckpt, out)

        return converted_copy(ckpt, options.cache_dir, convert, what="DeepSpeed zero_to_fp32 → safetensors")


MAX_SHARD_BYTES = 2 * 10**9  # DeepSpeed's converter's "2GB"


def _convert_zero12(folder: Path, out: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> bool:
    """Write a ZeRO-1/2 checkpoint's fp32 weights into ``out`` as safetensors; False (nothing written) for what this
    does not handle (ZeRO-3, frozen parameters), which DeepSpeed's ``convert_zero_checkpoint_to_fp32_state_dict``
    then converts.

    DeepSpeed's own reader is used for the shards (``parse_model_states``, ``parse_optim_states``: the optimizer
    shards memory-mapped, their moments never read), but not its ZeRO-1/2 writer, which concatenates every rank's
    fp32 partition into one new vector before writing: a second copy of the weights beside the mapped shards
    (peak RSS 2.0x the weights; benchmarks/convert_cost.py). Here each parameter is a view into the mapped
    partition that holds it (a copy only for one split between two ranks' partitions), written shard by shard,
    so the peak stays near one copy of the weights.
    """
    import math

    from deepspeed.utils import zero_to_fp32
    from safetensors.torch import save_file

    states = zero_to_fp32.parse_model_states(zero_to_fp32.get_model_state_files(str(folder)))
    stage, world, flat_groups, paddings = zero_to_fp32.parse_optim_states(zero_to_fp32.get_optim_files(str(folder)),
                                                                         str(folder))
    state = states[0]
    if stage > 2 or state.frozen_param_shapes:
        return False
    tensors = dict(state.buffers)
    for g, shapes in enumerate(state.param_shapes):
        parts = [flat_groups[rank][g] for rank in range(world)]
        starts = [0]
        for part in parts:
            starts.append(starts[-1] + part.numel())
        offset = 0
        for n, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            tensors[name] = _span(parts, starts, offset, numel).view(tuple(shape))
            offset += numel + (paddings[g][n] if paddings is not None else 0)
        align = 2 * world  # DeepSpeed pads each group to a multiple of 2 x world size
        if -(-offset // align) * align != -(-starts[-1] // align) * align:
            raise CheckpointError(f"{folder.name}: parameter group {g} holds {starts[-1]} numbers, its parameters "
                                  f"take {offset}")
    for alias, source in state.shared_params:  # tied weights: safetensors stores each name's own copy
        if source in tensors:
            tensors[alias] = tensors[source].clone()
    shards: list[dict] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map = {}
    for shard, file in zip(shards, names):
        save_file(shard, str(out / file), metadata={"format": "pt"})  # reads the mapped pages, writes, keeps nothing
        weight_map.update(dict.fromkeys(shard, file))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    del tensors, shards, flat_groups
    return True


def _span(parts: list, starts: list[int], offset: int, numel: int):
    """Numbers ``offset`` to ``offset + numel`` of the concatenation of ``parts`` (1-D tensors starting at
    ``starts``): a view of the one part that holds them, else a copy of the pieces."""
    import torch

    pieces = []
    for part, start, end in zip(parts, starts, starts[1:]):
        lo, hi = max(offset, start), min(offset + numel, end)
        if lo < hi:
            pieces.append(part.narrow(0, lo - start, hi - lo))
    if sum(p.numel() for p in pieces) != numel:
        raise CheckpointError(f"a parameter runs past the ranks' fp32 partitions (numbers {offset}-{offset + numel})")
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _read(folder: Path, name: str):
    """A shard's pickle, read without running it; its errors name the tag folder too."""
    try:
        return read_torch_pickle(folder / name)
    except CheckpointError as exc:
        raise CheckpointError(f"{folder.name}/{exc}") from None


def _shards(folder: Path, pattern: re.Pattern) -> list[tuple[int | None, int]]:
    """(data-parallel rank or None, model-parallel rank) of each shard file matching ``pattern``."""
    out = []
    for name in _names(folder, pattern):
        m = pattern.fullmatch(name)
        out.append((int(m[1]) if m[1] is not None else None, int(m[2])))
    return out


def _names(folder: Path, pattern: re.Pattern) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if pattern.fullmatch(p.name))


def _stage(states) -> int | None:
    zero = (states.get("ds_config") or {}).get("zero_optimization") if isinstance(states, dict) else None
    stage = zero.get("stage") if isinstance(zero, dict) else None
    return stage if isinstance(stage, int) else None


def _partition_count(optim) -> int | None:
    inner = optim.get("optimizer_state_dict") if isinstance(optim, dict) else None
    count = inner.get("partition_count") if isinstance(inner, dict) else None
    if isinstance(count, list):  # ZeRO-1/2: one per parameter group (expert groups may differ)
        count = max((c for c in count if isinstance(c, int)), default=None)
    return count if isinstance(count, int) else None


@contextlib.contextmanager
def _weights_only():
    """Every ``torch.load`` in the block with ``weights_only=True``, whatever its caller passes, and
    DeepSpeed's few pickled classes allowed."""
    import importlib

    import torch

    allowed = []
    for module, name in _DEEPSPEED_GLOBALS:
        with contextlib.suppress(ImportError, AttributeError):
            allowed.append(getattr(importlib.import_module(module), name))
    with env_set("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1"), torch.serialization.safe_globals(allowed):
        yield


DEEPSPEED_ZERO = DeepSpeedZero()
