"""The pipeline's steps as plain functions: each is content-addressed and runs in a fresh process.

Every step takes small records and returns a small record (paths, hashes, numbers). Its
cache key hashes everything its output depends on, so an unchanged step is a lookup and a
changed variant re-runs only its own branch. Heavy steps run in a spawned child process:
that gives every variant a clean peak-memory reading, proves artifacts reload from disk in
a fresh process, frees all memory between variants, and lets a caller kill a stuck step.
The Prefect tasks in ``tasks/`` wrap exactly these functions.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from quantflow.cache import StepCache, content_key
from quantflow.calibration import CalibrationRecord, build_calibration
from quantflow.environment import code_version
from quantflow.errors import QuantflowError
from quantflow.evaluate import BASELINE_LOGPROBS, EvalRecord
from quantflow.quantize import QuantizeRecord
from quantflow.sources import ModelRef
from quantflow.spec import BnbVariant, CalibrationSpec, EvaluationSpec, RunSpec, Variant

R = TypeVar("R", bound=BaseModel)
T = TypeVar("T")
QUANT_PACKAGES = ("torch", "transformers", "llmcompressor", "compressed-tensors")
EVAL_PACKAGES = ("torch", "transformers", "compressed-tensors", "bitsandbytes", "lm-eval")


class StepRun(BaseModel):
    """What one step call did: found its result in the cache, or computed it. Runs are proven by these, not by clocks."""

    step: str
    variant: str
    key: str
    cached: bool
    seconds: float


def _child(root: str, step: str, key: str, work: Callable[..., BaseModel], kwargs: dict[str, Any]) -> BaseModel:
    cache = StepCache(Path(root))
    with cache.writing(step, key) as scratch:
        record = work(out=scratch, final=cache.folder(step, key), **kwargs)
        cache.save(scratch, record)
    return record


def cached(cache: StepCache, step: str, key: str, record: type[R], work: Callable[..., R], isolate: bool = True,
           timeout: float | None = None, **kwargs: Any) -> tuple[R, bool]:
    """Return (record, was_cached); compute it with ``work(out=, final=, **kwargs)`` when missing (see ``isolated``)."""
    hit = cache.lookup(step, key, record)
    if hit is not None:
        return hit, True
    if cache.read_only:
        raise QuantflowError(f"step '{step}' ({key}) is not in the cache at {cache.root}, though the worker that ran it finished",
                             "fanned-out runs need output.cache_dir on storage that every worker and the parent share "
                             "(one host, or a shared filesystem)")
    if not isolate:
        return _child(str(cache.root), step, key, work, kwargs), False
    return isolated(step, timeout, _child, str(cache.root), step, key, work, kwargs), False


def isolated(label: str, timeout: float | None, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``work(*args, **kwargs)`` in a fresh spawned process, killed when it outlives ``timeout``.

    A thread-based timeout (Prefect's) cannot interrupt a blocking CUDA or BLAS call; killing
    the process can. A fresh process also gives the step its own peak memory reading.
    """
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    try:
        return pool.submit(work, *args, **kwargs).result(timeout=timeout)
    except FuturesTimeout:
        for process in list(pool._processes.values()):  # the executor has no public kill; its workers are ours
            process.kill()
        raise QuantflowError(f"step '{label}' ran longer than its timeout of {timeout:.0f} s and was killed",
                             "raise step_timeout_s in the run spec, or give the step a faster device") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def calibration_key(model: ModelRef, calibration: CalibrationSpec, evaluation: EvaluationSpec) -> str:
    # the evaluation corpus decides which half of a shared source calibration may read
    return content_key("calibration", model.fingerprint, calibration, evaluation.corpus, evaluation.text_column, code_version("transformers"))


def calibrate(cache: StepCache, model: ModelRef, spec: RunSpec, isolate: bool = True) -> tuple[CalibrationRecord, bool]:
    key = calibration_key(model, spec.calibration, spec.evaluation)
    return cached(cache, "calibration", key, CalibrationRecord, build_calibration, isolate, spec.step_timeout_s,
                  spec=spec.calibration, evaluation=spec.evaluation, tokenizer_path=model.path)


def quantize_key(model: ModelRef, variant: Variant, group_size: int | None, calibration: CalibrationRecord, dtype: str, device: str) -> str:
    from quantflow.quantize import needs_calibration

    used = calibration.hash if needs_calibration(variant) else None  # RTN's result does not depend on the calibration set
    return content_key("quantize", model.fingerprint, variant.model_dump(exclude={"name"}), group_size, used, dtype, device,
                       code_version(*QUANT_PACKAGES))


def quantize(cache: StepCache, model: ModelRef, variant: Variant, group_size: int | None, note: str | None,
             calibration: CalibrationRecord, dtype: str, device: str, isolate: bool = True,
             timeout: float | None = None, gpu_memory_gb: float | None = None) -> tuple[QuantizeRecord, bool]:
    from quantflow.quantize import quantize_weights

    key = quantize_key(model, variant, group_size, calibration, dtype, device)
    record, hit = cached(cache, "quantize", key, QuantizeRecord, quantize_weights, isolate, timeout, model_path=model.path, variant=variant,
                         group_size=group_size, note=note, calibration=calibration, dtype=dtype, device=device,
                         gpu_memory_gb=gpu_memory_gb)
    return record.model_copy(update={"variant": variant.name}), hit


def eval_key(subject: str, spec: EvaluationSpec, device: str, baseline_key: str | None) -> str:
    return content_key("evaluate", subject, spec, device, baseline_key, code_version(*EVAL_PACKAGES))


def evaluate(cache: StepCache, name: str, key: str, texts_from: RunSpec, model_path: str, device: str,
             bnb: BnbVariant | None, baseline_key: str | None, isolate: bool = True) -> tuple[EvalRecord, bool]:
    """Evaluate one model folder (optionally loaded through bitsandbytes) under the run's protocol."""
    record, hit = cached(cache, "evaluate", key, EvalRecord, _evaluate_work, isolate, texts_from.step_timeout_s, name=name, run=texts_from,
                         model_path=model_path, device=device, bnb=bnb,
                         baseline=str(cache.folder("evaluate", baseline_key) / BASELINE_LOGPROBS)
                         if baseline_key and texts_from.evaluation.kl_tokens else None)
    return record.model_copy(update={"variant": name}), hit


def _evaluate_work(out: Path, final: Path, name: str, run: RunSpec, model_path: str, device: str,
                   bnb: BnbVariant | None, baseline: str | None) -> EvalRecord:
    from quantflow.quantize import bnb_config
    from quantflow.resources import cap_gpu_memory, compute_dtype, over_budget

    compute = compute_dtype(device, run.model.dtype)
    config = bnb_config(bnb) if bnb else None
    cap_gpu_memory(run.gpu_memory_gb)
    with over_budget("evaluate", run.gpu_memory_gb):
        return _evaluate_loaded(out, name, run, model_path, device, bnb, baseline, compute, config)


def _evaluate_loaded(out: Path, name: str, run: RunSpec, model_path: str, device: str, bnb: BnbVariant | None,
                     baseline: str | None, compute: str, config) -> EvalRecord:
    from transformers import AutoTokenizer

    from quantflow.corpus import evaluation_documents
    from quantflow.environment import package_version
    from quantflow.evaluate import evaluate_model, folder_size, load_for_eval
    from quantflow.int4 import load_int4, use_int4

    budget = run.gpu_memory_gb
    if not bnb and use_int4(model_path, run.evaluation.kernels, device):
        model, tokenizer = load_int4(model_path, device), AutoTokenizer.from_pretrained(model_path)
        size = (folder_size(Path(model_path)), "on_disk_safetensors")
        runtime = f"PyTorch {package_version('torch')} int4 tinygemm kernels on the packed weights (bf16 activations)"
    elif bnb:
        model, tokenizer = load_for_eval(model_path, device, compute, config, budget)
        size = (model.get_memory_footprint(), "in_memory_weights")
        runtime = f"transformers {package_version('transformers')} + bitsandbytes {package_version('bitsandbytes')}"
    else:
        model, tokenizer = load_for_eval(model_path, device, compute, config, budget)
        size = (folder_size(Path(model_path)), "on_disk_safetensors")
        packed = (Path(model_path) / "config.json").read_text().count("compressed-tensors") > 0
        runtime = f"transformers {package_version('transformers')}" + (", compressed-tensors decompressed to dense at load" if packed else "")
    texts = evaluation_documents(run.calibration, run.evaluation)
    return evaluate_model(model, tokenizer, name, texts, run.evaluation, runtime, size,
                          baseline=Path(baseline) if baseline else None,
                          save_baseline=out / BASELINE_LOGPROBS if baseline is None and run.evaluation.kl_tokens else None)
