"""The direct sensitivity measure: what each layer group's precision is worth where the final GPTQ pass starts.

A proxy scores a group by a weight error and a curvature; what the allocation needs is how much the finished model
improves when a group takes more bits. The direct measure asks exactly that, once: run the uniform pass (every group
at its cheapest option, W4 where it fits: the same GPTQ recipe, scheme, group size and calibration set as the final
pass), then, from those weights, move one group at a time to each better option and measure the KL from the
unquantized model on the measured tokens: one forward pass per group and option.

Scores stay additive per group, as the allocator expects: ``score(o) = max(KL(group at o) - KL(group at its most
precise option), 0)``, with ``KL(group at its start option) = KL_start``. Under the first-order model in which groups
act independently, the allocation's KL is ``KL_start - sum over groups of (KL_start - KL(group at its option))``, which
is ``sum of KL(group at its option)`` plus a constant; subtracting each group's own constant, ``KL(group at its most
precise option)``, leaves the least sum where it was and gives the most precise option (bf16) zero, the allocator's
convention. The clip at zero: a lower option measured better than the most precise one is a difference below the
measurement's noise on few tokens, not damage to spend bits against. W8 and bf16 are taken as round-to-nearest and
the original weights (GPTQ leaves W8 an error too small to rank by); the interactions the first-order model ignores
(GPTQ's sequential error propagation) are what the final pass settles.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from quantflow.infra.resources import Resources
from quantflow.inputs.calibration import CalibrationRecord
from quantflow.quantization.mixed import LayerGroup, layer_option, precision_by_layer
from quantflow.quantization.quantize import calibration_data, mixed_recipe
from quantflow.quantization.sensitivity import fake_quantized, untied
from quantflow.quantization.targets import input_embedding
from quantflow.spec import MixedVariant


def start_options(groups: list[LayerGroup]) -> dict[str, str]:
    """Every group's cheapest option: the uniform variant the mixed one starts from and only buys precision over."""
    return {g.name: min(g.bits, key=g.bits.get) for g in groups}


def uniform_start(
    model: torch.nn.Module,
    groups: list[LayerGroup],
    variant: MixedVariant,
    group_size: int | None,
    calibration: CalibrationRecord,
    resources: Resources,
    args: dict,
) -> dict[str, torch.Tensor]:
    """Each layer's weights after the uniform pass: llm-compressor's GPTQ on a copy of ``model`` with the final pass's
    recipe, every group at its start option. An embedding on the menu is rounded to nearest, as the final pass does."""
    from llmcompressor import oneshot

    start = start_options(groups)
    quantized = copy.deepcopy(model)
    recipe = mixed_recipe(
        variant, precision_by_layer(groups, start), group_size, resources.dtype, input_embedding(model)
    )
    oneshot(
        model=quantized,
        recipe=recipe,
        shuffle_calibration_samples=False,
        log_dir=None,
        moe_calibrate_all_experts=True,
        **calibration_data(calibration, resources.calibration_batch),
    )
    weights = {}
    for group in groups:
        for name in group.layers:
            original = model.get_submodule(name).weight
            if isinstance(model.get_submodule(name), torch.nn.Linear):
                weights[name] = quantized.get_submodule(name).weight.detach().to(original.dtype).clone()
            else:  # the embedding: rounded to nearest at save, not in the model in memory
                weights[name] = at_option(original, layer_option(group, start[group.name], name), args)
    return weights


def at_option(weight: torch.Tensor, option: str, args: dict) -> torch.Tensor:
    """A weight at a menu option without GPTQ: round-to-nearest, or the original for bf16."""
    return weight if option == "bf16" else fake_quantized(weight, args[option])


@torch.no_grad()
def direct_scores(
    model: torch.nn.Module,
    groups: list[LayerGroup],
    samples: list[torch.Tensor],
    args: dict,
    start: dict[str, torch.Tensor],
) -> tuple[dict[str, dict[str, float]], float]:
    """Every group's score at every option from the start weights (see the module docstring), and the start's KL per
    token; the model's weights are back as they were afterwards."""
    device = next(model.parameters()).device
    batches = [ids.unsqueeze(0).to(device) for ids in samples]
    reference = [F.log_softmax(model(ids).logits[0].float(), dim=-1) for ids in batches]
    tokens = sum(ids.numel() for ids in samples)
    original = {name: model.get_submodule(name).weight.data for name in start}

    def kl() -> float:
        total = 0.0
        for ids, base in zip(batches, reference, strict=True):
            logprobs = F.log_softmax(model(ids).logits[0].float(), dim=-1)
            total += F.kl_div(logprobs, base, log_target=True, reduction="sum").item()
        return total / tokens

    def put(names: list[str], weights: dict[str, torch.Tensor]) -> None:
        for name in names:
            model.get_submodule(name).weight.data = weights[name]

    put(list(start), start)
    try:
        start_kl, options = kl(), start_options(groups)
        scores = {}
        for group in groups:
            measured = {options[group.name]: start_kl}
            for option in (o for o in group.bits if o != options[group.name]):
                put(
                    group.layers,
                    {n: at_option(original[n], layer_option(group, option, n), args) for n in group.layers},
                )
                measured[option] = kl()
            put(group.layers, start)
            floor = measured[max(group.bits, key=group.bits.get)]
            scores[group.name] = {o: max(measured[o] - floor, 0.0) for o in group.bits}
    finally:
        put(list(original), original)
    return scores, start_kl


def measure_direct(
    model: torch.nn.Module,
    groups: list[LayerGroup],
    samples: list[torch.Tensor],
    args: dict,
    setup: tuple[MixedVariant, int | None, CalibrationRecord, Resources],
) -> tuple[dict[str, dict[str, float]], dict]:
    """The uniform pass, then the scores; with what the table records of the start (its pass, KL and seconds)."""
    clock = time.perf_counter()
    start = uniform_start(model, groups, *setup, args)
    start_seconds = time.perf_counter() - clock
    with untied(model):  # a tied table's copies are put by layer, each at its own option
        scores, start_kl = direct_scores(model, groups, samples, args, start)
    return scores, {
        "pass": "uniform gptq",
        "options": sorted(set(start_options(groups).values())),
        "kl": round(start_kl, 6),
        "seconds": round(start_seconds, 2),
        "scoring_seconds": round(time.perf_counter() - clock - start_seconds, 2),
    }
