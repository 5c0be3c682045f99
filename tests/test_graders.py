"""Graders: hand-made cases per grader, and rewrites of real MATH answers.

The MATH answers below are copied from the MATH dataset (the ``unique_id`` of the solution
they come from is noted), so the suite needs no data files.
"""

from __future__ import annotations

import pickle
import sys
import time

import pytest

from ckptsel import graders
from ckptsel.errors import CkptselError
from ckptsel.graders import latex_expr
from ckptsel.graders.latex import extract_math, normalize


# --------------------------------------------------------------------------- registry
def test_names_lists_the_built_in_graders():
    assert graders.names() == ["exact", "gsm8k", "lab-steps", "math", "number"]


def test_unknown_grader_is_one_line_listing_the_known_names():
    with pytest.raises(CkptselError) as info:
        graders.get("gsm9k")
    message = str(info.value)
    assert "\n" not in message
    assert "'gsm9k'" in message
    for name in ("exact", "gsm8k", "math", "number", "regex:<pattern>", "python:module:function"):
        assert name in message


@pytest.mark.parametrize(
    ("name", "right", "wrong", "reference"),
    [
        ("exact", " x=12 ", "x=13", "x=12"),
        ("gsm8k", "so x=12", "so x=13", "#### 12"),
        ("math", r"so $\boxed{12}$", r"$\boxed{13}$", r"\boxed{12}"),
        ("number", "so x=12", "so x=13", "12"),
        (r"regex:=(\d+)", "so x=12", "so x=13", "x=12"),
    ],
)
def test_graders_pickle_for_worker_processes(name, right, wrong, reference):
    grader = pickle.loads(pickle.dumps(graders.get(name)))
    assert grader(right, reference)
    assert not grader(wrong, reference)


def test_an_answerless_reference_never_grades_true():
    gsm8k = graders.get("gsm8k")
    assert gsm8k.extract("no digits here") is None
    assert not gsm8k("no digits here", "no digits here")


# --------------------------------------------------------------------------- gsm8k
GSM8K_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        (GSM8K_SOLUTION, GSM8K_SOLUTION, True),
        ("She sold 72 clips.\n#### 72", GSM8K_SOLUTION, True),
        ("She sold 71 clips.\n#### 71", GSM8K_SOLUTION, False),
        ("The answer is 72.", "72", True),
        ("So the answer is $1,000.00", "#### 1000", True),
        ("#### $1,000", "1000", True),
        ("Answer: 3.50", "#### 3.5", True),
        ("A: 7", "#### 7", True),
        ("It drops to -7 degrees.\n#### -7", "#### -7", True),
        ("#### \u22127", "#### -7", True),
        ("#### -7", "#### 7", False),
        ("Half of it: 1/2", "#### 0.5", True),
        ("The rate is 50%.", "#### 50", True),
        ("#### 1,000", "#### 100", False),
        ("#### 7.5", "#### 75", False),
        ("10 - 3 = 7", "#### 7", True),  # the last number is 7, and "- 3" is not a negative
        ("I am not sure.", "#### 7", False),
    ],
)
def test_gsm8k_grades(completion, reference, expected):
    assert graders.get("gsm8k")(completion, reference) is expected


def test_gsm8k_extraction_order():
    extract = graders.get("gsm8k").extract
    assert extract("First 3, then 4.\n#### 12\nQuestion: next one?\n#### 99") == "12"  # first ####
    assert extract("#### none\nThe answer is 8 apples") == "8"  # #### without a number falls through
    assert extract("3 + 4 = 7. The answer is 7. Then 10 more.") == "7"  # marker beats last number
    assert extract("Answer: step one has 5.\nAnswer: 9") == "9"  # last marker
    assert extract("We get 5 and then 6") == "6"
    assert extract("It costs $1,234,567.50 total.") == "1234567.50"


def test_gsm8k_grades_a_batch_of_near_misses():
    # Speed is a benchmark (benchmarks/grader_selfconsistency.py), not asserted here.
    grader = graders.get("gsm8k")
    completions = [GSM8K_SOLUTION.replace("72", str(n)) + " " * (n % 7) for n in range(5000)]
    assert sum(grader(c, GSM8K_SOLUTION) for c in completions) == 1


# --------------------------------------------------------------------------- number, exact
def test_number_grader_reads_the_last_number():
    number = graders.get("number")
    assert number.extract("between 3 and 4.25, say 4.") == "4"
    assert number("x is 2, y is 0.50", "1/2")
    assert not number("x is 2, y is 0.51", "1/2")
    assert number.extract("none") is None


def test_exact_grader_strips_and_compares():
    exact = graders.get("exact")
    assert exact("  Paris\n", "Paris")
    assert not exact("paris", "Paris")
    assert exact.extract("   ") is None


# --------------------------------------------------------------------------- regex, python
def test_regex_grader_uses_the_last_match_and_its_first_group():
    grader = graders.get(r"regex:ANSWER=(\w+)")
    assert grader.extract("ANSWER=cat ... ANSWER= dog ANSWER=fish") == "fish"
    assert grader("ANSWER=fish", "so ANSWER=fish")
    assert not grader("ANSWER=cat", "ANSWER=fish")
    assert graders.get(r"regex:\d+").extract("1 then 22") == "22"  # no group: the whole match
    assert graders.get(r"regex:x(\d)?").extract("x5 x") is None  # the last match captured nothing


def test_regex_grader_bad_patterns_are_one_line_errors():
    with pytest.raises(CkptselError, match=r"regex:\(unclosed.*invalid regular expression"):
        graders.get("regex:(unclosed")
    with pytest.raises(CkptselError, match="pattern is empty"):
        graders.get("regex:")


def test_python_grader_is_imported_only_when_named(tmp_path, monkeypatch):
    (tmp_path / "my_grading.py").write_text(
        "def same_word(completion, reference):\n"
        "    return completion.split()[-1].lower() == reference.split()[-1].lower()\n"
        "same_word.extract = lambda text: text.split()[-1] if text.split() else None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_grading", raising=False)
    graders.get("gsm8k")
    assert "my_grading" not in sys.modules
    grader = graders.get("python:my_grading:same_word")
    assert "my_grading" in sys.modules
    assert grader("so it is PARIS", "Paris")
    assert not grader("so it is Rome", "Paris")
    assert grader.extract("the end") == "end"


def test_python_grader_errors_name_the_problem(tmp_path, monkeypatch):
    (tmp_path / "my_grading2.py").write_text("VALUE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(CkptselError, match="cannot import module 'no_such_module_xyz'"):
        graders.get("python:no_such_module_xyz:grade")
    with pytest.raises(CkptselError, match="has no attribute 'grade'"):
        graders.get("python:my_grading2:grade")
    with pytest.raises(CkptselError, match="'VALUE' is not callable"):
        graders.get("python:my_grading2:VALUE")
    with pytest.raises(CkptselError, match="write python:module:function"):
        graders.get("python:my_grading2")


# --------------------------------------------------------------------------- math: extraction
@pytest.mark.parametrize(
    ("text", "answer"),
    [
        (r"So $a+b=-3+3=\boxed{0}$.", "0"),
        (r"first \boxed{1}, finally $\boxed{\frac{\sqrt{3}}{2}}$.", r"\frac{\sqrt{3}}{2}"),
        (r"the set is $\boxed{\{1,2\}}$", r"\{1,2\}"),
        (r"It follows that $x^2 + y^2 = \boxed 9$.", "9"),  # train/algebra: \boxed without braces
        (r"Thus $\fbox{7}$", "7"),
        ("Adding these, we get 18.\nThe answer is: 18", "18"),  # MetaMath
        (r"Final Answer: The final answer is $\frac{1}{2}$. I hope it is correct.", r"\frac{1}{2}"),  # Minerva
        (r"$x = \boxed{49}$ is right. (Checking the answer is necessary because ...)", "49"),
        (r"\frac{3}{4}", r"\frac{3}{4}"),  # a bare reference answer
        (r"$\boxed{\frac{1}{2", None),  # truncated: no final answer
        (r"there are $\boxed{}$ primes", None),  # MATH train has two of these
        ("We know a lot.\nBut we never conclude anything at all here.", None),
    ],
)
def test_math_extraction(text, answer):
    assert extract_math(text) == answer


# --------------------------------------------------------------------------- math: equivalence
# (real MATH answer, equivalent rewrite). Real answers from the MATH data, by unique_id.
EQUIVALENT = [
    (r"\frac{3}{4}", "0.75"),  # train/algebra/1269
    (r"\frac{3}{4}", r"\dfrac34"),
    (r"\frac{3}{4}", "3/4"),
    (r"\frac{3}{4}", r"\tfrac{6}{8}"),
    (r"\dfrac{7}{3}", r"2\frac{1}{3}"),  # train/algebra/341; a mixed number
    (r"\frac12", r"\frac{1}{2}"),  # train/algebra/92: the shorthand
    (r"1\frac{2}{3}", r"\frac{5}{3}"),  # train/algebra/1370
    ("64\\%", "64"),  # train/algebra/65
    ("64\\%", "64%"),
    (r"\text{(C)}", "C"),  # train/intermediate_algebra/97
    (r"\text{(C)}", "(C)"),
    (r"\text{(C)}", r"\textbf{(C)}"),
    ("(0,1]", r"\left( 0 , 1 \right]"),  # train/algebra/1257
    ("(-4,4)", r"\left(-4, 4\right)"),  # train/algebra/9
    ("x = 12", "12"),  # train/algebra/1321
    ("x = 12", "x=12.0"),
    (r"60^\circ", "60"),  # train/geometry/26
    (r"60^\circ", r"60^{\circ}"),
    (r"60^\circ", r"60\text{ degrees}"),
    (r"147\text{ cm}", "147"),  # train/geometry/340
    (r"112,\!875", "112875"),  # train/algebra/720
    (r"112,\!875", "112,875"),
    (r"\$306,\!956.63", "306956.63"),  # train/algebra/940
    ("0.20", "0.2"),  # train/counting_and_probability/711
    ("48.0", "48"),  # train/geometry/1100
    (r"3\sqrt{5}", r"\sqrt{45}"),  # train/algebra/861
    (r"3\sqrt{5}", r"3\sqrt5"),
    (r"\frac{41\pi}{4}", r"10.25\pi"),  # train/algebra/74
    (r"\frac{41\pi}{4}", r"\frac{41}{4}\pi"),
    ("x^2+5x+4", "(x+1)(x+4)"),  # train/algebra/308: symbolic
    ("x^2 - 5x - 24", "x^2-5x-24"),  # train/algebra/501
    ("-1,2,-2", "2, -2, -1"),  # train/intermediate_algebra/136: solutions in any order
    (r"(-\infty, 1)\cup(1, \infty)", r"(1,\infty) \cup (-\infty,1)"),  # train/algebra/473
    (  # train/precalculus/4
        r"\begin{pmatrix} 1/4 \\ -7/4 \\ 1/2 \end{pmatrix}",
        r"\begin{pmatrix} 0.25 \\ -\frac74 \\ \frac{1}{2} \end{pmatrix}",
    ),
    (r"1 \pm \sqrt{19}", r"1+\sqrt{19}, 1-\sqrt{19}"),  # test/intermediate_algebra/662
    (r"\{1\pm\sqrt{5},-2\}", r"\{-2, 1-\sqrt5, 1+\sqrt5\}"),  # test/intermediate_algebra/2015
    (r"\text{Sunday}", "Sunday"),  # train/algebra/627
    ("2215_6", "2215_{6}"),  # train/number_theory/123
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
    (r"\sin^2 t", r"1-\cos^2 t"),
    (r"y = -\frac{5}{2} x - \frac{29}{4}", "y=-2.5x-7.25"),
    (r"\$3.54", "3.54"),  # train/algebra/700
]

NOT_EQUIVALENT = [
    (r"\frac{3}{4}", "0.76"),  # a perturbed number
    (r"\frac{3}{4}", r"\frac{4}{3}"),
    ("64\\%", "0.64"),  # percent signs are dropped, not divided out
    (r"\text{(C)}", "D"),
    ("(0,1]", "(0,1)"),  # open vs closed
    ("(0,1]", "[0,1]"),
    ("(-2,3)", "(3,-2)"),  # train/algebra/90: a swapped tuple
    ("x = 12", "13"),
    (r"60^\circ", "61"),
    (r"112,\!875", "112876"),
    ("x^2+5x+4", "(x+1)(x+5)"),
    ("-1,2,-2", "-1, 2, 2"),
    (r"(-\infty, 1)\cup(1, \infty)", r"(-\infty, 1]\cup(1, \infty)"),
    (r"\begin{pmatrix} 6 \\ -33 \end{pmatrix}", r"\begin{pmatrix} -33 \\ 6 \end{pmatrix}"),  # train/precalculus/42
    ("2215_6", "2215"),  # the base is part of the answer
    (r"\text{Sunday}", "Monday"),
    (r"3\sqrt{5}", r"5\sqrt{3}"),
    (r"\frac{41\pi}{4}", r"\frac{41}{4}"),
    ("a", "b"),
]


@pytest.mark.parametrize(("reference", "rewrite"), EQUIVALENT)
def test_equivalent_rewrites_of_real_math_answers_grade_true(reference, rewrite):
    grader = graders.get("math")
    assert grader(rf"so the answer is $\boxed{{{rewrite}}}$.", rf"Thus $\boxed{{{reference}}}$.")
    assert grader.equivalent(reference, rewrite)  # and symmetric
    assert grader.equivalent(rewrite, reference)


@pytest.mark.parametrize(("reference", "wrong"), NOT_EQUIVALENT)
def test_wrong_answers_grade_false(reference, wrong):
    grader = graders.get("math")
    assert not grader(rf"$\boxed{{{wrong}}}$", rf"$\boxed{{{reference}}}$")
    assert not grader.equivalent(wrong, reference)


def test_normalisation_examples():
    assert normalize(r"\left( \dfrac{1}{2}, \! 3 \right)") == r"(\frac{1}{2},3)"
    assert normalize(r"5225 \text{ cubic inches}") == "5225"
    assert normalize(r"7, -2, \text{ and } -5") == "7,-2,-5"
    assert normalize(r"\sin x") == r"\sin x"  # the space a command needs stays
    assert normalize(r"11,\! 111,\! 111,\! 100") == "11111111100"


# --------------------------------------------------------------------------- math: expressions
@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (r"\frac{3}{4}", "0.75", True),
        (r"2^{100}-2", "1267650600228229401496703205374", True),  # exact, beyond float precision
        (r"2^{100}-2", "1267650600228229401496703205375", False),
        ("(x+1)^2", "x^2+2x+1", True),
        (r"\frac{x^2-1}{x-1}", "x+1", True),
        ("x^2", "y^2", False),  # different symbols are different values
        (r"\sqrt[3]{-8}", "-2", True),
        (r"\binom{5}{2}", "10", True),
        ("5!", "120", True),
        (r"\log_2 8", "3", True),
        ("3-i", r"\frac{10}{3+i}", True),
        (r"\pi", "3.14159", False),
        (r"\frac{1}{0}", "1", None),  # undefined: not decided here
        ("east", "seat", None),  # words are not products of symbols
    ],
)
def test_expression_equality(a, b, expected):
    assert latex_expr.expressions_equal(a, b) is expected


ADVERSARIAL = [
    r"10^{10^{10^{10}}}",
    r"2^{2^{2^{2^{2^{2}}}}}",
    r"(x+1)^{100000}",
    "9!!!",
    "100000!",
    r"\binom{10^{9}}{5}",
    "1" + "0" * 5000,
    "(" * 300 + "x" + ")" * 300,
    r"\sqrt{" * 300 + "2" + "}" * 300,
    r"\{" * 300 + "1" + r"\}" * 300,
    "+".join(f"x^{{{n}}}" for n in range(400)),
]


@pytest.mark.parametrize("answer", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_answers_return_within_the_time_bound(answer):
    grader = graders.get("math")
    start = time.perf_counter()
    results = [grader(rf"\boxed{{{answer}}}", rf"\boxed{{{answer} + 1}}"), grader.equivalent(answer, "1")]
    elapsed = time.perf_counter() - start
    assert results == [False, False]
    assert elapsed < 0.5, f"{elapsed:.2f} s"


def test_huge_completion_is_extracted_quickly():
    grader = graders.get("math")
    completion = ("step {" * 20_000) + r" \boxed{42} " + ("junk " * 20_000)
    start = time.perf_counter()
    assert grader(completion, r"\boxed{42}")
    assert time.perf_counter() - start < 0.5
