"""Where a decode step's time goes: GPU kernel time vs wall time, per harness variant.

Builds a random-weight Llama of a real shape in bf16 (optionally with every decoder Linear
swapped for random packed int4 weights as ``quantflow.evaluation.int4.Int4Linear``, i.e. PyTorch's tinygemm op
(``--int4 quantflow``), or for random e4m3 ``FP8Linear``s with q/k/v and gate/up fused (``--int4 fp8``): speed does
not depend on the values),
then times one-token decode steps three ways:
  - ``compile``: ``torch.compile(mode="reduce-overhead")``, the harness before 2026-11-26;
  - ``graph``: the eager step captured once into a ``torch.cuda.CUDAGraph`` by ``quantflow.evaluation.decode.captured``;
  - ``compile+graph``: the harness now: the step compiled without CUDA graphs (Inductor fusion), then
    captured by the same function.
For each it prints ms per step and, from ``torch.profiler``, the summed kernel time per step,
the kernel count per step and the top kernels.

    python3 bench/profile_decode.py --shape 1.1b --int4 quantflow --batches 1,8 --out $OUT/profile.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

sys.path.insert(0, str(Path(__file__).parents[1]))
from bench.models import SHAPES  # noqa: E402


def replace_linears(model: torch.nn.Module, make: Callable[[torch.nn.Linear], torch.nn.Module]) -> None:
    """Every decoder Linear swapped for ``make(linear)``, under the same name."""
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            parent, _, child = name.rpartition(".")
            model.model.layers.get_submodule(parent).register_module(child, make(module))


def int4_layer(module: torch.nn.Linear, group_size: int) -> torch.nn.Module:
    """A random packed int4 ``Int4Linear`` of the Linear's shape."""
    from quantflow.evaluation.int4 import Int4Linear

    out_f, in_f = module.weight.shape
    unsigned = torch.randint(0, 16, (out_f, in_f), dtype=torch.int32, device="cuda")
    scale = torch.rand(out_f, in_f // group_size, device="cuda") * 0.01
    return Int4Linear.from_unsigned(
        unsigned, scale, torch.zeros_like(scale), group_size, None, torch.device("cuda")
    ).pack()


def fp8_layer(module: torch.nn.Linear) -> torch.nn.Module:
    """A random e4m3 ``FP8Linear`` of the Linear's shape."""
    from quantflow.kernels.fp8 import E4M3, FP8Linear

    weight = (torch.randn_like(module.weight, dtype=torch.float32) * 16).to(E4M3)
    return FP8Linear(weight, torch.rand(module.out_features, device=module.weight.device) * 0.01, None)


def build(shape: str, int4: str, group_size: int = 128) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantflow.evaluation.fuse import fuse_projections

    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    if int4 == "fp8":  # q/k/v and gate/up fused, as bench/fp8_decode.py runs the FP8 artifact
        replace_linears(model, fp8_layer)
        fuse_projections(model)
    elif int4 != "none":
        replace_linears(model, lambda module: int4_layer(module, group_size))
    return model


def make_step(model, cache, batch):
    def step(token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        logits = model(
            token,
            past_key_values=cache,
            cache_position=position,
            position_ids=position.expand(batch, -1),
            use_cache=True,
        ).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    return step


@torch.no_grad()
def run_variant(model, variant: str, batch: int, prompt_len: int, gen_len: int, repeats: int, mode: str) -> dict:
    from transformers import StaticCache

    from quantflow.evaluation.decode import captured

    cache = StaticCache(config=model.config, max_cache_len=prompt_len + gen_len)
    step = make_step(model, cache, batch)
    prompt = torch.randint(0, 32000, (batch, prompt_len), device="cuda")
    token = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
    position = torch.zeros(1, dtype=torch.long, device="cuda")

    def prefill():
        cache.reset()
        token.copy_(step(prompt, torch.arange(prompt_len, device="cuda")))

    prefill()
    if variant == "compile":
        compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)

        def decode(index):
            torch.compiler.cudagraph_mark_step_begin()
            token.copy_(compiled(token.clone(), torch.tensor([prompt_len + index], device="cuda")))
    else:  # the harness's own capture (quantflow.evaluation.decode), of the compiled or the eager step
        compiled = torch.compile(step, mode=mode, fullgraph=True) if variant == "compile+graph" else step
        decode = captured(compiled, prefill, token, position, prompt_len)

    def once() -> float:
        prefill()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for index in range(gen_len - 1):
            decode(index)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / (gen_len - 1)

    for _ in range(3):
        once()
    per_step = statistics.median(once() for _ in range(repeats))
    prefill()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for index in range(16):
            decode(index)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.self_device_time_total for e in events) / 16
    kernels = sum(e.count for e in events) / 16
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:24]
    return {
        "variant": variant,
        "batch": batch,
        "peak_mb": round(torch.cuda.max_memory_allocated() / 2**20),
        "ms_per_step": round(per_step * 1e3, 4),
        "kernel_ms_per_step": round(total_us / 1e3, 4),
        "kernels_per_step": kernels,
        "top": [(e.key[:90], round(e.self_device_time_total / 16, 1), e.count // 16) for e in top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1.1b")
    parser.add_argument("--int4", choices=["none", "quantflow", "fp8"], default="none")
    parser.add_argument("--batches", default="1")
    parser.add_argument(
        "--mode", default="max-autotune-no-cudagraphs", help="torch.compile mode of the compile+graph variant"
    )
    parser.add_argument("--variants", default="compile,graph,compile+graph")
    parser.add_argument(
        "--no-split-reductions", action="store_true", help="Inductor reduces a one-row reduction in one program"
    )
    parser.add_argument("--no-cudnn-attention", action="store_true", help="SDPA without its cuDNN backend")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    inductor_config.split_reductions = not args.no_split_reductions
    torch.backends.cuda.enable_cudnn_sdp(not args.no_cudnn_attention)
    model = build(args.shape, args.int4)
    results = []
    for variant, batch in ((v, int(b)) for b in args.batches.split(",") for v in args.variants.split(",")):
        torch.cuda.reset_peak_memory_stats()
        try:
            result = run_variant(model, variant, batch, 64, 128, 5, args.mode)
        except Exception as error:  # one variant failing (capture, compile) should not hide the others
            result = {"variant": variant, "error": f"{type(error).__name__}: {str(error)[:300]}"}
        results.append(result)
        print(json.dumps(result, indent=1), flush=True)
        torch._dynamo.reset()
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "shape": args.shape,
                    "int4": args.int4,
                    "split_reductions": not args.no_split_reductions,
                    "cudnn_attention": not args.no_cudnn_attention,
                    "card": torch.cuda.get_device_name(),
                    "results": results,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
