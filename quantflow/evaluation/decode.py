"""One decode benchmark for the baseline and every variant: static KV cache, CUDA graphs, synced timing.

Plain eager ``generate`` is bound by Python overhead at batch 1 (a few ms per token whatever
the weights), so it hides exactly what 4-bit weights buy: fewer bytes read per token. This
harness removes that overhead the standard way (gpt-fast, vLLM): a ``StaticCache`` so shapes
never change, the one-token decode step compiled by Inductor and captured into one CUDA graph,
prefill timed on its own, warm-up runs, ``torch.cuda.synchronize`` around every
timed region, medians over repeats, and the peak memory of the whole run. It also reports how
close decode gets to the card's memory-bandwidth floor (every weight byte read once per step).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from pydantic import BaseModel

from quantflow.evaluation.fuse import FusedProjections, fuse_projections
from quantflow.evaluation.int4 import pack_all
from quantflow.evaluation.precompiled import default_folder, load_or_compile
from quantflow.spec import SpeedSpec

# Peak HBM bandwidth (bytes/s) by device name fragment; the floor is weights / bandwidth per step.
HBM_BANDWIDTH = {
    "H100 80GB HBM3": 3.35e12,
    "H100 NVL": 3.9e12,
    "H100 PCIe": 2.0e12,
    "H200": 4.8e12,
    "A100-SXM4-80GB": 2.04e12,
    "A100 80GB PCIe": 1.94e12,
    "A100-SXM4-40GB": 1.56e12,
    "L40S": 0.864e12,
}


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
    compile_seconds: float = 0.0  # compiling, autotuning and capturing the step: paid once per process, not per token


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step must read: every parameter and buffer except the embedding table (one row per token)."""
    embedding = model.get_input_embeddings().weight
    tensors = {
        id(t): t
        for t in [*model.parameters(), *model.buffers()]
        if t is not embedding or model.config.tie_word_embeddings
    }
    return sum(t.numel() * t.element_size() for t in tensors.values())


def bandwidth() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((value for key, value in HBM_BANDWIDTH.items() if key in name), None)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _LayerSlot:
    """One decoder layer's part of a ``StaticCache``, handed to that layer as if it were the whole cache.

    Attention calls ``cache.update(k, v, self.layer_idx)``, and the cache indexes its layer list
    with that integer, so Dynamo specializes on it and traces one graph per layer. A slot that
    ignores the index makes every layer the same graph, traced and compiled once.
    """

    def __init__(self, layer) -> None:
        self.layer = layer

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.layer.update(key, value, *args, **kwargs)


class _Region(torch.nn.Module):
    """A decoder layer run through the one compiled layer function, with its own cache slot."""

    def __init__(self, layer: torch.nn.Module, slot: _LayerSlot, run: Callable) -> None:
        super().__init__()
        self.layer, self.slot, self.run = layer, slot, run

    def forward(self, hidden_states: torch.Tensor, *args, past_key_values=None, **kwargs):
        return self.run(self.layer, hidden_states, self.slot, args, kwargs)


def _run_layer(layer: torch.nn.Module, hidden_states: torch.Tensor, slot: _LayerSlot, args: tuple, kwargs: dict):
    return layer(hidden_states, *args, past_key_values=slot, **kwargs)


def compiled_layers(step: Callable, model: torch.nn.Module, cache, mode: str) -> Callable | None:
    """``step`` with every decoder layer run through one compiled layer graph ("regional compilation"), or None when
    the model has no layer list matching the cache's.

    Dynamo traces and Inductor compiles one layer instead of the whole step: a fraction of the
    compile, and the compiled code is reused by all layers. The glue between layers (embedding,
    mask, rotary tables, final norm, head) runs eager inside the CUDA graph, unfused: about 5% of a
    1.1B step on an H200 (docs/benchmarks.md). Layers are swapped in only for the call, so prefill
    and generate see the model unchanged.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(getattr(cache, "layers", ())) != len(layers):
        return None
    run = torch.compile(_run_layer, mode=mode, fullgraph=True)
    regions = torch.nn.ModuleList(_Region(layer, _LayerSlot(slot), run) for layer, slot in zip(layers, cache.layers))

    def regional(ids: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        model.model.layers = regions
        try:
            return step(ids, at)
        finally:
            model.model.layers = layers

    return regional


def captured(
    compiled: Callable, prefill: Callable[[], None], token: torch.Tensor, position: torch.Tensor, start: int
) -> Callable[[int], None]:
    """The decode step ``compiled`` (by Inductor, without CUDA graphs of its own; or eager) warmed up and captured once
    into a CUDA graph.

    Captured by hand rather than with ``mode="reduce-overhead"``: torch.compile's CUDA-graph trees
    check and copy every input on each call, about 0.4 ms per step on an H200, a fifth of a 1.1B
    bf16 step (bench/profile_decode.py). Here a step is one ``position`` fill, one replay and one copy.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():  # compile, autotune and warm up outside the capture
        for _ in range(3):
            prefill()  # each warm-up step writes one cache slot: start from a fresh prompt so none runs past the cache
            position.fill_(start)
            compiled(token, position)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = compiled(token, position)

    def replay(index: int) -> None:
        position.fill_(start + index)
        graph.replay()
        token.copy_(out)

    return replay


def decode_logits(model: torch.nn.Module, cache, ids: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """The last position's logits of one step at positions ``at``: the function the harness compiles. Model and cache
    are arguments, not closed over, so the compiled step can be saved and loaded by another process
    (``quantflow.evaluation.precompiled``, which compares a loaded step's logits with these, eager)."""
    position_ids = at.expand(ids.shape[0], -1)
    return model(ids, past_key_values=cache, cache_position=at, position_ids=position_ids, use_cache=True).logits[:, -1]


def greedy(logits_fn: Callable, model: torch.nn.Module, cache) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A step that returns the next tokens: ``logits_fn`` (eager or compiled) then argmax."""
    return lambda ids, at: logits_fn(model, cache, ids, at).argmax(-1, keepdim=True)


def compiled_step(
    model: torch.nn.Module, cache, token: torch.Tensor, position: torch.Tensor, speed: SpeedSpec, reset: Callable
):
    """The decode step compiled as ``speed`` asks, and a label of how: one compiled layer reused (``layers``), or the
    whole step, loaded when an earlier process of the same shape family saved it. ``reset`` refills the cache from the
    prompt: the cache counts the tokens written to it, so a step is compared with the eager one from the same state."""
    if speed.compile_scope == "layers":
        regional = compiled_layers(greedy(decode_logits, model, cache), model, cache, speed.compile_mode)
        if regional is not None:
            return regional, "one decoder layer, reused"
    args = (model, cache, token, position)
    whole, how = load_or_compile(decode_logits, args, speed.compile_mode, default_folder(), reset)
    return greedy(whole, model, cache), f"whole step, {how}"


def benchmark(
    model: torch.nn.Module,
    runtime: str,
    batch: int,
    speed: SpeedSpec,
    *,
    compile: bool = True,
    seed: int = 0,
    reset_peak: bool = True,
    fuse: bool = True,
) -> DecodeRecord:
    """Time prefill and ``speed.gen_len`` greedy decode steps of ``model`` at ``batch`` on random prompts (the same
    prompts for every model), with ``speed``'s warm-up and repeats.

    Int4 layers switch to tinygemm's packed layout first (``Int4Linear.pack``). On CUDA, ``fuse`` then joins q/k/v
    and gate/up into one matmul each (``quantflow.evaluation.fuse``, in place, for dense and int4 models alike).
    ``reset_peak=False`` leaves the peak-memory counter alone, for callers that report one peak for a whole
    evaluation.
    """
    from transformers import StaticCache

    prompt_len, gen_len = speed.prompt_len, speed.gen_len
    pack_all(model)
    device = next(model.parameters()).device
    prompt = torch.randint(
        0, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(seed)
    ).to(device)
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + gen_len)
    # fixed addresses: a captured graph reads and writes these
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    position = torch.zeros(1, dtype=torch.long, device=device)

    step = greedy(decode_logits, model, cache)

    def eager(index: int) -> None:
        position.fill_(prompt_len + index)
        token.copy_(step(token, position))

    def prefill() -> None:
        cache.reset()
        token.copy_(step(prompt, torch.arange(prompt_len, device=device)))

    def restart() -> None:  # the state before the first decode step
        prefill()
        position.fill_(prompt_len)

    @torch.no_grad()
    def once() -> tuple[float, float]:
        _sync()
        start = time.perf_counter()
        prefill()
        _sync()
        prefill_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for index in range(gen_len - 1):
            decode(index)
        _sync()
        return prefill_seconds, (time.perf_counter() - start) / (gen_len - 1)

    decode, harness, compile_seconds = eager, "static cache, eager", 0.0
    if compile and device.type == "cuda":
        if fuse:
            fuse_projections(model)
        fused = any(isinstance(m, FusedProjections) for m in model.modules())  # this call's fusion or an earlier one's
        try:
            with torch.no_grad():
                prefill()  # allocates the cache's buffers, which the graph then uses by address
            start = time.perf_counter()
            with torch.no_grad():  # the whole step is traced here, ahead of its first call
                compiled, scope = compiled_step(model, cache, token, position, speed, restart)
            decode = captured(compiled, prefill, token, position, prompt_len)
            compile_seconds = time.perf_counter() - start
            fusion = ", fused q/k/v and gate/up" if fused else ""
            harness = f"static cache{fusion}, torch.compile ({speed.compile_mode}, {scope}) + CUDA graph"
        # a model whose step cannot be compiled or captured is still measured, labelled eager
        except Exception as error:
            torch._dynamo.reset()
            harness = f"static cache, eager: compile/capture failed with {type(error).__name__}"
    if reset_peak and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for _ in range(speed.warmup):
        once()
    timings = [once() for _ in range(speed.repeats)]
    prefill_seconds, per_step = statistics.median(t[0] for t in timings), statistics.median(t[1] for t in timings)
    floor_bw, size = bandwidth(), weight_bytes(model)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return DecodeRecord(
        runtime=runtime,
        harness=harness,
        batch=batch,
        prompt_len=prompt_len,
        gen_len=gen_len,
        prefill_ms=round(prefill_seconds * 1e3, 3),
        decode_ms_per_step=round(per_step * 1e3, 4),
        decode_tokens_per_s=round(batch / per_step, 1),
        peak_memory_mb=round(peak, 1),
        weight_bytes=size,
        bandwidth_floor_fraction=round(size / floor_bw / per_step, 3) if floor_bw else None,
        repeats=speed.repeats,
        compile_seconds=round(compile_seconds, 2),
    )
