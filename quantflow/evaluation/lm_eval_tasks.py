"""lm-evaluation-harness tasks, scored on the model object the rest of the evaluation already loaded.

Handing lm-eval the loaded model (not a path) means each variant is scored exactly as it runs
in the report: int4 kernels, bitsandbytes or dense. The tasks are checked when the run is
planned (lm-eval installed, names known, data loadable), so a missing dataset fails before any
GPU time is spent.
"""

from __future__ import annotations

import math
from typing import Any

from quantflow.errors import QuantflowError
from quantflow.spec import LmEvalSpec

OFFLINE_FIX = (
    "run where the Hugging Face hub is reachable, pre-fetch the datasets into the HF cache, or write a task over "
    "local files and name its folder in evaluation.lm_eval.include_path"
)


def _require_harness() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise QuantflowError(
            "evaluation.lm_eval needs the lm-eval package, which is not installed",
            "pip install 'quantflow[lm-eval]', or set evaluation.lm_eval to null",
        ) from None


def task_manager(spec: LmEvalSpec):
    """lm-eval's task index; only ``include_path`` when it holds every task (indexing the ~15k built-ins takes
    seconds)."""
    from lm_eval.tasks import TaskManager

    if spec.include_path is None:
        return TaskManager()
    if not spec.include_path.is_dir():
        raise QuantflowError(
            f"evaluation.lm_eval.include_path {spec.include_path} is not a folder",
            "point it at a folder of lm-eval task YAML files, or remove it",
        )
    own = TaskManager(include_path=str(spec.include_path), include_defaults=False)
    if set(spec.tasks) <= set(own.all_tasks):
        return own
    return TaskManager(include_path=str(spec.include_path))


def check_tasks(spec: LmEvalSpec) -> None:
    """Fail now, with the fix, if a task is unknown or its data cannot be loaded."""
    _require_harness()
    manager = task_manager(spec)
    unknown = [name for name in spec.tasks if name not in set(manager.all_tasks)]
    if unknown:
        raise QuantflowError(
            f"unknown lm-eval task(s): {', '.join(unknown)}",
            "check the names with `lm-eval ls tasks`, or put your own task YAMLs in evaluation.lm_eval.include_path",
        )
    try:
        manager.load(list(spec.tasks))
    except Exception as error:  # datasets raises many unrelated types for an unreachable hub or a missing file
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise QuantflowError(
            f"lm-eval could not load the data of {', '.join(spec.tasks)}: {first}", OFFLINE_FIX
        ) from None


def run_tasks(model: Any, tokenizer: Any, spec: LmEvalSpec) -> dict[str, dict[str, float]]:
    """Score every task; returns {task: {metric: value}} with lm-eval's metric names (``acc``, ``acc_stderr``, ...)."""
    _require_harness()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size)
    results = lm_eval.simple_evaluate(
        model=harness_model,
        tasks=spec.tasks,
        num_fewshot=spec.num_fewshot,
        limit=spec.limit,
        task_manager=task_manager(spec),
        log_samples=False,
        bootstrap_iters=1000,
    )
    return {task: _numbers(metrics) for task, metrics in results["results"].items()}


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """Numeric metrics with lm-eval's ',none' filter suffix dropped (other filters keep their name)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key.removesuffix(",none")] = round(float(value), 6)
    return out
