"""The direct sensitivity measure: what each layer group's precision is worth where the final GPTQ pass starts.

A proxy scores a group by a weight error and a curvature; what the allocation needs is how much the finished model
improves when a group takes more bits. The direct measure asks exactly that, once: run the uniform pass (every group
at its cheapest option, W4 where it fits: the same GPTQ recipe, scheme, group size and calibration set as the final
pass), then, from those weights, move one group at a time to better options (W8 from W4) and measure the
KL from the unquantized model on the measured tokens: one forward pass per group and option that leaves a layer below
W6, plus one for the cheapest option that does not (``direct_scores`` says why), each from the first decoder block the
group touches (``BlockResume``).

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
import re
import time

import torch

from quantflow.infra.resources import Resources
from quantflow.inputs.calibration import CalibrationRecord
from quantflow.quantization.mixed import LayerGroup, layer_option, precision_by_layer
from quantflow.quantization.quantize import calibration_data, mixed_recipe
from quantflow.quantization.sensitivity import NEAR_LOSSLESS, fake_quantized, mean_kl, reference_logprobs, untied
from quantflow.quantization.targets import input_embedding
from quantflow.spec import MixedVariant

# a layer's decoder block: the list it is numbered in and its number (model.layers.3.mlp.down_proj -> model.layers, 3)
BLOCK = re.compile(r"^(.*?)\.(\d+)\.")


def near_lossless(group: LayerGroup) -> list[str]:
    """The group's options whose every layer is at W6 or more, cheapest first: their errors are far below what a
    first-order measure on a few hundred tokens resolves, so only the cheapest is measured and the rest score as it.
    A tied table's ``w6/w4`` is not among them: its lm_head copy is still W4."""
    precise = [o for o in group.bits if all(layer_option(group, o, n) in NEAR_LOSSLESS for n in group.layers)]
    return sorted(precise, key=group.bits.get)


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


def layer_names(groups: list[LayerGroup]) -> set[str]:
    return {name for group in groups for name in group.layers}


def artifact_start(model: torch.nn.Module, groups: list[LayerGroup], path: str) -> dict[str, torch.Tensor] | None:
    """Each layer's weights from a uniform GPTQ artifact, dequantized by compressed-tensors as transformers loads it;
    None where its layers do not load under the groups' names (a mixture of experts fuses them again on load)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    config = CompressedTensorsConfig(dequantize=True)  # dense Linears, not ones that unpack at every call
    loaded = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    weights = {}
    for name in layer_names(groups):
        try:
            layer = loaded.get_submodule(name)
        except AttributeError:
            return None
        if layer.weight.shape != model.get_submodule(name).weight.shape:
            return None
        like = model.get_submodule(name).weight
        weights[name] = layer.weight.detach().to(like.device, like.dtype)
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
    token; the model's weights are back as they were afterwards.

    Of the options whose every layer is at W6 or more only the cheapest is measured (W8, not bf16): the rest score as
    it does (``near_lossless``), since measuring bf16 too would double the forward passes for a difference the
    allocator could not use. Options that leave a layer below W6 (a tied table's ``w6/w4``) are each measured."""
    batches, reference = reference_logprobs(model, samples)
    original = {name: model.get_submodule(name).weight.data for name in start}

    def put(names: list[str], weights: dict[str, torch.Tensor]) -> None:
        for name in names:
            model.get_submodule(name).weight.data = weights[name]

    put(list(start), start)
    try:
        forward = BlockResume(model, batches, [n for g in groups for n in g.layers])

        def kl(names: list[str]) -> float:
            return mean_kl(lambda index: forward.logits(index, names), reference)

        start_kl, options = kl([]), start_options(groups)
        scores = {}
        for group in groups:
            start_option, precise = options[group.name], near_lossless(group)
            tried = [o for o in [*(o for o in group.bits if o not in precise), *precise[:1]] if o != start_option]
            measured = {start_option: start_kl}
            for option in tried:
                put(
                    group.layers,
                    {n: at_option(original[n], layer_option(group, option, n), args) for n in group.layers},
                )
                measured[option] = kl(group.layers)
            put(group.layers, start)
            floor = measured[precise[0]] if precise else measured[max(group.bits, key=group.bits.get)]
            scores[group.name] = {o: max(measured.get(o, floor) - floor, 0.0) for o in group.bits}
    finally:
        put(list(original), original)
    return scores, start_kl


class BlockResume:
    """Forward passes that start at the first decoder block a change touches.

    A group's layers sit in one decoder block, so moving them leaves every block before it as the start left it: its
    hidden states at that block's input are computed once per sample and reused, and the blocks before it pass their
    input through. On average that skips half the decoder. Checked once against a full forward pass; a model whose
    blocks this cannot resume (a block that returns a tuple, a loop that needs more than the hidden states) is run
    in full instead."""

    def __init__(self, model: torch.nn.Module, batches: list[torch.Tensor], layers: list[str]):
        self.model, self.batches = model, batches
        self.prefix, self.blocks = decoder_blocks(model, layers)
        self.inputs: list[list[torch.Tensor]] = []
        if self.blocks is not None and len(self.blocks) > 1:
            captured = [self._block_inputs(ids) for ids in batches]
            self.inputs = [inputs for inputs, _ in captured]
            self.inputs = self.inputs if self._resumes_exactly(captured[0][1]) else []

    def logits(self, index: int, changed: list[str]) -> torch.Tensor:
        """The logits of sample ``index`` with the current weights, where only the layers ``changed`` differ from the
        start's weights the block inputs were taken with."""
        block = self._first_block(changed)
        if not self.inputs or not block:
            return self.model(self.batches[index], use_cache=False).logits
        return self._resumed(index, block)

    def _first_block(self, changed: list[str]) -> int:
        found = [block_of(name, self.prefix) for name in changed]
        return 0 if not found or None in found else min(found)

    def _block_inputs(self, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every block's input hidden states for one sample, and the full pass's logits they came with."""
        seen: list[torch.Tensor] = []

        def keep(_module, args, kwargs):
            seen.append((args[0] if args else kwargs["hidden_states"]).clone())

        handles = [b.register_forward_pre_hook(keep, with_kwargs=True) for b in self.blocks]
        try:
            logits = self.model(ids, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
        return seen, logits

    def _resumed(self, index: int, block: int) -> torch.Tensor:
        cached = self.inputs[index][block]

        def passthrough(hidden_states, *args, **kwargs):
            return hidden_states

        def feed(_module, args, kwargs):
            if args:
                return (cached, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": cached}

        skipped = list(self.blocks[:block])
        for module in skipped:
            module.forward = passthrough
        handle = self.blocks[block].register_forward_pre_hook(feed, with_kwargs=True)
        try:
            return self.model(self.batches[index], use_cache=False).logits
        finally:
            handle.remove()
            for module in skipped:
                del module.forward

    def _resumes_exactly(self, full: torch.Tensor) -> bool:
        """Whether a pass resumed halfway gives ``full``, the first sample's logits from the capturing pass."""
        try:
            resumed = self._resumed(0, len(self.blocks) // 2)
        except (TypeError, KeyError, IndexError, AttributeError):
            return False
        return bool(torch.allclose(resumed, full, rtol=1e-4, atol=1e-4))


def decoder_blocks(model: torch.nn.Module, layers: list[str]) -> tuple[str, torch.nn.ModuleList | None]:
    """The ModuleList of decoder blocks the layers are numbered in (``model.layers``), or None when they are not."""
    found = {match.group(1) for name in layers if (match := BLOCK.match(name))}
    if len(found) != 1:
        return "", None
    prefix = found.pop()
    blocks = model.get_submodule(prefix)
    return prefix, blocks if isinstance(blocks, torch.nn.ModuleList) else None


def block_of(layer: str, prefix: str) -> int | None:
    match = BLOCK.match(layer)
    return int(match.group(2)) if match and match.group(1) == prefix else None


def measure_direct(
    model: torch.nn.Module,
    groups: list[LayerGroup],
    samples: list[torch.Tensor],
    args: dict,
    setup: tuple[MixedVariant, int | None, CalibrationRecord, Resources],
    artifact: tuple[str | None, list[str]] = (None, []),
) -> tuple[dict[str, dict[str, float]], dict]:
    """The uniform pass (or ``artifact``: a finished uniform GPTQ artifact and the Linears it quantized, read when
    they are exactly the groups' layers), then the scores; with what the table records of the start (its pass, KL
    and seconds)."""
    clock = time.perf_counter()
    path, quantized = artifact
    start = artifact_start(model, groups, path) if path and set(quantized) == layer_names(groups) else None
    source = f"uniform gptq, read from {path}" if start else "uniform gptq"
    start = start or uniform_start(model, groups, *setup, args)
    start_seconds = time.perf_counter() - clock
    with untied(model):  # a tied table's copies are put by layer, each at its own option
        scores, start_kl = direct_scores(model, groups, samples, args, start)
    return scores, {
        "pass": source,
        "options": sorted(set(start_options(groups).values())),
        "kl": round(start_kl, 6),
        "seconds": round(start_seconds, 2),
        "scoring_seconds": round(time.perf_counter() - clock - start_seconds, 2),
    }
