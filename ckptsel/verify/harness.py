"""lm-eval as ckptsel's test-set harness: a task built from a local file, run on a model ckptsel loaded.

Why lm-eval at all, when ckptsel can sample and grade by itself: ``verify`` is the check on
ckptsel's prediction, so the measured side should come from the harness people already
trust and report, not from the code being checked.

A local test file becomes an lm-eval ``ConfigurableTask`` built in memory (no YAML, no
download, no task index):

* the docs are the rendered examples (``prompt``, ``reference``, ``uid``), handed over as an
  in-memory ``datasets.Dataset`` through ``custom_dataset`` -- lm-eval never calls
  ``datasets.load_dataset``;
* ``doc_to_text`` is the prompt exactly as ckptsel renders it for training (templates or chat
  template), zero-shot, no description, so lm-eval's context equals ckptsel's prompt;
* ``output_type: generate_until``, stopping only at EOS (``until: []``), as the model was
  trained to stop and as ckptsel's own sampler does;
* k samples per question through ``repeats`` with ``do_sample``, temperature and top-p (top-k
  off, as in ckptsel), or one greedy completion;
* the metric is ckptsel's grader, in ``process_results``: the fraction of the k samples
  graded correct, averaged over questions.

The model goes in as lm-eval's ``HFLM`` around the already-loaded model and tokenizer
(full checkpoints and LoRA adapters alike), so lm-eval loads nothing itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from ckptsel.data import Example
from ckptsel.errors import CkptselError
from ckptsel.settings import SamplingSettings

log = logging.getLogger(__name__)

TASK_NAME = "ckptsel_test_file"
METRIC = "acc"
# lm-eval's generate_until batch when the engine leaves it automatic (CPU, GPU).
CPU_BATCH = 32
GPU_BATCH = 64


@dataclass(frozen=True)
class DocResult:
    """One test question's outcome: fraction of samples graded correct, and the completions."""

    acc: float
    completions: tuple[str, ...]


def generation_kwargs(sampling: SamplingSettings, max_new_tokens: int) -> dict:
    """lm-eval ``generation_kwargs`` equivalent to ckptsel's sampling settings.

    ``top_k: 0`` switches off transformers' default top-k of 50, which ckptsel's sampler
    does not apply; ``until: []`` leaves EOS as the only stop (lm-eval adds it itself).
    """
    if sampling.temperature == 0:
        return {"until": [], "do_sample": False, "max_gen_toks": max_new_tokens}
    return {
        "until": [],
        "do_sample": True,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": 0,
        "max_gen_toks": max_new_tokens,
    }


def samples_per_question(sampling: SamplingSettings) -> int:
    """k, or 1 when greedy (temperature 0), as in :func:`ckptsel.measure.sampling.sample_completions`."""
    return 1 if sampling.temperature == 0 else sampling.k


def build_task(examples: Sequence[Example], grader, sampling: SamplingSettings, max_new_tokens: int,
               name: str = TASK_NAME):
    """An lm-eval ``ConfigurableTask`` over ``examples``, graded by ``grader``; builds fully offline."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    if not examples:
        raise CkptselError("no test examples to evaluate")
    k = samples_per_question(sampling)
    docs = [{"uid": ex.uid, "prompt": ex.prompt, "reference": ex.reference} for ex in examples]
    dataset = datasets.Dataset.from_list(docs)

    def grade(doc: dict, results: list) -> dict:
        # take_first_k hands over one list of k completions per question.
        completions = results[0] if isinstance(results[0], list) else [results[0]]
        return {METRIC: sum(bool(grader(text, doc["reference"])) for text in completions) / len(completions)}

    config = {
        "task": name,
        "custom_dataset": lambda **_: {"test": dataset},
        "test_split": "test",
        "doc_to_text": lambda doc: doc["prompt"],
        "doc_to_target": lambda doc: doc["reference"],
        "target_delimiter": "",
        "description": "",
        "num_fewshot": 0,
        "output_type": "generate_until",
        "generation_kwargs": generation_kwargs(sampling, max_new_tokens),
        "repeats": k,
        "filter_list": [{"name": "all", "filter": [{"function": "take_first_k", "k": k}]}],
        "process_results": grade,
        "metric_list": [{"metric": METRIC, "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1},
    }
    return ConfigurableTask(config=config)


def wrap_model(model, tokenizer, batch_size: int | None):
    """lm-eval's ``HFLM`` around a model and tokenizer that ckptsel has loaded.

    ``add_bos_token=True`` encodes contexts with the tokenizer's special tokens, as ckptsel's
    sampler does (``add_special_tokens=True``). lm-eval's own tqdm bar is switched off:
    ckptsel's CLI draws progress on stderr.
    """
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def generate_until(self, requests, disable_tqdm: bool = True):
            return super().generate_until(requests, disable_tqdm=True)

    device = model.get_input_embeddings().weight.device
    size = batch_size or (GPU_BATCH if device.type == "cuda" else CPU_BATCH)
    return QuietHFLM(pretrained=model, tokenizer=tokenizer, batch_size=size, add_bos_token=True)


def evaluate(lm, tasks: list, *, task_manager=None, limit: int | None = None, num_fewshot: int | None = None,
             seed: int = 0) -> dict:
    """``simple_evaluate`` with per-sample logs on; seeds python, numpy and torch with ``seed``."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    try:
        with _without_run_metadata(evaluator):
            return evaluator.simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=task_manager if task_manager is not None else TaskManager(include_defaults=False),
                limit=limit,
                num_fewshot=num_fewshot,
                bootstrap_iters=0,
                log_samples=True,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    except AssertionError as exc:  # lm-eval checks its inputs with assert (e.g. prompt + budget > max length)
        raise CkptselError(f"lm-eval refused the evaluation: {exc}") from None


@contextlib.contextmanager
def _without_run_metadata(evaluator):
    """Skip the environment report lm-eval attaches to its results file, which ckptsel never writes.

    Per call it runs ``git describe`` (printing "fatal: not a git repository" to the user's
    terminal outside a repository) and torch's ``collect_env`` (about 2 s: it runs pip).
    """
    saved = evaluator.get_git_commit_hash, evaluator.add_env_info
    evaluator.get_git_commit_hash, evaluator.add_env_info = (lambda: None), (lambda storage: None)
    try:
        yield
    finally:
        evaluator.get_git_commit_hash, evaluator.add_env_info = saved


def file_results(results: dict, name: str = TASK_NAME) -> dict[str, DocResult]:
    """Per-question results of the local-file task, keyed by example uid."""
    out: dict[str, DocResult] = {}
    for sample in results["samples"][name]:
        filtered = sample["filtered_resps"][0]
        completions = tuple(filtered if isinstance(filtered, list) else [filtered])
        out[sample["doc"]["uid"]] = DocResult(acc=float(sample[METRIC]), completions=completions)
    return out


# --------------------------------------------------------------------------- named lm-eval tasks


def task_manager_for(names: Sequence[str], include_path: str | None = None):
    """A TaskManager that knows ``names``; the full built-in index (slow: ~15k tasks) only when needed."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise CkptselError(f"unknown lm-eval task(s): {', '.join(unknown)} (see `lm-eval ls tasks`)")
    return manager


def headline_metric(task_results: dict) -> tuple[str, float]:
    """The task's first reported metric (``name,filter``) and its value: what ``verify`` calls accuracy."""
    for key, value in task_results.items():
        if "," in key and "_stderr" not in key and isinstance(value, (int, float)):
            return key, float(value)
    raise CkptselError(f"lm-eval reported no numeric metric (got {', '.join(task_results)})")


def task_doc_values(results: dict, task: str, metric_key: str) -> dict[int, float]:
    """Per-document values of ``metric_key`` (``name,filter``) for a named task, keyed by doc id."""
    metric, _, filter_name = metric_key.partition(",")
    return {
        int(sample["doc_id"]): float(sample[metric])
        for sample in results["samples"][task]
        if sample.get("filter", filter_name) == filter_name and metric in sample
    }
