"""The llm-compressor call a user would write by hand: the reference quantflow's quantize step is compared with."""

from __future__ import annotations

import time
from pathlib import Path

import torch


def direct_oneshot(
    model_path: str, variant, samples: list[torch.Tensor], compute: str, dtype: str, out: Path
) -> tuple[float, float]:
    """Quantize as a user would by hand with llm-compressor; returns (oneshot wall seconds, peak GPU MiB, 0 on CPU)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, compute))
    weights = QuantizationArgs(
        num_bits=variant.bits,
        type="int",
        symmetric=variant.symmetric,
        strategy="group",
        group_size=variant.group_size,
        scale_dtype=getattr(torch, dtype),
        observer=variant.observer,
    )
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if variant.method == "gptq":
        recipe = [
            GPTQModifier(
                config_groups=groups,
                ignore=["lm_head"],
                block_size=variant.block_size,
                dampening_frac=variant.dampening_frac,
                actorder=variant.actorder,
            )
        ]
    else:
        recipe = [
            AWQModifier(n_grid=variant.n_grid, duo_scaling=variant.duo_scaling),
            QuantizationModifier(config_groups=groups, ignore=["lm_head"]),
        ]
    data = Dataset.from_dict(
        {"input_ids": [s.tolist() for s in samples], "attention_mask": [[1] * len(s) for s in samples]}
    )
    if not torch.accelerator.is_available():  # the same CPU workaround quantflow applies (pinning needs an accelerator)
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    oneshot(
        model=model,
        recipe=recipe,
        dataset=data,
        num_calibration_samples=len(samples),
        max_seq_length=max(len(s) for s in samples),
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    model.to(getattr(torch, dtype)).save_pretrained(out, save_compressed=True)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)
    return seconds, round(peak, 1)
