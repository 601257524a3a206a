"""One evaluation for every variant: perplexity, KL from the baseline, speed, memory, size, samples.

Perplexity protocol (documented in docs/evaluation.md): the held-out texts are joined with
blank lines and tokenized once without special tokens; windows hold ``window`` tokens
(``window - 1`` of text after a BOS token when the tokenizer has one and ``bos`` is on) and
start every ``stride`` text tokens (default: no overlap, as in the GPTQ and AWQ papers). A
window scores its last ``stride`` tokens (the first window scores all), so with overlap every
scored token still has up to a full window of context.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

from quantflow.errors import QuantflowError
from quantflow.evaluation.kv_cache import KVCacheRecord, bytes_per_token, kv_precision
from quantflow.evaluation.lm_eval_tasks import run_tasks
from quantflow.infra import progress
from quantflow.infra.resources import peak_memory_mb, placement_budget, reset_peak_memory, visible_devices
from quantflow.spec import EvaluationSpec, SpeedSpec

BASELINE_LOGPROBS = "baseline_logprobs.safetensors"


class Window(BaseModel):
    start: int
    length: int
    scored_from: int


class SpeedRecord(BaseModel):
    batch: int
    prompt_len: int
    gen_len: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    decode_ms_per_token: float
    repeats: int
    bandwidth_floor_fraction: float | None = None
    harness: str = ""
    compile_seconds: float = 0.0


class PrefillRecord(BaseModel):
    """One long prompt's prefill at batch 1: what a serving engine spends before the first token of a long request."""

    prompt_len: int
    tokens_per_s: float
    ms: float
    repeats: int


class EvalRecord(BaseModel):
    """Everything measured on one variant; units are in the field names or the report schema."""

    variant: str
    runtime: str
    device: str
    compute_dtype: str
    perplexity: float
    nll_per_token: float
    protocol: dict
    kl_mean: float | None
    kl_tokens: int
    speed: list[SpeedRecord]
    peak_memory_mb: float
    memory_kind: str
    size_bytes: int
    size_kind: str
    generations: list[dict]
    seconds: float
    placement: dict[str, float] = {}
    lm_eval: dict[str, dict[str, float]] = {}
    visible_devices: str | None = None
    phase_seconds: dict[str, float] = {}  # where an evaluation's time goes: load, quality, speed, samples, lm_eval
    prefill: PrefillRecord | None = None
    kv_cache: KVCacheRecord | None = None


def windows(total: int, span: int, stride: int, limit: int | None) -> list[Window]:
    """Windows of ``span`` text tokens over ``total`` tokens; each scores tokens not scored before."""
    result: list[Window] = []
    start = 0
    while start < total - 1 and (limit is None or len(result) < limit):
        length = min(span, total - start)
        scored_from = 0 if not result else max(0, length - stride)
        result.append(Window(start=start, length=length, scored_from=scored_from))
        if start + length >= total:
            break
        start += stride
    return result


def eval_tokens(texts: list[str], tokenizer) -> torch.Tensor:
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < 2:
        raise QuantflowError(
            "the evaluation corpus tokenizes to fewer than 2 tokens", "use an evaluation corpus with real text"
        )
    return ids


def window_span(spec: EvaluationSpec, model, tokenizer) -> tuple[int, int | None]:
    """(text tokens per window, BOS id or None), with the window clamped to the model's context."""
    context = getattr(model.config, "max_position_embeddings", None) or spec.window
    window = min(spec.window, context)
    bos = tokenizer.bos_token_id if spec.bos else None
    return window - (1 if bos is not None else 0), bos


@torch.no_grad()
def score(
    model,
    ids: torch.Tensor,
    spec: EvaluationSpec,
    span: int,
    bos: int | None,
    baseline: Path | None,
    save_baseline: Path | None,
) -> tuple[float, int, float | None, int]:
    """(mean NLL, scored tokens, mean KL from baseline or None, KL tokens) over the protocol's windows."""
    stride = min(spec.stride or span, span)
    device = next(model.parameters()).device
    reference = load_file(str(baseline)) if baseline else None
    nll_sum, count, kl_sum, kl_count, kept = 0.0, 0, 0.0, 0, []
    scored = windows(ids.numel(), span, stride, spec.max_windows)
    for index, win in enumerate(scored):
        progress.advance(index, len(scored), "windows")
        text = ids[win.start : win.start + win.length]
        inputs = torch.cat([torch.tensor([bos]), text]) if bos is not None else text
        logits = model(inputs.unsqueeze(0).to(device)).logits[0].float()
        offset = 1 if bos is not None else 0
        first = max(win.scored_from, 0 if bos is not None else 1)  # without BOS the first token has no prediction
        predicting = logits[first + offset - 1 : win.length + offset - 1]
        targets = text[first:].to(device)
        logprobs = F.log_softmax(predicting, dim=-1)
        nll_sum += -logprobs.gather(1, targets.unsqueeze(1)).sum().item()
        count += targets.numel()
        room = spec.kl_tokens - kl_count
        if room > 0:
            part = logprobs[:room]
            if save_baseline is not None:
                kept.append(part.half().cpu())
            if reference is not None:
                # renormalize after the fp16 round trip so KL stays a true divergence (>= 0)
                base = F.log_softmax(reference[f"w{index}"].to(device).float()[: part.shape[0]], dim=-1)
                kl_sum += F.kl_div(part, base, log_target=True, reduction="sum").item()
            kl_count += part.shape[0]
    progress.advance(len(scored), len(scored), "windows")
    if save_baseline is not None:
        save_file({f"w{i}": t.contiguous() for i, t in enumerate(kept)}, str(save_baseline))
    kl = kl_sum / kl_count if reference is not None and kl_count else None
    return nll_sum / count, count, kl, kl_count


def measure_speed(model, spec: SpeedSpec) -> list[SpeedRecord]:
    """Prefill and decode throughput with ``quantflow.evaluation.decode``'s harness, the same for every variant.

    Static KV cache; on CUDA the decode step runs as a CUDA graph; synchronized timing, warm-up,
    medians over repeats. The harness labels its mode in ``harness``.
    """
    from quantflow.evaluation.decode import benchmark

    records = []
    for batch in spec.batch_sizes:
        run = benchmark(model, "", batch, spec, reset_peak=False)
        records.append(
            SpeedRecord(
                batch=batch,
                prompt_len=spec.prompt_len,
                gen_len=spec.gen_len,
                repeats=spec.repeats,
                prefill_tokens_per_s=round(batch * spec.prompt_len / (run.prefill_ms / 1e3), 1),
                decode_tokens_per_s=run.decode_tokens_per_s,
                decode_ms_per_token=round(run.decode_ms_per_step, 3),
                bandwidth_floor_fraction=run.bandwidth_floor_fraction,
                harness=run.harness,
                compile_seconds=run.compile_seconds,
            )
        )
    return records


def measure_prefill(model, spec: SpeedSpec) -> PrefillRecord | None:
    """Batch-1 prefill of a ``spec.prefill_len``-token prompt (capped at the model's context), on the same harness
    as the decode figures: the prefill path of the kernels (unpack + cuBLAS for W4) at a serving prompt length."""
    from quantflow.evaluation.decode import benchmark

    if not spec.prefill_len:
        return None
    context = getattr(model.config, "max_position_embeddings", None) or spec.prefill_len
    length = min(spec.prefill_len, context - 2)
    long = spec.model_copy(update={"batch_sizes": [1], "prompt_len": length, "gen_len": 2})
    run = benchmark(model, "", 1, long, compile=False, reset_peak=False)  # eager: prefill is never graph-captured
    return PrefillRecord(
        prompt_len=length,
        tokens_per_s=round(length / (run.prefill_ms / 1e3), 1),
        ms=run.prefill_ms,
        repeats=run.repeats,
    )


@torch.no_grad()
def greedy_samples(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[dict]:
    device = next(model.parameters()).device
    samples = []
    for prompt in prompts:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = prompt
        inputs = tokenizer(
            text, return_tensors="pt", add_special_tokens=not getattr(tokenizer, "chat_template", None)
        ).to(device)
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=model.generation_config.pad_token_id or tokenizer.eos_token_id,
        )
        samples.append(
            {
                "prompt": prompt,
                "output": tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True),
            }
        )
    return samples


def evaluate_model(
    model,
    tokenizer,
    name: str,
    texts: list[str],
    spec: EvaluationSpec,
    runtime: str,
    size: tuple[int, str],
    baseline: Path | None,
    save_baseline: Path | None,
    phases: dict[str, float] | None = None,
) -> EvalRecord:
    """Run the whole evaluation protocol on a loaded model, timing each phase (``phases`` may hold the load's)."""
    start = time.perf_counter()
    phases = dict(phases or {})
    with timed(phases, "quality"):
        ids = eval_tokens(texts, tokenizer)
        span, bos = window_span(spec, model, tokenizer)
        nll, count, kl, kl_count = score(model, ids, spec, span, bos, baseline, save_baseline)
        kv_cache = kv_record(model, tokenizer, ids, spec)
    with timed(phases, "speed"):
        speed = measure_speed(model, spec.speed) if spec.speed else []
        prefill = measure_prefill(model, spec.speed) if spec.speed else None
    with timed(phases, "samples"):
        generations = greedy_samples(model, tokenizer, spec.prompts, spec.max_new_tokens)
    tasks = {}
    if spec.lm_eval:
        with timed(phases, "lm_eval"):
            tasks = run_tasks(model, tokenizer, spec.lm_eval)
    peak, kind = peak_memory_mb()
    device = next(model.parameters()).device
    spread = placement(model)
    return EvalRecord(
        variant=name,
        runtime=runtime,
        device=str(device),
        compute_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        perplexity=round(math.exp(nll), 4),
        nll_per_token=round(nll, 5),
        protocol={
            "window_tokens": span + (bos is not None),
            "text_tokens_per_window": span,
            "stride": min(spec.stride or span, span),
            "bos": bos is not None,
            "scored_tokens": count,
            "corpus_tokens": ids.numel(),
        },
        kl_mean=round(kl, 6) if kl is not None else None,
        kl_tokens=kl_count if baseline or save_baseline else 0,
        speed=speed,
        prefill=prefill,
        kv_cache=kv_cache,
        peak_memory_mb=peak,
        memory_kind=kind,
        size_bytes=size[0],
        size_kind=size[1],
        generations=generations,
        seconds=round(time.perf_counter() - start, 1),
        placement=spread if len(spread) > 1 else {},
        lm_eval=tasks,
        visible_devices=visible_devices(),
        phase_seconds=phases,
    )


def kv_record(model, tokenizer, ids: torch.Tensor, spec: EvaluationSpec) -> KVCacheRecord:
    """The model's KV cache: its precision, bytes per token and, when asked, the perplexity at a long context (the
    cache's error grows with the keys it holds). The long windows score about as many tokens as the main ones."""
    precision = kv_precision(model)
    record = KVCacheRecord(precision=precision, bytes_per_token=bytes_per_token(model.config, precision))
    if not spec.long_window():
        return record
    budget = spec.max_windows * spec.window if spec.max_windows else None
    long = spec.model_copy(
        update={
            "window": spec.long_window(),
            "stride": None,
            "kl_tokens": 0,
            "max_windows": max(1, budget // spec.long_window()) if budget else None,
        }
    )
    span, bos = window_span(long, model, tokenizer)
    nll, count, _, _ = score(model, ids, long, span, bos, None, None)
    return record.model_copy(
        update={
            "long_window": span + (bos is not None),
            "long_perplexity": round(math.exp(nll), 4),
            "long_scored_tokens": count,
        }
    )


@contextmanager
def timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall seconds to ``phases[name]`` (CUDA work synchronized first, so it counts where it ran)."""
    start = time.perf_counter()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    phases[name] = round(phases.get(name, 0.0) + time.perf_counter() - start, 2)


def placement(model) -> dict[str, float]:
    """GiB of parameters on each device: shows how a model too big for one card was spread.

    accelerate leaves weights it offloaded to host memory as ``meta`` placeholders on the module
    (the real tensors sit in its hooks); they are reported as ``cpu``.
    """
    sizes: dict[str, float] = {}
    for parameter in model.parameters():
        device = "cpu" if parameter.device.type == "meta" else str(parameter.device)
        sizes[device] = sizes.get(device, 0.0) + parameter.numel() * parameter.element_size() / 2**30
    return {device: round(gib, 3) for device, gib in sorted(sizes.items())}


def folder_size(path: Path) -> int:
    """Bytes of the weight files in a model folder."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


FP4_FORMATS = ("nvfp4-pack-quantized", "mxfp4-pack-quantized")


def is_fp4(path: Path) -> bool:
    """An NVFP4 or MXFP4 compressed-tensors artifact.

    transformers keeps these compressed and decompresses each weight in bf16 at every call (which fails beside
    float32 activations, and is no FP4 kernel either): they are dequantized once at load instead, the exact
    emulation of FP4 weights; W4A4 activations stay quantized and dequantized per group by compressed-tensors.
    """
    config = path / "config.json"
    quant = (json.loads(config.read_text()).get("quantization_config") or {}) if config.is_file() else {}
    return quant.get("format") in FP4_FORMATS


def load_for_eval(
    path: str, device: str, compute_dtype: str, quantization_config=None, gpu_memory_gb: float | None = None
):
    """Load a model folder for evaluation; ``reset_peak_memory`` first so loading counts toward the peak.

    With several visible GPUs, or a GPU memory budget, accelerate places the layers
    (``device_map="auto"``): a model bigger than one card spreads over the worker's GPUs, and
    what exceeds them all stays in host memory and is streamed in layer by layer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantflow.evaluation.embedding_load import embedding_load
    from quantflow.evaluation.expert_load import expert_load, in_compute_dtype

    reset_peak_memory()
    kwargs = {"dtype": getattr(torch, compute_dtype), "use_safetensors": True}
    if quantization_config is None and is_fp4(Path(path)):
        from transformers import CompressedTensorsConfig

        quantization_config = CompressedTensorsConfig(dequantize=True)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device == "cuda" and (torch.cuda.device_count() > 1 or gpu_memory_gb):
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = placement_budget(gpu_memory_gb)
    elif quantization_config is not None:
        kwargs["device_map"] = device
    with expert_load(), embedding_load():
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if "device_map" not in kwargs:
        model = model.to(device)
    if is_fp4(Path(path)):  # dequantized FP4 weights come out in bf16: the emulation runs in the compute dtype
        model = model.to(getattr(torch, compute_dtype))
    if quantization_config is None:
        in_compute_dtype(model, getattr(torch, compute_dtype))
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)
