"""The release gate's policy: which checkpoint is the candidate, and what it must satisfy.

A policy is a YAML file validated into :class:`Policy` (errors name the file, the line and
the field), or built from ``ckptsel gate`` options. Every rule is optional except the
over-memorized flag, which is on by default; a file that is empty, has an empty ``rules:``
or turns every rule off is refused (a gate that checks nothing passes everything)::

    candidate: last                 # last | recommended (or --candidate PATH)
    rules:
      fail_if_overmemorized: true   # the candidate carries the over-memorized flag
      min_premem_acc: 0.30          # predicted test accuracy at least this
      max_drop_from_recommended: 0.05   # ... and at most this below the recommended checkpoint's
      max_memorized_frac: 0.9       # memorised fraction at most this
      max_proxy_ratio: 1.25         # perplexity proxy at most this x its minimum so far
    stages:                         # thresholds of the flag (ckptsel.settings.OvermemSettings);
                                    # each one set here overrides the recipe's `stages:`
      acc_margin: 0.1
      memorized_min: 0.99
      proxy_rise: 0.25

Why the last checkpoint is the default candidate: it is what a training job hands to the
release step when nobody chooses, so that is what the gate must judge. With
``candidate: recommended`` the gate judges ckptsel's own pick instead (it then fails only
when even the best checkpoint of the run breaks the rules).

:func:`evaluate` applies the rules to a :class:`ckptsel.select.Ranking` and returns the
checks with the numbers; it never loads a model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from ckptsel.errors import RecipeError
from ckptsel.settings import OvermemSettings

if TYPE_CHECKING:
    from ckptsel.select import Ranking


class PolicyError(RecipeError):
    """The policy file is unreadable or invalid."""


class GateRules(BaseModel):
    """What the candidate must satisfy; a rule left at None is not checked."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fail_if_overmemorized: bool = Field(True, description="Fail when the candidate is flagged over-memorized.")
    min_premem_acc: float | None = Field(None, ge=0.0, le=1.0, description="Lowest predicted test accuracy.")
    max_drop_from_recommended: float | None = Field(
        None, ge=0.0, le=1.0, description="Largest shortfall of predicted accuracy against the recommended checkpoint."
    )
    max_memorized_frac: float | None = Field(None, ge=0.0, le=1.0, description="Largest memorised fraction.")
    max_proxy_ratio: float | None = Field(None, ge=1.0, description="Largest proxy / its minimum so far.")


class Policy(BaseModel):
    """A gate policy file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    candidate: Literal["last", "recommended"] = "last"
    rules: GateRules = GateRules()
    stages: OvermemSettings = OvermemSettings()


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; any problem is one line naming the file, line and field."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy ({exc.strerror or exc})") from None
    try:
        payload = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise PolicyError(f"{where}: invalid YAML ({getattr(exc, 'problem', None) or 'parse error'})") from None
    if payload is None or payload == {}:  # a gate that checks nothing would pass everything
        raise PolicyError(f"{path}: empty policy file; set at least one rule under rules: "
                          "(e.g. min_premem_acc: 0.3; see recipes/ci/policy.yaml)")
    if not isinstance(payload, dict):
        raise PolicyError(f"{path}: a policy is a mapping of settings, got {type(payload).__name__}")
    if "rules" in payload and not payload["rules"]:
        line = next((n for n, text_line in enumerate(text.splitlines(), 1) if text_line.startswith("rules")), None)
        raise PolicyError(f"{path}{f':{line}' if line else ''}: rules: is empty; set at least one rule "
                          "(or leave the key out for the default, fail_if_overmemorized: true)")
    policy = validate(payload, str(path), text)
    if not has_rule(policy.rules):
        raise PolicyError(f"{path}: the policy checks nothing (every rule is off), so the gate would pass any "
                          "checkpoint; set at least one rule under rules:")
    return policy


def has_rule(rules: GateRules) -> bool:
    """Whether the rules check anything at all."""
    return rules.fail_if_overmemorized or any(
        getattr(rules, name) is not None for name in GateRules.model_fields if name != "fail_if_overmemorized")


def validate(payload: dict, source: str, text: str | None = None) -> Policy:
    """A :class:`Policy` from a mapping; the first problem becomes ``source[:line]: field: message``."""
    from pydantic import ValidationError

    from ckptsel.recipes import validation_message

    try:
        return Policy.model_validate(payload)
    except ValidationError as exc:
        raise PolicyError(validation_message(exc, source, text)) from None


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Check:
    """One rule applied to the candidate: the value, the limit, and whether it passed."""

    name: str
    passed: bool
    value: float | None
    limit: float | None
    detail: str

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def evaluate(ranking: Ranking, candidate: int, rules: GateRules) -> list[Check]:
    """Apply ``rules`` to checkpoint ``candidate`` (an index into ``ranking.checkpoints``).

    A rule whose number could not be measured fails: a gate passes on evidence, not on its absence.
    """
    c = ranking.checkpoints[candidate]
    checks: list[Check] = []
    if rules.fail_if_overmemorized:
        detail = c.flag.reason() if c.flag is not None else f"stage {c.stage}"
        checks.append(Check("not_overmemorized", c.flag is None, None, None, detail))

    def at_least(name: str, value: float, limit: float | None, what: str) -> None:
        if limit is not None:
            ok = not math.isnan(value) and value >= limit
            checks.append(Check(name, ok, value, limit, f"{what} {_num(value)} (must be ≥ {limit:g})"))

    def at_most(name: str, value: float, limit: float | None, what: str) -> None:
        if limit is not None:
            ok = not math.isnan(value) and value <= limit
            checks.append(Check(name, ok, value, limit, f"{what} {_num(value)} (must be ≤ {limit:g})"))

    at_least("min_premem_acc", c.premem_acc, rules.min_premem_acc, "predicted test accuracy")
    if rules.max_drop_from_recommended is not None:
        rec = ranking.checkpoints[ranking.recommended] if ranking.recommended is not None else None
        drop = rec.premem_acc - c.premem_acc if rec is not None else math.nan
        where = f"step {rec.step} ({_num(rec.premem_acc)} − {_num(c.premem_acc)})" if rec is not None else "checkpoint"
        at_most("max_drop_from_recommended", drop, rules.max_drop_from_recommended,
                f"predicted accuracy drop from the recommended {where} =")
    at_most("max_memorized_frac", c.memorized_frac, rules.max_memorized_frac, "memorised fraction")
    at_most("max_proxy_ratio", c.proxy_ratio, rules.max_proxy_ratio, f"{ranking.proxy or 'proxy'} / its minimum so far")
    return checks


def _num(value: float) -> str:
    return "unmeasured" if math.isnan(value) else f"{value:.3f}"
