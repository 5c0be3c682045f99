"""Tokenizers: which one a checkpoint was trained with, and how a (prompt, target) pair becomes ids.

Two rules every measurement shares, so they live in one place:

* :func:`load_tokenizer` finds and reads a checkpoint's tokenizer offline: the folder's own
  tokenizer files, else (a LoRA adapter) its base model's, else (a Trainer run folder) the
  latest ``checkpoint-N`` that has them.
* :func:`encode_pairs` splits a rendered (prompt, target) pair into token ids the way TRL's
  ``SFTTrainer`` builds its training sequence. The trainer tokenises the prompt alone and the
  prompt followed by the completion as one text; the completion starts where the two token
  lists first differ. For BPE vocabularies that is not always the end of the prompt: a
  prompt ending in a space followed by a target starting with a word is ``': ', 'He'`` alone
  but ``':', ' He'`` together, and the trainer trains on the second (its ``' He'`` is a
  completion token). Scoring the parts tokenised separately would score a sequence the model
  never saw. Then the target's end: a text-template target is followed by the EOS token
  (``append_eos``; not twice when the target text already ends with it), a chat-rendered one
  by what the chat template writes after the assistant's content — ChatML's ``<|im_end|>\\n``,
  both tokens trained on — and no EOS besides (``ends``, see ``Example.end_of_turn``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from ckptsel.errors import CheckpointError, DataError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

TokenPair = tuple[list[int], list[int]]


# --------------------------------------------------------------------------- finding and loading


def load_tokenizer(source, *, trust_remote_code: bool = False):
    """The tokenizer ``source`` was trained with, read offline (nothing is downloaded).

    ``source`` is a :class:`~ckptsel.discover.Checkpoint` or a folder: a model or checkpoint
    folder, a LoRA adapter folder (its own tokenizer files, else its base model's: a folder, or
    a hub id found in the local Hugging Face cache), or a Trainer run folder (the latest
    ``checkpoint-N`` that has tokenizer files). Loaded without the model, so data can be
    rendered (chat templates) and budgets sized before any weights are read.
    """
    from transformers import AutoTokenizer

    where, candidate = tokenizer_source(source)
    try:
        return AutoTokenizer.from_pretrained(str(candidate), local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError, JSON errors...
        lines = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
        raise CheckpointError(f"{where}: cannot load the tokenizer from {candidate}: {reason}") from None


def tokenizer_source(source) -> tuple[Path, Path | str]:
    """(the folder asked about, where its tokenizer is read from): a folder, or a base model's name."""
    from ckptsel.discover import Checkpoint, resolve_base_model

    if isinstance(source, Checkpoint):
        if not has_tokenizer_files(source.path) and source.base_model:
            return source.path, resolve_base_model(source.base_model) or source.base_model
        return source.path, source.path
    path = Path(source)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder")
    for candidate in _candidates(path):
        if isinstance(candidate, str) or has_tokenizer_files(candidate):
            return path, candidate
    raise CheckpointError(f"{path}: no tokenizer files found (tokenizer.json or tokenizer_config.json)")


# The files a tokenizer is built from (by name prefix): tokenizer.json, tokenizer_config.json,
# special_tokens_map.json, vocab / merges files, added tokens, chat templates, and config.json, which
# AutoTokenizer reads for the model type when the tokenizer config does not name a class.
_TOKENIZER_PREFIXES = (
    "tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens", "chat_template", "config.json",
)


def tokenizer_digest(source) -> str:
    """A content digest of the files ``source``'s tokenizer is read from (:func:`tokenizer_source`).

    The one identity of a tokenizer: checkpoints with the same digest share one loaded tokenizer,
    and rendered training rows are stored under it. A base model known only by its name stands
    for itself.
    """
    import hashlib

    _, where = tokenizer_source(source)
    folder = Path(where)
    if not folder.is_dir():
        return f"name:{where}"
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name.startswith(_TOKENIZER_PREFIXES):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _candidates(path: Path) -> Iterator[Path | str]:
    """The folder itself, an adapter's base model, then a run's checkpoints, latest first."""
    from ckptsel.discover import resolve_base_model, step_dirs

    yield path
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file() and not has_tokenizer_files(path):
        try:
            config = json.loads(adapter_config.read_text())
        except (OSError, json.JSONDecodeError):
            config = {}
        base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
        if isinstance(base, str) and base:
            resolved = resolve_base_model(base, config.get("revision"))
            if resolved is not None:
                yield resolved
    for _, folder in reversed(step_dirs(path)):
        yield folder


# --------------------------------------------------------------------------- encoding


def encode_pairs(
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    append_eos: bool = True,
    ends: Sequence[str | None] | None = None,
) -> list[TokenPair]:
    """Token ids of each (prompt, target) pair, split where the trainer's completion mask starts.

    The prompt is encoded with the tokenizer's special tokens (a Llama tokenizer's BOS), and so
    is the prompt + target text; the target's ids are the joint encoding's after the longest
    common prefix of the two (see the module docstring). ``ends[i]``, when not None, is text
    the trainer's rendering puts after target i (a chat template's end of turn), encoded with
    it and scored, in place of the EOS; otherwise ``append_eos`` appends the EOS id.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    ends = [None] * len(prompts) if ends is None else list(ends)
    if len(ends) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(ends)} ends")
    if append_eos and any(e is None for e in ends) and tokenizer.eos_token_id is None:
        raise DataError("append_eos is set but the tokenizer has no EOS token")
    eos_text = tokenizer.eos_token
    texts = [p + t + (e or "") for p, t, e in zip(prompts, targets, ends)]
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True, verbose=False)["input_ids"]
    joint_ids = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    pairs = []
    for i, (p, joint) in enumerate(zip(prompt_ids, joint_ids)):
        n = common_prefix(p, joint)
        target = list(joint[n:])
        if ends[i] is None and append_eos and not (eos_text and targets[i].endswith(eos_text)):
            target.append(tokenizer.eos_token_id)
        if n == 0 and target:
            why = "empty prompt and the tokenizer adds no BOS" if not p else "the prompt's only token merges into the target"
            raise DataError(f"pair {i}: {why}, so the first target token has no context")
        pairs.append((list(joint[:n]), target))
    return pairs


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
