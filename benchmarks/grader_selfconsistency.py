"""Do the graders read the real datasets' own answers, and only those? How fast are they?

For GSM8K (``gsm8k`` grader) and MATH (``math`` grader), train and test:

- self:     each reference solution graded against itself (target: 100% GSM8K, >= 99.5% MATH);
- bare:     the extracted answer alone, and "The answer is: X", graded against the solution;
- cross:    each reference graded against a DIFFERENT example's reference; a True is right
            only when the two answers really are the same (same normalised answer), so the
            rest are listed as suspects;
- distinct: (MATH) random pairs of DIFFERENT normalised answers; each True must be a real
            equality written two ways (0.5 and \\frac12), else it is a false positive;
- rewrite:  (MATH) the answer rewritten in an equivalent form (\\dfrac, spaces, \\left( \\right),
            p/q for \\frac{p}{q}, decimals, "x = ", units, degrees) -> should be True;
- perturb:  (MATH) one digit of the answer changed -> should be False;
- speed:    grades per second with k=5 distinct completions per reference, caches cleared
            first (cold), then the same again (warm).

Run:  python benchmarks/grader_selfconsistency.py [--data ../shared/data] [--show 15]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from fractions import Fraction
from pathlib import Path

from ckptsel import graders
from ckptsel.graders import latex, latex_expr, numeric

DISTINCT_PAIRS = 100_000
DATASETS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution")}


def load(path: Path, field: str) -> list[str]:
    with path.open() as f:
        return [json.loads(line)[field] for line in f if line.strip()]


def clear_caches() -> None:
    for function in (
        numeric.extract_gsm8k, numeric.to_fraction, latex.extract_math, latex.normalize,
        latex.structure, latex.answers_equal, latex_expr.parse, latex_expr.trees_equal,
    ):
        function.cache_clear()


def rate(hits: int, total: int) -> str:
    return f"{hits}/{total} = {100 * hits / max(total, 1):.3f}%"


def show(title: str, rows: list[str], limit: int) -> None:
    if rows:
        print(f"    {title} ({len(rows)}; first {min(limit, len(rows))}):")
        for row in rows[:limit]:
            print(f"      {row}")


def equivalent_rewrites(answer: str) -> list[str]:
    """Forms a model may write for the same MATH answer (each must grade True)."""
    forms = [
        _spaced(answer),
        answer.replace("\\frac", "\\dfrac"),
        f"{answer}.",
    ]
    if "," in answer and not re.search(r"[(){}\[\]\\]", answer) and not re.fullmatch(r"[\d,.]+", answer):
        forms.append(", ".join(reversed(answer.split(","))))  # an unordered list of solutions
    if re.fullmatch(r"\((.*)\)", answer):
        forms.append(f"\\left{answer[:-1]}\\right)")
    frac = re.fullmatch(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}", answer)
    if frac:
        sign, p, q = frac.groups()
        forms.append(f"{sign}{p}/{q}")
        if len(p) == len(q) == 1:
            forms.append(f"{sign}\\frac{p}{q}")  # the \\frac34 shorthand
        decimal = _terminating_decimal(Fraction(int(p), int(q)) * (-1 if sign else 1))
        if decimal is not None:
            forms.append(decimal)
    if re.fullmatch(r"-?\d+", answer):
        forms += [f"{answer}.0", f"x = {answer}", f"{answer}\\text{{ units}}", f"{answer}^\\circ", f"\\${answer}"]
    return forms


def _spaced(answer: str) -> str:
    """A space between tokens, none added at commas ("81, 256" is a list, "81,256" a number)."""
    out = []
    for token in re.findall(r"\\[a-zA-Z]+|\\.|\d+(?:\.\d+)?|[a-zA-Z]+|,\s*|\S", answer):
        if out and not token.startswith(",") and not out[-1].startswith(","):
            out.append(" ")
        out.append(token)
    return "".join(out)


def _terminating_decimal(value: Fraction) -> str | None:
    q = value.denominator
    for p in (2, 5):
        while q % p == 0:
            q //= p
    if q != 1:
        return None
    text = f"{float(value):.12f}".rstrip("0")
    return text if Fraction(text) == value else None


def perturbed(answer: str, rng: random.Random) -> str | None:
    """The answer with one digit changed, or None if it has none.

    Not a digit of a base subscript (``1011_2``) or of a unit's power (``\\text{ cm}^2``): those
    change the notation, not the number.
    """
    spots = [m.start() for m in re.finditer(r"(?<!_)(?<!_\{)(?<!\}\^)\d", answer)]
    if not spots:
        return None
    at = rng.choice(spots)
    return answer[:at] + str((int(answer[at]) + rng.randint(1, 9)) % 10) + answer[at + 1 :]


def against_solutions(grader, references: list[str], answers: list[str | None], form) -> list[str]:
    """Examples whose completion ``form(solution, answer)`` does NOT grade True against the solution."""
    return [
        f"#{i}: extracted {answer!r}"
        for i, (reference, answer) in enumerate(zip(references, answers))
        if answer is None or not grader(form(reference, answer), reference)
    ]


def check_cross(grader, task: str, references: list[str], answers: list, partner: dict, show_limit: int) -> None:
    """Each reference against another example's: a True must be the same answer."""
    n = len(references)
    true_pairs = [(i, j) for i, j in partner.items() if grader(references[i], references[j])]
    key = latex.normalize if task == "math" else (lambda answer: str(numeric.to_fraction(answer)))
    suspects = [f"#{i} {answers[i]!r} ~ #{j} {answers[j]!r}" for i, j in true_pairs if key(answers[i]) != key(answers[j])]
    print(f"  cross     {rate(len(true_pairs), n)} graded True; of those, different normalised answers: {len(suspects)}")
    show("True on different answers", suspects, show_limit)


def check_math_forms(grader, answers: list, rng: random.Random, show_limit: int) -> None:
    """Different answers, equivalent rewrites and one-digit perturbations of real MATH answers."""
    distinct = sorted({latex.normalize(a) for a in answers if a is not None})
    pairs = {tuple(sorted(rng.sample(distinct, 2))) for _ in range(DISTINCT_PAIRS)}
    equal = [f"{a!r} ~ {b!r}" for a, b in sorted(pairs) if grader.equivalent(a, b)]
    print(f"  distinct  {rate(len(equal), len(pairs))} random pairs of different normalised answers graded True")
    show("graded True (check: really the same answer?)", equal, show_limit)

    boxed = "\\boxed{{{}}}".format
    rewrites = [(a, form) for a in answers if a is not None for form in equivalent_rewrites(a)]
    missed = [f"{a!r} -> {form!r}" for a, form in rewrites if not grader(boxed(form), boxed(a))]
    print(f"  rewrite   {rate(len(rewrites) - len(missed), len(rewrites))} equivalent forms graded True")
    show("missed", missed, show_limit)

    changed = [(a, perturbed(a, rng)) for a in answers if a is not None]
    changed = [(a, p) for a, p in changed if p is not None and p != a]
    wrong = [f"{a!r} -> {p!r}" for a, p in changed if grader(boxed(p), boxed(a))]
    print(f"  perturb   {rate(len(changed) - len(wrong), len(changed))} one-digit changes graded False")
    show("graded True", wrong, show_limit)


def check_speed(grader, references: list[str], partner: dict) -> None:
    """k=5 distinct completions per reference: 3 reach its answer, 2 are another example's."""
    completions = [
        (references[i if j < 3 else partner[i]] + " " * j, references[i]) for i in range(len(references)) for j in range(5)
    ]
    for label in ("cold", "warm"):
        if label == "cold":
            clear_caches()
        start = time.perf_counter()
        correct = sum(grader(c, r) for c, r in completions)
        rate_per_s = len(completions) / (time.perf_counter() - start)
        print(f"  speed     {rate_per_s:,.0f} grades/s {label} ({len(completions)} grades, {correct} True)")


def check(task: str, split: str, references: list[str], show_limit: int) -> None:
    grader = graders.get(task)
    n = len(references)
    print(f"\n{task}/{split}: {n} reference solutions, grader {task!r}")
    answers = [grader.extract(r) for r in references]
    for label, form, note in (
        ("self", lambda reference, answer: reference, ""),
        ("bare", lambda reference, answer: answer, "  (the extracted answer alone vs the solution)"),
        ("said", lambda reference, answer: f"The answer is: {answer}", "  ('The answer is: X' vs the solution)"),
    ):
        failures = against_solutions(grader, references, answers, form)
        print(f"  {label:<9} {rate(n - len(failures), n)}{note}")
        show("failures", failures, show_limit)

    rng = random.Random(0)
    order = list(range(n))
    rng.shuffle(order)
    partner = {order[i]: order[(i + 1) % n] for i in range(n)}  # a derangement: never itself
    check_cross(grader, task, references, answers, partner, show_limit)
    if task == "math":
        check_math_forms(grader, answers, rng, show_limit)
    check_speed(grader, references, partner)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--show", type=int, default=15, help="failures listed per check")
    parser.add_argument("--task", choices=sorted(DATASETS), action="append", help="default: all")
    args = parser.parse_args()
    for task in args.task or sorted(DATASETS):
        for split in ("train", "test"):
            path = args.data / task / f"{split}.jsonl"
            check(task, split, load(path, DATASETS[task][1]), args.show)


if __name__ == "__main__":
    main()
