"""Where FP8 W8A8's perplexity loss comes from: e4m3 weights alone, e4m3 activations alone, both, on CPU.

Fake-quantizes every decoder Linear of the spec's model in float32 (weights per output channel, activations per
token, as the ``fp8`` variant's scheme) and scores the spec's evaluation windows, so each half of the scheme is
measured apart. Also tries a calibration-free clipping search for the weight scales (the per-row clip from
1.0 down to 0.72 that minimizes the weight's squared error), the one cheap change that needs no calibration data,
and int8 weights per channel for contrast. First prints each rounding's relative error over all decoder weights: e4m3
keeps 3 mantissa bits whatever the scale, so a scale search cannot take its error much below min-max's.

    python bench/fp8_loss_sources.py --config examples/smollm2-135m-recipes.yaml
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parents[1]))
from quantflow.kernels.fp8 import E4M3, E4M3_MAX, FP8Linear  # noqa: E402


def rows_minmax(weight: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    scale = (weight.abs().amax(1, keepdim=True) * clip).clamp(min=1e-12) / E4M3_MAX
    return (weight / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float() * scale


def rows_mse(weight: torch.Tensor) -> torch.Tensor:
    best = rows_minmax(weight)
    error = ((best - weight) ** 2).sum(1, keepdim=True)
    for clip in (1.0 - 0.02 * i for i in range(1, 15)):
        candidate = rows_minmax(weight, clip)
        candidate_error = ((candidate - weight) ** 2).sum(1, keepdim=True)
        best = torch.where(candidate_error < error, candidate, best)
        error = torch.minimum(candidate_error, error)
    return best


def rows_int8(weight: torch.Tensor) -> torch.Tensor:
    scale = weight.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
    return (weight / scale).round().clamp(-127, 127) * scale


def decoder_linears(model) -> list[torch.nn.Linear]:
    """The Linears the ``fp8`` variant quantizes: all but ``lm_head``."""
    return [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]


def weight_errors(model) -> dict[str, float]:
    """Relative RMS rounding error of every decoder Linear's weight together, per rounding."""
    weights = [module.weight.data for module in decoder_linears(model)]
    norm = sum((w**2).sum() for w in weights)
    return {
        rounding.__name__: math.sqrt(sum(((rounding(w) - w) ** 2).sum() for w in weights) / norm)
        for rounding in (rows_minmax, rows_mse, rows_int8)
    }


def tokens_e4m3(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded as the FP8 runtime rounds activations, per token, then dequantized."""
    quantized, scale = FP8Linear.quantize(x)
    return quantized.float() * scale


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantflow.evaluation.evaluate import eval_tokens, score, window_span
    from quantflow.infra.cache import StepCache, default_cache_root
    from quantflow.inputs.corpus import evaluation_documents
    from quantflow.inputs.sources import resolve_model
    from quantflow.spec import RunSpec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("examples/smollm2-135m-recipes.yaml"))
    parser.add_argument("--cache", type=Path, help="step cache (default: quantflow's)")
    args = parser.parse_args()
    spec = RunSpec.model_validate(yaml.safe_load(args.config.read_text()))
    model_path = resolve_model(spec.model, StepCache(args.cache or default_cache_root())).path
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = eval_tokens(evaluation_documents(spec.calibration, spec.evaluation), tokenizer)

    def perplexity(weights, activations: bool) -> float:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        for module in decoder_linears(model):
            if weights:
                module.weight.data = weights(module.weight.data)
            if activations:
                module.register_forward_pre_hook(lambda _module, inputs: (tokens_e4m3(inputs[0]),))
        span, bos = window_span(spec.evaluation, model, tokenizer)
        return math.exp(score(model, ids, spec.evaluation, span, bos, None, None)[0])

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    print("relative weight error:", {name: f"{100 * error:.2f}%" for name, error in weight_errors(model).items()})
    baseline = perplexity(None, False)
    print(f"| case | perplexity | Δ |\n|---|---|---|\n| float32 | {baseline:.3f} | – |")
    for label, weights, activations in (
        ("e4m3 weights (min-max), activations float", rows_minmax, False),
        ("e4m3 activations, weights float", None, True),
        ("both, min-max (the fp8 variant)", rows_minmax, True),
        ("e4m3 weights (clipping search), activations float", rows_mse, False),
        ("both, weights by clipping search", rows_mse, True),
        ("int8 weights per channel (W8A16), activations float", rows_int8, False),
    ):
        value = perplexity(weights, activations)
        print(f"| {label} | {value:.3f} | {100 * (value / baseline - 1):+.2f}% |", flush=True)


if __name__ == "__main__":
    main()
