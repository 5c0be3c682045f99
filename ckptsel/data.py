"""Training data: load rows, detect fields, render (prompt, target) exactly as in training.

INTERFACE (other modules rely on it; keep these names and fields):

    Example                    one rendered training example (below)
    load_examples(path, recipe, tokenizer=None, skip_bad=False) -> list[Example]
    load_data(path, recipe, tokenizer=None, skip_bad=False) -> LoadedData   (+ fields, skipped rows)

Formats: JSONL (also a ``.json`` file holding JSON lines), JSON (a list of objects or
``{"data": [...]}``), Parquet, CSV/TSV, and a folder written by ``datasets.save_to_disk``
(a DatasetDict folder uses its ``train`` split).

Rendering, in order of precedence:

* **Templates** (the default): ``prompt_template.format(**row)`` and ``target_template.format(**row)``;
  placeholders are the row's field names, plus ``{question}``/``{answer}`` for the detected
  question and answer fields.
* **Chat template** (``DataSettings.chat_template``): prompt =
  ``tokenizer.apply_chat_template([system?, user: question], add_generation_prompt=True)``,
  target = the answer field as is; the text templates are not used.
* **Chat rows** (a ``messages`` list of ``{"role", "content"}``): the last assistant message is
  the target, the messages before it form the prompt, rendered with the tokenizer's chat
  template. Without a tokenizer (or one without a chat template) a plain fallback is used
  — one ``role: content`` line per message, then ``assistant:`` — and a warning is logged,
  since the trainer will have seen the chat template instead.

The prompt never starts with the BOS token's text: when a chat template writes it and the
tokenizer adds BOS itself, it is removed, so encoding ``prompt`` with special tokens gives one
BOS. EOS is not text either; the measurement engine appends its id (``DataSettings.append_eos``).
A chat-rendered example instead carries ``end_of_turn``, what the template writes after the
target (ChatML: ``<|im_end|>\n``): TRL trains on it and appends no EOS, so the engine scores
it in place of the EOS. How the pair becomes token ids is :func:`ckptsel.tokenizers.encode_pairs`.

``Example.index`` is the row's position in the file (0-based, counting rows that were skipped),
``Example.uid`` a hash of (prompt, target). Duplicate rows are kept as separate examples
(distinct index, same uid): the trainer saw them twice.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptsel.errors import DataError
from ckptsel.settings import DataSettings, Recipe
from ckptsel.tokenizers import encode_pairs, load_tokenizer  # noqa: F401  (load_tokenizer: one rule, re-exported)

log = logging.getLogger(__name__)

QUESTION_FIELDS = ("question", "problem", "prompt", "instruction", "input", "query")
ANSWER_FIELDS = ("answer", "solution", "response", "output", "completion")
MESSAGES_FIELD = "messages"


@dataclass(frozen=True)
class Example:
    """One training example, rendered exactly as the trainer saw it.

    ``prompt`` and ``target`` are text; the EOS token (when the recipe appends it) is added
    as a token id at tokenisation time, not as text. ``reference`` is the raw target
    solution handed to the grader. ``uid`` is a content hash of (prompt, target), stable
    across runs and file reorderings, used as the result-store key.
    """

    index: int
    uid: str
    question: str
    reference: str
    prompt: str
    target: str
    # Chat renderings: what the chat template writes after the target (ChatML's "<|im_end|>\n").
    # The trainer trains on it, so it is scored after the target instead of an appended EOS.
    # None for text templates, where ``DataSettings.append_eos`` decides.
    end_of_turn: str | None = None


@dataclass(frozen=True)
class Row:
    """One raw row of a data file, or the reason it could not be read."""

    index: int                      # position among the file's rows, 0-based
    where: str                      # "file:line" for line-based formats, "file: row N" otherwise
    values: dict[str, Any] | None
    error: str | None = None


@dataclass(frozen=True)
class Fields:
    """Which fields hold the question and the answer, or the chat messages."""

    question: str | None
    answer: str | None
    messages: str | None = None

    def describe(self) -> str:
        if self.messages:
            return f"chat rows ({self.messages!r})"
        return f"{self.question!r} -> {self.answer!r}"


@dataclass
class LoadedData:
    """What :func:`load_data` found: the examples, how they were read, and the rows it skipped."""

    path: Path
    examples: list[Example]
    fields: Fields
    rendering: str                  # "templates" | "chat template" | "plain chat fallback"
    n_rows: int
    skipped: list[str] = field(default_factory=list)   # one message per skipped row


def uid_of(prompt: str, target: str) -> str:
    """Stable content key of a rendered example: sha1 of prompt and target, 16 hex digits."""
    return hashlib.sha1(f"{prompt}\x00{target}".encode()).hexdigest()[:16]


def load_examples(path, recipe: Recipe, tokenizer=None, skip_bad: bool = False) -> list[Example]:
    """The rendered examples of a data file (see :func:`load_data` for the skipped rows)."""
    return load_data(path, recipe, tokenizer=tokenizer, skip_bad=skip_bad).examples


def load_data(path, recipe: Recipe, tokenizer=None, skip_bad: bool = False) -> LoadedData:
    """Read, detect fields and render every row of ``path`` with ``recipe.data``.

    A bad row raises :class:`DataError` naming the file, line and problem; with ``skip_bad``
    it is left out and its message kept in ``LoadedData.skipped``. Problems with the file or
    the settings (unreadable file, template field absent from the data) always raise.
    """
    path = Path(path)
    rows = list(read_rows(path))
    if not rows:
        raise DataError(f"{path}: no rows")
    if not skip_bad:
        first_bad = next((r for r in rows if r.error is not None), None)
        if first_bad is not None:
            raise DataError(f"{first_bad.where}: {first_bad.error}")
    columns = _columns(rows)
    fields = detect_fields(columns, recipe.data, path)
    render, rendering = _renderer(fields, columns, recipe.data, tokenizer, path)

    examples: list[Example] = []
    skipped: list[str] = []
    for row in rows:
        try:
            if row.error is not None:
                raise DataError(f"{row.where}: {row.error}")
            examples.append(render(row))
        except DataError as exc:
            if not skip_bad:
                raise
            skipped.append(str(exc))
    if skipped:
        log.warning("%s: skipped %d bad row(s); first: %s", path, len(skipped), skipped[0])
    if not examples:
        raise DataError(f"{path}: no usable rows ({len(skipped)} skipped)")
    return LoadedData(path, examples, fields, rendering, len(rows), skipped)


# --------------------------------------------------------------------------- reading


def read_rows(path) -> Iterator[Row]:
    """Rows of a data file as dicts, with where each one is; unparsable rows carry an error."""
    path = Path(path)
    if path.is_dir():
        yield from _read_saved_dataset(path)
        return
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    elif suffix in (".csv", ".tsv"):
        yield from _read_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        raise DataError(
            f"{path}: unsupported data format {suffix or '(no suffix)'!r} "
            "(use .jsonl, .json, .parquet, .csv, .tsv or a datasets.save_to_disk folder)"
        )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _read_jsonl(path: Path, text: str | None = None) -> Iterator[Row]:
    text = _read_text(path) if text is None else text
    index = 0
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028 or U+0085.
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Row(index, where, None, f"invalid JSON ({exc.msg} at column {exc.colno})")
        else:
            yield _object_row(index, where, value)
        index += 1


def _read_json(path: Path) -> Iterator[Row]:
    text = _read_text(path)
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines in a .json file
            yield from _read_jsonl(path, text)
            return
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):
        payload = payload["data"]
    if not isinstance(payload, list):
        raise DataError(f"{path}: expected a JSON list of objects or {{\"data\": [...]}}, got {type(payload).__name__}")
    for index, value in enumerate(payload):
        yield _object_row(index, f"{path}: item {index + 1}", value)


def _object_row(index: int, where: str, value: Any) -> Row:
    if not isinstance(value, dict):
        return Row(index, where, None, f"expected a JSON object, got {type(value).__name__}")
    return Row(index, where, value)


def _read_csv(path: Path, delimiter: str) -> Iterator[Row]:
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        start = 2  # line 1 is the header; a quoted field may span several lines
        for index, record in enumerate(reader):
            record.pop(None, None)  # cells beyond the header
            yield Row(index, f"{path}:{start}", record)
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: invalid CSV ({exc})") from None


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    for index, record in enumerate(records):
        yield Row(index, f"{path}: row {index + 1}", record)


def _read_saved_dataset(path: Path) -> Iterator[Row]:
    if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise DataError(f"{path}: a folder, but not one written by datasets.save_to_disk")
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a damaged folder
        raise DataError(f"{path}: cannot load saved dataset ({str(exc).splitlines()[0]})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(dataset)}); give one split's folder")
        log.info("%s: using the 'train' split of %s", path, ", ".join(dataset))
        dataset = dataset["train"]
    for index, record in enumerate(dataset.to_list()):
        yield Row(index, f"{path}: row {index + 1}", record)


# --------------------------------------------------------------------------- fields


def _columns(rows: list[Row]) -> list[str]:
    """Field names over all readable rows, in order of first appearance."""
    seen: dict[str, None] = {}
    for row in rows:
        if row.values is not None:
            seen.update(dict.fromkeys(row.values))
    return list(seen)


def detect_fields(columns, settings: DataSettings, path) -> Fields:
    """Which columns hold question and answer: the settings' names, else the usual names, else chat messages."""
    columns = list(columns)
    for name, kind in ((settings.question_field, "question"), (settings.answer_field, "answer")):
        if name is not None and name not in columns:
            raise DataError(f"{path}: {kind} field {name!r} not in the data (fields: {', '.join(columns)})")
    question = settings.question_field or _first(QUESTION_FIELDS, columns, exclude=settings.answer_field)
    answer = settings.answer_field or _first(ANSWER_FIELDS, columns, exclude=question)
    explicit = settings.question_field or settings.answer_field
    if MESSAGES_FIELD in columns and not explicit and not (question and answer):
        return Fields(None, None, MESSAGES_FIELD)
    if question is None or answer is None:
        missing = "question" if question is None else "answer"
        options = QUESTION_FIELDS if question is None else ANSWER_FIELDS
        raise DataError(
            f"{path}: no {missing} field found (fields: {', '.join(columns)}; looked for {', '.join(options)}); "
            f"name it with --{missing}-field"
        )
    return Fields(question, answer)


def _first(candidates, columns, exclude=None) -> str | None:
    return next((c for c in candidates if c in columns and c != exclude), None)


def placeholders(template: str, what: str) -> list[str]:
    """Field names a template uses; only plain names are allowed (no ``{}``, ``{0}``, ``{a.b}``)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise DataError(f"{what} {template!r} is not a valid template ({exc}); write {{{{ and }}}} for literal braces") from None
    names = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        # Column names with spaces or dashes are fine: format() reads them as one key.
        if not name or name.isdigit() or any(c in name for c in ".[]"):
            raise DataError(f"{what} {template!r}: placeholder {{{name}}} must be a field name")
        names.append(name)
    return names


# --------------------------------------------------------------------------- rendering


def _renderer(fields: Fields, columns, settings: DataSettings, tokenizer, path) -> tuple[Callable[[Row], Example], str]:
    """The function turning one row into an Example, and the name of the rendering used."""
    has_chat_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if settings.chat_template and not has_chat_template:
        why = "no tokenizer was given" if tokenizer is None else "the tokenizer has no chat template"
        raise DataError(f"{path}: chat-template rendering was asked for, but {why} (give --tokenizer or --checkpoint)")

    if fields.messages:
        if has_chat_template:
            return (lambda row: _render_messages(row, fields.messages, tokenizer)), "chat template"
        log.warning(
            "%s: chat rows rendered as plain 'role: content' lines (no chat template); "
            "give the checkpoint's tokenizer to render them as in training",
            path,
        )
        return (lambda row: _render_messages(row, fields.messages, None)), "plain chat fallback"

    if settings.chat_template:
        return (lambda row: _render_chat_qa(row, fields, settings.system_prompt, tokenizer)), "chat template"

    aliases = {"question": fields.question, "answer": fields.answer}
    used: set[str] = set()
    for what, template in (("prompt template", settings.prompt_template), ("target template", settings.target_template)):
        for name in placeholders(template, what):
            if name not in aliases and name not in columns:
                raise DataError(
                    f"{path}: {what} uses {{{name}}}, which is not a field of the data "
                    f"(fields: {', '.join(columns)}; plus {{question}} and {{answer}})"
                )
            used.add(aliases.get(name, name))
    needed = [fields.question, fields.answer, *sorted(used - {fields.question, fields.answer})]

    def render(row: Row) -> Example:
        values = {name: _text_field(row, name) for name in needed}
        values["question"], values["answer"] = values[fields.question], values[fields.answer]
        prompt = settings.prompt_template.format_map(values)
        target = settings.target_template.format_map(values)
        return Example(row.index, uid_of(prompt, target), values["question"], values["answer"], prompt, target)

    return render, "templates"


def _text_field(row: Row, name: str) -> str:
    if name not in row.values:
        raise DataError(f"{row.where}: missing field {name!r}")
    value = row.values[name]
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise DataError(f"{row.where}: field {name!r} is {kind}, expected a string")
    return value


def _render_chat_qa(row: Row, fields: Fields, system_prompt: str | None, tokenizer) -> Example:
    question, answer = _text_field(row, fields.question), _text_field(row, fields.answer)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question})
    prompt = _apply_chat_template(messages, tokenizer, row)
    end = _end_of_turn(messages, prompt, answer, tokenizer, row)
    return Example(row.index, _chat_uid(prompt, answer, end), question, answer, prompt, answer, end)


def _render_messages(row: Row, name: str, tokenizer) -> Example:
    messages = row.values.get(name)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{row.where}: field {name!r} must be a non-empty list of messages")
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise DataError(f"{row.where}: {name} item {i} needs string 'role' and 'content'")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(f"{row.where}: {name} has no assistant message to use as the target")
    context = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    target = messages[last]["content"]
    question = next((m["content"] for m in reversed(context) if m["role"] == "user"), "")
    end = None
    if tokenizer is None:
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in context) + "assistant:"
        target = f" {target}"
    else:
        prompt = _apply_chat_template(context, tokenizer, row)
        end = _end_of_turn(context, prompt, target, tokenizer, row, role=messages[last]["role"])
    return Example(row.index, _chat_uid(prompt, target, end), question, messages[last]["content"], prompt, target, end)


def _apply_chat_template(messages: list[dict], tokenizer, row: Row, add_generation_prompt: bool = True) -> str:
    try:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises its own types (e.g. "roles must alternate")
        raise DataError(f"{row.where}: the chat template failed ({str(exc).splitlines()[0]})") from None
    return _strip_bos_text(prompt, tokenizer)


def _end_of_turn(context: list[dict], prompt: str, target: str, tokenizer, row: Row, role: str = "assistant") -> str | None:
    """What the chat template writes after the target, as TRL trains a conversational prompt/completion.

    TRL's ``SFTTrainer`` renders the whole conversation (no generation prompt) and trains on
    every token after the rendered prompt: the target and the template's end of turn (ChatML:
    ``<|im_end|>`` and the newline after it), with no EOS of its own. None, with a warning,
    when the full rendering does not continue the prompt with the target (a template that
    renders the last turn differently, or trims it); the EOS rule applies then.
    """
    full = _apply_chat_template([*context, {"role": role, "content": target}], tokenizer, row, add_generation_prompt=False)
    if full.startswith(prompt + target):
        return full[len(prompt) + len(target):]
    if id(tokenizer) not in _WARNED_SPLIT:  # once per tokenizer: it holds for every row
        _WARNED_SPLIT.add(id(tokenizer))
        log.warning(
            "%s: the chat template does not render the conversation as the prompt followed by the target; "
            "scoring the target with an appended EOS, which may differ from the trained-on tokens",
            row.where,
        )
    return None


_WARNED_SPLIT: set[int] = set()


def _chat_uid(prompt: str, target: str, end: str | None) -> str:
    """A chat example's key covers the end of turn it is scored with (results scored without it stay apart)."""
    return uid_of(prompt, target if end is None else target + end)


def _strip_bos_text(prompt: str, tokenizer) -> str:
    """Drop a leading BOS string that the tokenizer would add again when encoding."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and prompt.startswith(bos) and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]:
        return prompt[len(bos):]
    return prompt


# --------------------------------------------------------------------------- inspection


def token_lengths(examples: list[Example], tokenizer, append_eos: bool) -> dict[str, list[int]]:
    """Prompt, target and total token counts per example, as the measurement engine sees them.

    Split as :func:`ckptsel.tokenizers.encode_pairs` splits them: the prompt with its special
    tokens (BOS), the target with the EOS or the chat template's end of turn.
    """
    pairs = encode_pairs(
        tokenizer, [e.prompt for e in examples], [e.target for e in examples],
        append_eos=append_eos, ends=[e.end_of_turn for e in examples],
    )
    prompt = [len(p) for p, _ in pairs]
    target = [len(t) for _, t in pairs]
    return {"prompt": prompt, "target": target, "total": [p + t for p, t in zip(prompt, target)]}


def length_summary(values) -> dict[str, float]:
    """Mean, median, 95th percentile (linear interpolation) and maximum of a list of lengths."""
    import numpy as np

    array = np.asarray(values, dtype=float)
    if array.size == 0:
        raise ValueError("length_summary needs at least one value")
    return {
        "mean": float(array.mean()),
        "p50": float(np.percentile(array, 50)),
        "p95": float(np.percentile(array, 95)),
        "max": float(array.max()),
    }


@dataclass(frozen=True)
class GraderCoverage:
    """How well a grader reads the references: a template/grader mismatch shows up here."""

    total: int
    parsed: int          # extract(reference) found an answer
    self_graded: int     # grader(reference, reference) is True
    unparsed: list[int]  # indices of the examples whose reference gave no answer


def grader_coverage(examples: list[Example], grader) -> GraderCoverage:
    """Count references the grader can parse and grade equal to themselves."""
    parsed = self_graded = 0
    unparsed = []
    for example in examples:
        if grader.extract(example.reference) is not None:
            parsed += 1
        else:
            unparsed.append(example.index)
        self_graded += bool(grader(example.reference, example.reference))
    return GraderCoverage(len(examples), parsed, self_graded, unparsed)
