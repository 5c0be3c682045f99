"""Lab grids: a YAML recipe that expands into named training runs.

The axes are those of Kang et al.'s sweep (learning rate x epochs x data size x model);
any :class:`~ckptsel.lab.train.TrainSpec` field can be an axis (``model.kind`` reaches
into the model). A grid file::

    name: main
    ground_truth: {sampling: {k: 5}, n_train_eval: 100}
    bases:                       # optional: pretrained bases, trained once, by name
      dense-base: {families: [word, max, product], n_train: 4000, epochs: 8}
      moe-base: {families: [word, max, product], n_train: 4000, epochs: 8, model: {kind: moe}}
    defaults: {families: [sum], n_test: 100, init: dense-base}
    axes:                        # the cartesian product of these
      lr: [0.001, 0.003]
      init: [dense-base, moe-base]
      data:                      # a bundle axis: each value sets several fields together
        - {n_train: 150, epochs: 40}
        - {name: big, n_train: 1500, epochs: 5}
    runs:                        # extra single runs: a name and overrides of the defaults
      - {name: lora, mode: lora, lr: 0.003}

A run whose ``init`` names a base starts from that base's final weights and takes its
model architecture from it. Errors name the file, the line and the field.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ckptsel.errors import RecipeError
from ckptsel.lab.ground_truth import GroundTruthSettings
from ckptsel.lab.train import TrainSpec

# Short names for run names: "dense-n150-e40-lr0.003".
_ALIASES = {"n_train": "n", "epochs": "e", "lr": "lr", "model.kind": "", "mode": "", "init": "", "seed": "s"}


class _FieldError(RecipeError):
    """A run's field is invalid; ``loc`` points into the grid file so the line can be named."""

    def __init__(self, message: str, loc: tuple):
        super().__init__(message)
        self.loc = loc


class ExtraRun(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    name: str = Field(pattern=r"^[A-Za-z0-9_.=+-]+$")


class Grid(BaseModel):
    """A validated grid recipe."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "grid"
    description: str = ""
    ground_truth: GroundTruthSettings = GroundTruthSettings()
    bases: dict[str, TrainSpec] = {}
    defaults: dict[str, Any] = {}
    axes: dict[str, list[Any]] = {}
    runs: list[ExtraRun] = []

    def expand(self) -> dict[str, TrainSpec]:
        """Run name -> spec, axes first (in product order), then the extra runs."""
        out: dict[str, TrainSpec] = {}
        keys = list(self.axes)
        for values in itertools.product(*(self.axes[k] for k in keys)) if keys else ():
            point: dict[str, Any] = {}
            parts: list[str] = []
            for key, value in zip(keys, values):
                # A mapping is a bundle: fields that move together (n_train with epochs); its
                # optional "name" replaces the fields in the run name.
                fields = {k: v for k, v in value.items() if k != "name"} if isinstance(value, dict) else {key: value}
                point.update(fields)
                parts.append(str(value["name"]) if isinstance(value, dict) and "name" in value else _run_name(fields))
            name = "-".join(parts)
            if name in out:
                raise _FieldError(f"axes: two points are both named {name!r}; give the bundles distinct names", ("axes",))
            out[name] = _spec(self.defaults, point, ("axes",), name, self.bases)
        for i, extra in enumerate(self.runs):
            fields = {k: v for k, v in extra.model_dump().items() if k != "name"}
            if extra.name in out:
                raise _FieldError(f"runs: name {extra.name!r} is used twice", ("runs", i, "name"))
            out[extra.name] = _spec(self.defaults, fields, ("runs", i), extra.name, self.bases)
        if not out:  # still check the defaults, so a grid with no runs yet is not silently broken
            _spec(self.defaults, {}, ("defaults",), "defaults", self.bases)
        return out

    @field_validator("bases")
    @classmethod
    def _bases_from_scratch(cls, bases: dict[str, TrainSpec]) -> dict[str, TrainSpec]:
        for name, spec in bases.items():
            if spec.init != "scratch" or spec.mode != "full":
                raise ValueError(f"base {name!r} must be trained from scratch with full fine-tuning")
        return bases


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _run_name(point: dict[str, Any]) -> str:
    parts = [f"{_ALIASES.get(k, k.replace('.', '_') + '=')}{_fmt(v)}" for k, v in point.items()]
    return "-".join(parts) or "run"


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"model.kind": "moe"}`` -> ``{"model": {"kind": "moe"}}`` (merged with other model keys)."""
    out: dict[str, Any] = {}
    for key, value in copy.deepcopy(flat).items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf] = {**node[leaf], **value}
        else:
            node[leaf] = value
    return out


def _spec(
    defaults: dict[str, Any], overrides: dict[str, Any], where: tuple, name: str, bases: dict[str, TrainSpec]
) -> TrainSpec:
    """Validate defaults + overrides; an error points at the override or default it came from."""
    fields = _nest({**defaults, **overrides})
    init = fields.get("init", "scratch")
    if init != "scratch":
        if init not in bases:
            key = "init" if "init" in overrides else None
            loc = (*where, key) if key else ("defaults", "init")
            known = ", ".join(["scratch", *bases])
            raise _FieldError(f"field {'.'.join(map(str, loc))}: no base named {init!r} (known: {known})", loc)
        fields["model"] = bases[init].model.model_dump()
    try:
        return TrainSpec.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        parts = [str(p) for p in err["loc"]]
        candidates = [k for k in (".".join(parts), parts[0] if parts else None) if k]
        key = next((k for k in candidates if k in overrides), None)
        if key:
            loc = (*where, key)
        elif parts and parts[0] in defaults:
            loc = ("defaults", parts[0])
        else:
            loc = where
        label = ".".join(str(p) for p in loc)
        raise _FieldError(f"field {label}: {err['msg']} (run {name})", loc) from None


def _line_of(node: yaml.Node, loc: tuple) -> int | None:
    """1-based line of the YAML node at ``loc`` (the deepest one that exists)."""
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if k.value == str(part)]
            if not match:
                break
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        line = node.start_mark.line + 1
    return line


def load_grid(path: Path) -> Grid:
    """Read and validate a grid recipe; one-line :class:`RecipeError` on any problem."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        raise RecipeError(f"{path} line {mark.line + 1 if mark else '?'}: invalid YAML ({exc.problem})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a grid is a YAML mapping (name, bases, defaults, axes, runs)")
    try:
        grid = Grid.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise RecipeError(f"{path} line {_line_of(node, err['loc'])}: field {loc}: {err['msg']}") from None
    try:
        grid.expand()
    except _FieldError as exc:
        raise RecipeError(f"{path} line {_line_of(node, exc.loc)}: {exc}") from None
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    return grid
