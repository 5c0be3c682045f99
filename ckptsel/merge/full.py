"""Full-weight merges through mergekit's Python API.

ckptsel checks the request (:mod:`ckptsel.merge.plan`), writes mergekit's configuration and
lets mergekit do the merge: its methods are the reference implementations, and a linear
merge here is bit-for-bit the one ``mergekit-yaml`` writes for the same configuration
(``tests/test_merge.py``). Models are passed as absolute local paths, in mergekit's
structured form (``{"model": {"path": ...}}``) so that a ``+`` or ``@`` in a folder name is
never read as a LoRA or a hub revision; mergekit reads safetensors lazily, tensor by tensor,
and copies the tokenizer and ``generation_config.json`` from the base (or first) model.

Each checkpoint is read from the model folder its format gives (:meth:`MergePlan.model_folder`): its own
folder, or, for layouts transformers cannot read as they lie (DeepSpeed ZeRO, FSDP), its converted copy
in the cache, made on first use (ckptsel/DESIGN.md, *Adding a checkpoint format*); the output is an
ordinary safetensors model folder either way.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ckptsel.merge.plan import MergeError, MergePlan

log = logging.getLogger(__name__)

# Methods that draw random masks; only they get mergekit's global seed, so an ordinary merge
# leaves the caller's random state alone.
_RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}


def mergekit_config(plan: MergePlan, folders: list[Path] | None = None, base_folder: Path | None = None) -> dict:
    """The mergekit configuration (as a plain dict) for a full-weight plan; ``folders`` (and ``base_folder``)
    are the model folders mergekit reads, by default the checkpoints' own."""
    from mergekit.merge_methods import registry

    known = {p.name for p in registry.get(plan.method).spec.parameters}
    params = dict(plan.parameters)
    if "normalize" in known:
        params.setdefault("normalize", True)  # weights are relative (see plan.py)
    paths = [str(f) for f in folders] if folders is not None else [str(c.path) for c in plan.inputs]
    if plan.method == "slerp":
        # slerp interpolates from its base (the first checkpoint) toward the second by t.
        params["t"] = plan.normalized_weights[1]
        config = {"merge_method": "slerp", "base_model": _ref(paths[0]), "models": [{"model": _ref(p)} for p in paths]}
    else:
        takes_weight = "weight" in known
        config = {
            "merge_method": plan.method,
            "models": [
                {"model": _ref(p), **({"parameters": {"weight": w}} if takes_weight else {})}
                for p, w in zip(paths, plan.weights)
            ],
        }
        if plan.base_model is not None:
            config["base_model"] = _ref(str(base_folder) if base_folder is not None else plan.base_model)
    if params:
        config["parameters"] = params
    if plan.dtype is not None:
        config["out_dtype"] = plan.dtype
    return config


def _ref(path: str) -> dict:
    return {"model": {"path": path}}


class _WriteFailureFilter(logging.Filter):
    """Keeps a write failure (no space, no permission) that mergekit logs instead of raising."""

    def __init__(self):
        super().__init__()
        self.exc: BaseException | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        from ckptsel.outputs import write_failure

        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and write_failure(exc, "") is not None:
            self.exc = exc
            return False
        return True


def build_full(plan: MergePlan, folder: Path, *, progress_bars: bool = False) -> dict:
    """Run the merge into ``folder`` (weights, config, tokenizer, generation config and
    ``mergekit_config.yml``, from which ``mergekit-yaml`` reproduces it). Returns a report."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    folders = [plan.model_folder(c) for c in plan.inputs]  # converted copies made here, once, when needed
    base_folder = plan.model_folder(plan.base) if plan.base is not None else None
    config = MergeConfiguration.model_validate(mergekit_config(plan, folders, base_folder))
    config_yaml = config.to_yaml()  # before run_merge, which rewrites the config in place
    options = MergeOptions(
        device=plan.device,
        random_seed=plan.seed if plan.method in _RANDOM_METHODS else None,
        copy_tokenizer=True,
        write_model_card=False,  # ckptsel writes its own card, naming fingerprints and metrics
        safe_serialization=True,
        trust_remote_code=False,
        quiet=not progress_bars,
    )
    log.info("mergekit %s of %d checkpoints into %s", plan.method, len(plan.inputs), folder)
    copy_failure = _WriteFailureFilter()
    mergekit_log = logging.getLogger("mergekit.merge")
    mergekit_log.addFilter(copy_failure)  # mergekit logs a failed tokenizer copy (traceback and all) and goes on
    try:
        run_merge(config, str(folder), options=options)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        log.debug("mergekit failed", exc_info=True)
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MergeError(f"mergekit {plan.method}: {first_line}") from exc
    finally:
        mergekit_log.removeFilter(copy_failure)
    if copy_failure.exc is not None:  # a full disk while copying the tokenizer: the merge failed
        raise copy_failure.exc
    (folder / "mergekit_config.yml").write_text(config_yaml + "\n", encoding="utf-8")
    return {"mergekit_config": config_yaml}
