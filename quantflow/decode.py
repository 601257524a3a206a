"""One decode benchmark for the baseline and every variant: static KV cache, CUDA graphs, synced timing.

Plain eager ``generate`` is bound by Python overhead at batch 1 (a few ms per token whatever
the weights), so it hides exactly what 4-bit weights buy: fewer bytes read per token. This
harness removes that overhead the standard way (gpt-fast, vLLM): a ``StaticCache`` so shapes
never change, the one-token decode step compiled with ``torch.compile(mode="reduce-overhead")``
(CUDA graphs), prefill timed on its own, warm-up runs, ``torch.cuda.synchronize`` around every
timed region, medians over repeats, and the peak memory of the whole run. It also reports how
close decode gets to the card's memory-bandwidth floor (every weight byte read once per step).
"""

from __future__ import annotations

import statistics
import time

import torch
from pydantic import BaseModel

# Peak HBM bandwidth (bytes/s) by device name fragment; the floor is weights / bandwidth per step.
HBM_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H200": 4.8e12, "A100-SXM4-80GB": 2.04e12,
                 "A100 80GB PCIe": 1.94e12, "A100-SXM4-40GB": 1.56e12, "L40S": 0.864e12}


class DecodeRecord(BaseModel):
    runtime: str
    harness: str  # how the decode loop ran, e.g. "static cache, CUDA graphs"
    batch: int
    prompt_len: int
    gen_len: int
    prefill_ms: float
    decode_ms_per_step: float
    decode_tokens_per_s: float
    peak_memory_mb: float
    weight_bytes: int
    bandwidth_floor_fraction: float | None
    repeats: int


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step must read: every parameter and buffer except the embedding table (one row per token)."""
    embedding = model.get_input_embeddings().weight
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if t is not embedding or model.config.tie_word_embeddings}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def bandwidth() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((value for key, value in HBM_BANDWIDTH.items() if key in name), None)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def benchmark(model: torch.nn.Module, runtime: str, batch: int, prompt_len: int, gen_len: int, warmup: int = 2, repeats: int = 5,
              compile: bool = True, seed: int = 0, reset_peak: bool = True) -> DecodeRecord:
    """Time prefill and ``gen_len`` greedy decode steps of ``model`` on random prompts (same prompts for every model).

    ``reset_peak=False`` leaves the peak-memory counter alone, for callers that report one peak for a whole evaluation.
    """
    from transformers import StaticCache

    device = next(model.parameters()).device
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(seed)).to(device)
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + gen_len)

    def step(token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        logits = model(token, past_key_values=cache, cache_position=position, position_ids=position.expand(batch, -1), use_cache=True).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    graphs = compile and device.type == "cuda"
    decode = torch.compile(step, mode="reduce-overhead", fullgraph=True) if graphs else step

    @torch.no_grad()
    def once() -> tuple[float, float]:
        cache.reset()
        _sync()
        start = time.perf_counter()
        token = step(prompt, torch.arange(prompt_len, device=device))
        _sync()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for index in range(gen_len - 1):
            if decode is not step:  # a new CUDA-graph step: the previous step's outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            token = decode(token.clone(), torch.tensor([prompt_len + index], device=device))
        _sync()
        return prefill, (time.perf_counter() - start) / (gen_len - 1)

    if reset_peak and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    harness = f"static cache, {'CUDA graphs' if graphs else 'eager'}"
    try:
        once()
    except Exception as error:  # a model whose forward torch.compile cannot capture still gets measured, labelled eager
        if decode is step:
            raise
        decode, harness = step, f"static cache, eager: compile failed with {type(error).__name__}"
    for _ in range(warmup):
        once()
    timings = [once() for _ in range(repeats)]
    prefill, per_step = statistics.median(t[0] for t in timings), statistics.median(t[1] for t in timings)
    floor_bw, size = bandwidth(), weight_bytes(model)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return DecodeRecord(runtime=runtime, harness=harness, batch=batch, prompt_len=prompt_len, gen_len=gen_len, prefill_ms=round(prefill * 1e3, 3),
                        decode_ms_per_step=round(per_step * 1e3, 4), decode_tokens_per_s=round(batch / per_step, 1), peak_memory_mb=round(peak, 1),
                        weight_bytes=size, bandwidth_floor_fraction=round(size / floor_bw / per_step, 3) if floor_bw else None, repeats=repeats)
