"""Training data: every format reads the same rows, rendering matches training exactly, bad rows say where."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest

from ckptsel.data import (
    Example,
    grader_coverage,
    length_summary,
    load_data,
    load_examples,
    load_tokenizer,
    token_lengths,
    uid_of,
)
from ckptsel.errors import CheckpointError, DataError
from ckptsel.recipes import load_recipe
from ckptsel.settings import DataSettings, Recipe

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared beside the repo
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared GSM8K/MATH data not present")

ROWS = [
    {"question": "What is 2+3?", "answer": "2+3=5\n#### 5", "source": "a"},
    {"question": "What is 7*6?", "answer": "7*6=42\n#### 42", "source": "b"},
    {"question": "Say, \"hi\"\nthen stop.", "answer": "hi\n#### 0", "source": "c"},
]


def recipe(**data) -> Recipe:
    return Recipe(data=DataSettings(**data))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- real data


@needs_shared
def test_gsm8k_row_renders_exactly_as_in_training():
    examples = load_examples(SHARED / "gsm8k/train.jsonl", load_recipe("gsm8k"))
    assert len(examples) == 7473
    first = examples[0]
    assert first.prompt == (
        "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?\nAnswer:"
    )
    assert first.target == (
        " Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
    )
    assert first.reference == first.target[1:]
    assert (first.index, first.uid) == (0, uid_of(first.prompt, first.target))


@needs_shared
def test_math_row_renders_exactly_as_in_training():
    examples = load_examples(SHARED / "math/train.jsonl", load_recipe("math"))
    assert len(examples) == 7500
    second = examples[1]
    assert second.prompt == "Problem: If $A=2+i$, $O=-4$, $P=-i$, and $S=2+4i$, find $A-O+P+S$.\nSolution:"
    assert second.target == " Adding real parts and imaginary parts separately, we have $(2-(-4)+0+2)+(1+0-1+4)i=\\boxed{8+4i}$."
    assert second.question == "If $A=2+i$, $O=-4$, $P=-i$, and $S=2+4i$, find $A-O+P+S$."


@needs_shared
def test_math_fields_are_detected_without_a_recipe_and_extra_fields_are_placeholders():
    loaded = load_data(
        SHARED / "math/test.jsonl",
        recipe(prompt_template="[{type}, {level}] {question}\n", target_template="{answer}"),
    )
    assert (loaded.fields.question, loaded.fields.answer, loaded.n_rows) == ("problem", "solution", 5000)
    assert loaded.examples[0].prompt == (
        "[Algebra, Level 3] How many vertical asymptotes does the graph of $y=\\frac{2}{x^2+x-6}$ have?\n"
    )


# --------------------------------------------------------------------------- formats


def _write_all_formats(folder: Path) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {
        "jsonl": write_jsonl(folder / "d.jsonl", ROWS),
        "json-list": folder / "list.json",
        "json-data": folder / "data.json",
        "json-lines": write_jsonl(folder / "lines.json", ROWS),
        "parquet": folder / "d.parquet",
        "csv": folder / "d.csv",
        "tsv": folder / "d.tsv",
        "saved": folder / "saved",
        "saved-dict": folder / "saved-dict",
    }
    paths["json-list"].write_text(json.dumps(ROWS, indent=1))
    paths["json-data"].write_text(json.dumps({"data": ROWS}))
    pq.write_table(pa.Table.from_pylist(ROWS), paths["parquet"])
    for key, delimiter in (("csv", ","), ("tsv", "\t")):
        with open(paths[key], "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(ROWS[0]), delimiter=delimiter)
            writer.writeheader()
            writer.writerows(ROWS)
    datasets.Dataset.from_list(ROWS).save_to_disk(str(paths["saved"]))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    ).save_to_disk(str(paths["saved-dict"]))
    return paths


def test_every_format_gives_the_same_examples(tmp_path):
    settings = recipe(prompt_template="Q: {question} ({source})\nA:", target_template=" {answer}")
    results = {kind: load_examples(path, settings) for kind, path in _write_all_formats(tmp_path).items()}
    expected = results.pop("jsonl")
    assert [e.prompt for e in expected] == [
        "Q: What is 2+3? (a)\nA:", "Q: What is 7*6? (b)\nA:", 'Q: Say, "hi"\nthen stop. (c)\nA:',
    ]
    assert [e.index for e in expected] == [0, 1, 2]
    for kind, examples in results.items():
        assert examples == expected, kind


def test_csv_rows_are_located_by_their_first_line(tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["question", "answer"])
        writer.writerow(["multi\nline", "#### 1"])   # lines 2-3
        writer.writerow(["q", ""])                    # line 4: empty answer is a string, fine
        fh.write("q3\n")                              # line 5: no answer cell
    with pytest.raises(DataError) as info:
        load_examples(path, recipe())
    assert str(info.value) == f"{path}:5: field 'answer' is null, expected a string"


def test_jsonl_line_ends_and_unicode_line_separators(tmp_path):
    path = tmp_path / "d.jsonl"
    raw = json.dumps({"question": "a\u2028b\x85c", "answer": "x"}, ensure_ascii=False)
    path.write_bytes((raw + "\r\n\r\n" + json.dumps({"question": "q", "answer": "y"}) + "\r\n").encode())
    examples = load_examples(path, recipe())
    assert [e.question for e in examples] == ["a\u2028b\x85c", "q"]
    assert [e.index for e in examples] == [0, 1]


def test_unsupported_format_and_missing_file(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match=r"d\.txt: unsupported data format '\.txt'"):
        load_examples(tmp_path / "d.txt", recipe())
    with pytest.raises(DataError, match=r"nope\.jsonl: no such data file"):
        load_examples(tmp_path / "nope.jsonl", recipe())
    with pytest.raises(DataError, match="not one written by datasets.save_to_disk"):
        load_examples(tmp_path, recipe())


def test_invalid_json_file_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"question": "q", "answer": "a"},\n {"question": }\n]')
    with pytest.raises(DataError, match=r"d\.json:3: invalid JSON \(Expecting value at column 15\)"):
        load_examples(path, recipe())


# --------------------------------------------------------------------------- fields


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"problem": "p", "solution": "s"}, ("problem", "solution")),
        ({"instruction": "i", "input": "x", "output": "o"}, ("instruction", "output")),
        ({"prompt": "p", "completion": "c"}, ("prompt", "completion")),
        ({"query": "q", "response": "r"}, ("query", "response")),
        ({"input": "i", "answer": "a", "id": "7"}, ("input", "answer")),
    ],
)
def test_field_detection(tmp_path, row, expected):
    loaded = load_data(write_jsonl(tmp_path / "d.jsonl", [row]), recipe())
    assert (loaded.fields.question, loaded.fields.answer) == expected


def test_field_overrides_win_over_detection(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a", "rationale": "r", "title": "t"}])
    [example] = load_examples(path, recipe(question_field="title", answer_field="rationale"))
    assert (example.question, example.reference, example.prompt, example.target) == ("t", "r", "t\n", "r")
    with pytest.raises(DataError, match=r"d\.jsonl: answer field 'solution' not in the data \(fields: question, answer, rationale, title\)"):
        load_examples(path, recipe(answer_field="solution"))


def test_no_answer_field_says_what_was_looked_for(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "label": "a"}])
    with pytest.raises(DataError, match=r"no answer field found \(fields: question, label; looked for answer, .*--answer-field"):
        load_examples(path, recipe())


def test_missing_placeholder_names_field_and_file(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(DataError) as info:
        load_examples(path, recipe(prompt_template="{question} [{topic}]"))
    assert str(info.value) == (
        f"{path}: prompt template uses {{topic}}, which is not a field of the data "
        "(fields: question, answer, source; plus {question} and {answer})"
    )
    with pytest.raises(DataError, match=r"placeholder \{0\} must be a field name"):
        load_examples(path, recipe(target_template="{0}"))
    with pytest.raises(DataError, match="not a valid template"):
        load_examples(path, recipe(target_template="{answer"))


def test_duplicate_rows_keep_their_index_and_share_a_uid(tmp_path):
    examples = load_examples(write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ROWS[1], ROWS[0]]), recipe())
    assert [e.index for e in examples] == [0, 1, 2]
    assert examples[0].uid == examples[2].uid != examples[1].uid
    assert examples[0].uid == "%s" % uid_of("What is 2+3?\n", "2+3=5\n#### 5")
    assert len(examples[0].uid) == 16


# --------------------------------------------------------------------------- bad rows


BAD_LINES = [
    json.dumps(ROWS[0]),
    '{"question": "broken", ',
    json.dumps({"question": "q", "answer": 3}),
    "",
    json.dumps({"question": "no answer"}),
    "[1, 2]",
    json.dumps(ROWS[1]),
]


def test_first_bad_row_raises_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(BAD_LINES) + "\n")
    with pytest.raises(DataError) as info:
        load_examples(path, recipe())
    assert str(info.value) == f"{path}:2: invalid JSON (Expecting property name enclosed in double quotes at column 24)"


def test_skip_bad_counts_each_bad_row_and_keeps_file_positions(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(BAD_LINES) + "\n")
    loaded = load_data(path, recipe(), skip_bad=True)
    assert [e.index for e in loaded.examples] == [0, 5]
    assert loaded.n_rows == 6
    assert [m.split(": ", 1)[0] for m in loaded.skipped] == [f"{path}:{n}" for n in (2, 3, 5, 6)]
    assert loaded.skipped[1].endswith("field 'answer' is int, expected a string")
    assert loaded.skipped[2].endswith("missing field 'answer'")
    assert loaded.skipped[3].endswith("expected a JSON object, got list")


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "q"}\n{"question": "r", "answer": null}\n')
    with pytest.raises(DataError, match=r"d\.jsonl: no usable rows \(2 skipped\)"):
        load_examples(path, recipe(answer_field="answer"), skip_bad=True)


# --------------------------------------------------------------------------- chat


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def chat_tokenizer(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHAT_TEMPLATE
    return chat


def test_chat_template_rendering_of_question_answer_rows(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:1])
    [example] = load_examples(path, recipe(chat_template=True, system_prompt="Be brief."), tokenizer=chat_tokenizer)
    # The template writes "<s>"; the tokenizer adds BOS itself, so the prompt text leaves it out.
    assert example.prompt == "<|system|>Be brief.\n<|user|>What is 2+3?\n<|assistant|>"
    assert example.target == example.reference == "2+3=5\n#### 5"
    assert chat_tokenizer(example.prompt)["input_ids"].count(chat_tokenizer.bos_token_id) == 1


def test_chat_messages_use_the_last_assistant_message_as_target(tmp_path, chat_tokenizer):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "#### 4"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    loaded = load_data(path, recipe(), tokenizer=chat_tokenizer)
    [example] = loaded.examples
    assert (loaded.fields.messages, loaded.rendering) == ("messages", "chat template")
    assert example.prompt == "<|user|>hi\n<|assistant|>hello\n<|user|>2+2?\n<|assistant|>"
    assert (example.target, example.question, example.reference) == ("#### 4", "2+2?", "#### 4")

    plain = load_data(path, recipe())  # no tokenizer: the documented plain fallback
    assert plain.rendering == "plain chat fallback"
    assert plain.examples[0].prompt == "user: hi\nassistant: hello\nuser: 2+2?\nassistant:"
    assert plain.examples[0].target == " #### 4"


def test_chat_rows_without_assistant_message_are_bad_rows(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"chat\.jsonl:1: messages has no assistant message"):
        load_examples(path, recipe(), tokenizer=chat_tokenizer)


def test_chat_template_needs_a_tokenizer_that_has_one(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError, match="no tokenizer was given"):
        load_examples(path, recipe(chat_template=True))
    with pytest.raises(DataError, match="the tokenizer has no chat template"):
        load_examples(path, recipe(chat_template=True), tokenizer=tokenizer)


# --------------------------------------------------------------------------- inspection helpers


def test_length_summary_on_known_values():
    summary = length_summary([1, 2, 3, 4, 100])
    assert summary == {"mean": 22.0, "p50": 3.0, "p95": pytest.approx(80.8), "max": 100.0}


def test_token_lengths_count_bos_and_eos(tokenizer):
    examples = [Example(0, "u", "q", "r", "ab", "xyz"), Example(1, "v", "q", "r", "a\nb c", "")]
    lengths = token_lengths(examples, tokenizer, append_eos=True)
    assert lengths == {"prompt": [3, 6], "target": [4, 1], "total": [7, 7]}
    assert token_lengths(examples, tokenizer, append_eos=False)["target"] == [3, 0]


def test_grader_coverage_counts_parsed_and_self_graded():
    class LastDigit:
        def extract(self, text):
            digits = [c for c in text if c.isdigit()]
            return digits[-1] if digits else None

        def __call__(self, completion, reference):
            return self.extract(completion) is not None and len(completion) < 8

    examples = [Example(i, str(i), "q", ref, "p", "t") for i, ref in enumerate(["a 1", "none", "long text 3", "x"])]
    coverage = grader_coverage(examples, LastDigit())
    assert (coverage.total, coverage.parsed, coverage.self_graded, coverage.unparsed) == (4, 2, 1, [1, 3])


def test_load_tokenizer_from_folder_adapter_and_run(tmp_path, tokenizer):
    model = tmp_path / "base"
    tokenizer.save_pretrained(model)
    assert load_tokenizer(model).eos_token == "</s>"

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model)}))
    assert len(load_tokenizer(adapter)) == len(tokenizer)

    run = tmp_path / "run"
    for step in (20, 100):
        (run / f"checkpoint-{step}").mkdir(parents=True)
    tokenizer.save_pretrained(run / "checkpoint-20")
    assert load_tokenizer(run).bos_token == "<s>"

    with pytest.raises(CheckpointError, match=r"empty: no tokenizer files found"):
        (tmp_path / "empty").mkdir()
        load_tokenizer(tmp_path / "empty")


# --------------------------------------------------------------------------- ckptsel data


def _invoke(*args):
    from click.testing import CliRunner

    from ckptsel.cli import main

    return CliRunner().invoke(main, ["data", *map(str, args)])


def test_cli_malformed_line_is_one_line_exit_2(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(BAD_LINES) + "\n")
    result = _invoke(path, "--recipe", "gsm8k")
    assert result.exit_code == 2
    assert f"{path}:2: invalid JSON" in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_skip_bad_reports_the_count_and_renders_the_rest(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(BAD_LINES) + "\n")
    result = _invoke(path, "--recipe", "gsm8k", "--skip-bad", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["rows"], report["count"], report["skipped"]) == (6, 2, 4)
    assert report["skipped_rows"][0].startswith(f"{path}:2: invalid JSON")
    assert report["examples"][1]["prompt"] == "Question: What is 7*6?\nAnswer:"
    assert report["grader"] == {
        "name": "gsm8k", "total": 2, "parsed": 2, "self_graded": 2,
        "parse_rate": 1.0, "self_grade_rate": 1.0, "unparsed_indices": [],
    }

    text = _invoke(path, "--recipe", "gsm8k", "--skip-bad", "--show", "1")
    assert text.exit_code == 0, text.output
    assert "skipped 4 bad row(s):" in text.output
    assert "#### 5<eos>" in text.output


def test_cli_token_lengths_and_grader_mismatch(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:2])
    result = _invoke(path, "--prompt-template", r"{question}\n", "--grader", "math", "--tokenizer", tmp_path / "tok", "--json")
    # The report is printed, then the mismatch is an error naming the grader (most references unreadable).
    assert result.exit_code == 2, result.output
    assert "the 'math' grader finds no answer" in result.stderr
    report = json.loads(result.stdout)
    # prompts "What is 2+3?\n" / "What is 7*6?\n": 13 chars + BOS; targets 12 and 14 chars + EOS.
    assert report["token_lengths"]["prompt"] == {"mean": 14.0, "p50": 14.0, "p95": 14.0, "max": 14.0}
    assert report["token_lengths"]["target"]["mean"] == 14.0
    assert report["token_lengths"]["total"]["max"] == 29.0
    assert report["eos"] == "</s>"
    # GSM8K-style references carry no \boxed{}: the math grader reads none of them.
    assert (report["grader"]["parsed"], report["grader"]["unparsed_indices"]) == (0, [0, 1])

    text = _invoke(path, "--grader", "math", "--checkpoint", tmp_path / "tok", "--show", "0", "--no-eos")
    assert text.exit_code == 2, text.output
    assert "grader math: parses 0/2 references (0.0%)" in text.output
    assert "no answer found in rows 0, 1" in text.output


def test_cli_input_errors_exit_2(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    unknown = _invoke(path, "--grader", "nope")
    assert unknown.exit_code == 2 and "unknown grader 'nope'" in unknown.output
    both = _invoke(path, "--tokenizer", tmp_path, "--checkpoint", tmp_path)
    assert both.exit_code == 2 and "not both" in both.output
    placeholder = _invoke(path, "--target-template", "{rationale}")
    assert placeholder.exit_code == 2
    assert placeholder.output.strip() == (
        f"Error: {path}: target template uses {{rationale}}, which is not a field of the data "
        "(fields: question, answer, source; plus {question} and {answer})"
    )
