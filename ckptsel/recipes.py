"""Recipes: named YAML presets validated into :class:`ckptsel.settings.Recipe`.

A recipe says how a data set is rendered and graded (templates, fields, grader) and which
memorisation threshold suits it. The built-in ones live in the repository's top-level
``recipes/`` folder, which the wheel ships as ``ckptsel/_recipes``; only the ``*.yaml``
files directly in that folder are recipes (subfolders hold other presets).

    load_recipe("gsm8k")               a built-in recipe by name
    load_recipe("my/recipe.yaml")      a recipe file
    override(recipe, data={"grader": "math"})   explicit values win, re-validated
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptsel.errors import RecipeError
from ckptsel.settings import Recipe

_PACKAGE_DIR = Path(__file__).resolve().parent


def recipes_dir() -> Path:
    """The folder of built-in recipes: ``ckptsel/_recipes`` in a wheel, ``recipes/`` in a checkout.

    The checkout folder is used only next to this project's ``pyproject.toml``: an installed
    wheel sits in site-packages, where some other distribution may own a ``recipes/`` folder.
    """
    installed = _PACKAGE_DIR / "_recipes"
    if installed.is_dir():
        return installed
    checkout = _PACKAGE_DIR.parent / "recipes"
    if checkout.is_dir() and (_PACKAGE_DIR.parent / "pyproject.toml").is_file():
        return checkout
    raise RecipeError(f"built-in recipes not found (looked in {installed} and {checkout})")


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipe names (file stems) and their files, sorted by name."""
    folder = recipes_dir()
    files = [*folder.glob("*.yaml"), *folder.glob("*.yml")]
    return {f.stem: f for f in sorted(files, key=lambda f: f.stem)}


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name, or a recipe file by path (anything ending in .yaml/.yml or that exists)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file() or "/" in text:
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        return _load_file(path)
    builtin = builtin_recipes()
    if text not in builtin:
        raise RecipeError(
            f"unknown recipe {text!r} (built in: {', '.join(builtin) or 'none'}); give a name or a path to a .yaml file"
        )
    return _load_file(builtin[text])


def override(recipe: Recipe, **sections: dict[str, Any]) -> Recipe:
    """A copy of ``recipe`` with the given section values replaced (``data={...}``, ``sampling={...}``).

    ``None`` values are ignored, so unset CLI options keep the recipe's values. The result is
    validated again, which a plain ``model_copy(update=...)`` would not do.
    """
    payload = recipe.model_dump()
    for section, values in sections.items():
        if section not in payload or not isinstance(payload[section], dict):
            raise RecipeError(f"recipe has no settings section {section!r}")
        payload[section].update({k: v for k, v in values.items() if v is not None})
    return _validate(payload, source="options")


def _load_file(path: Path) -> Recipe:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        payload = yaml.safe_load(text)
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{where}: invalid YAML ({problem})") from None
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of settings, got {type(payload).__name__}")
    payload.setdefault("name", path.stem)
    return _validate(payload, source=str(path), text=text)


def _validate(payload: dict, source: str, text: str | None = None) -> Recipe:
    """Validate into a Recipe; the first problem becomes one line naming the file, line and field."""
    from pydantic import ValidationError

    try:
        return Recipe.model_validate(payload)
    except ValidationError as exc:
        raise RecipeError(validation_message(exc, source, text)) from None


def validation_message(exc, source: str, text: str | None = None) -> str:
    """``source[:line]: field: message`` for the first problem of a pydantic ValidationError.

    ``text`` is the YAML the payload came from, to find the line; shared by every settings file
    ckptsel reads (recipes, gate policies).
    """
    error = exc.errors()[0]
    loc = tuple(error["loc"])
    field = ".".join(str(part) for part in loc) or "(top level)"
    line = _yaml_line(text, loc) if text is not None else None
    where = f"{source}:{line}" if line else source
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    message = "unknown setting" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
    return f"{where}: {field}: {message}{more}"


def _yaml_line(text: str, loc: tuple) -> int | None:
    """1-based line of the YAML key at ``loc`` (the deepest part that exists), or None."""
    import yaml

    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
        if match is None:
            break
        line = match[0].start_mark.line + 1
        node = match[1]
    return line
