"""How much each Linear group hurts when it alone takes a menu option: the input to mixed-precision allocation.

Two measures over the calibration tokens, both in nats of KL divergence from the unquantized model per token:

- ``kl`` (the reference, slow): quantize one group to one option (round-to-nearest, the final recipe's scheme),
  run the model, measure the KL from the baseline's log-probabilities; one forward pass per group and option.
- ``fisher`` (the default, about the cost of three forward passes): one forward and backward pass of the
  unquantized model with next tokens sampled from its own predictions, so the squared gradient is an unbiased
  estimate of the Fisher information, the curvature of that same KL. For each Linear and option,
  ``0.5 * sum over tokens (g . dy)^2`` with ``dy = x @ (Q(W) - W)^T`` the option's output error and ``g`` the
  gradient at the Linear's output: the second-order estimate of the KL the option adds (NVIDIA ModelOpt's
  AutoQuantize scores layers with the same kind of gradient-weighted output error). Under a GPTQ final pass each
  Linear is scored so at its coarsest option only, its other options in proportion to their output error over all
  calibration tokens (exact, where the sampled-label score is noisy: see ``fisher_scores``).

Both score an option by its weight error: the error the final pass leaves. With GPTQ as the final pass that is
``gptq_errors``, each Linear solved by llm-compressor's GPTQ alone on its Hessian from the unquantized model's
calibration activations (GPTQ repairs most of round-to-nearest's error, unevenly across layers, so RTN's ranking need
not be GPTQ's); with AWQ (smoothing, then round-to-nearest) round-to-nearest's. ``start_errors`` scores the error a
finished uniform GPTQ run left instead (the bench's check of the layer-by-layer solve).

bench/mixed_sensitivity.py measures how well ``fisher`` ranks groups like ``kl`` and what it saves;
bench/mixed_allocation.py ranks each proxy against the direct measure from the uniform GPTQ start.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel

from quantflow.quantization.mixed import LayerGroup, layer_menus, layer_option, option_group
from quantflow.spec import GPTQVariant, MixedVariant

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationArgs

TABLE_FILE = "sensitivity.json"
# options whose every layer is at W6 or more: their error is far below what a layer's score resolves next to W4's, so
# they are scored by round-to-nearest's error (GPTQ's would cost a solve per layer for no change in the ranking)
NEAR_LOSSLESS = ("w6", "w8", "bf16")


class SensitivityRecord(BaseModel):
    """Where the sensitivity table is, and what measuring it cost."""

    path: str  # the table: every group's layers, weights, bits per option and score per option
    measure: str
    tokens: int
    groups: int
    seconds: float
    peak_memory_mb: float


def weight_args(option: str, group_size: int | None, symmetric: bool, observer: str = "minmax", scale_dtype=None):
    """The compressed-tensors weight arguments of a menu option (W4 at the group size or the finer one a 'w4gN' names,
    W6 and W8 per output channel);
    None for 'bf16' (kept)."""
    from compressed_tensors.quantization import QuantizationArgs

    if option == "bf16":
        return None
    group_size = option_group(option, group_size)
    grouped = option.startswith("w4") and group_size is not None
    return QuantizationArgs(
        num_bits=int(option[1:2]),
        type="int",
        symmetric=symmetric,
        dynamic=False,
        strategy="group" if grouped else "channel",
        group_size=group_size if grouped else None,
        scale_dtype=scale_dtype,
        observer=observer,
    )


def weight_qparams(weight: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of a float32 weight [rows, columns] under ``args``, per row and group, as llm-compressor's
    weight observer fixes them before GPTQ: min-max, or for ``observer: mse`` its clipping search, so that an option's
    score is the error of the scales the variant will use. 'imatrix_mse' weighs the search by calibration activations,
    which are not observed here: it is scored with min-max scales."""
    from compressed_tensors.quantization.utils import calculate_qparams

    if args.observer == "mse":
        from llmcompressor.observers import Observer

        observer = Observer.load_from_registry("memoryless_mse", base_name="weight", args=args.model_copy(deep=True))
        found = observer(weight).get_qparams()
        return found["scale"], found["zero_point"]
    if args.group_size:
        view = weight.reshape(weight.shape[0], -1, args.group_size)
        return calculate_qparams(view.amin(dim=-1), view.amax(dim=-1), args)
    return calculate_qparams(weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True), args)


def fake_quantized(weight: torch.Tensor, args) -> torch.Tensor:
    """Round-to-nearest with the observer's scales under ``args``, dequantized back to the weight's dtype."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    w = weight.float()
    scale, zero = weight_qparams(w, args)
    return fake_quantize(w, scale, zero, args).to(weight.dtype)


def rtn_errors(model: torch.nn.Module, groups: list[LayerGroup], args: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Each layer's weight error at each quantized option of its menu under round-to-nearest."""
    errors = {}
    for name, menu in layer_menus(groups).items():
        weight = model.get_submodule(name).weight
        errors[name] = {o: fake_quantized(weight, args[o]) - weight for o in menu if o in args}
    return errors


def start_errors(
    model: torch.nn.Module, groups: list[LayerGroup], args: dict, start: dict[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """The errors the final pass leaves: W4 is the uniform run's own weights (``start``, GPTQ's result) minus the
    original, the other options round-to-nearest (GPTQ leaves W8 an error too small to rank by)."""
    errors = rtn_errors(model, groups, {o: a for o, a in args.items() if o != "w4"})
    for name, by_option in errors.items():
        if "w4" in args:
            by_option["w4"] = start[name].to(model.get_submodule(name).weight.dtype) - model.get_submodule(name).weight
    return errors


def hessians(model: torch.nn.Module, names: list[str], samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPTQ's Hessian of every named Linear's layer-wise loss, ``2 X^T X / n`` over the calibration samples, from the
    unquantized model's activations (one forward pass; the final pass sees its quantized predecessors' instead).
    Linears called one after another on the same input tensor (q/k/v, gate/up) share one Hessian, accumulated once
    and returned as one tensor object for all of them."""
    from llmcompressor.modifiers.gptq.helpers import accumulate_hessian, make_empty_hessian

    layers = {name: model.get_submodule(name) for name in names}
    sums = {name: make_empty_hessian(module) for name, module in layers.items()}
    counts = {name: torch.zeros(()) for name in layers}
    owner: dict[str, str] = {}  # each Linear's first Linear on the same input, decided on the first sample
    last: list = [None, None]  # the previous hooked call's input tensor and Linear

    def watch(name: str) -> Callable:
        def hook(module, inputs, output):
            if name not in owner:
                owner[name] = owner[last[1]] if inputs[0] is last[0] else name
            last[:] = inputs[0], name
            if owner[name] == name:
                sums[name], counts[name] = accumulate_hessian(inputs[0].detach(), module, sums[name], counts[name])

        return hook

    handles = [module.register_forward_hook(watch(name)) for name, module in layers.items()]
    head = model.get_output_embeddings()
    if head is not None and head not in layers.values():  # the logits feed no Hessian: stop before the head
        handles.append(head.register_forward_pre_hook(_stop))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for ids in samples:
                with contextlib.suppress(_Stopped):
                    model(ids.unsqueeze(0).to(device))
    finally:
        for handle in handles:
            handle.remove()
    found = {name: sums[name] / counts[name] for name in layers if owner.get(name, name) == name}
    return {name: found[owner.get(name, name)] for name in layers}


class _Stopped(Exception):
    """Raised before the output head when nothing after it is measured."""


def _stop(module, inputs) -> None:
    """A forward pre-hook that ends the pass: a large vocabulary's head (Gemma 3: 262k rows, 2.7 TFLOP over 16k
    calibration tokens) costs more than all the decoder blocks whose inputs the Hessians need."""
    raise _Stopped


def gptq_errors(
    model: torch.nn.Module,
    groups: list[LayerGroup],
    samples: list[torch.Tensor],
    args: dict,
    settings: GPTQVariant | MixedVariant | None = None,
    energy: dict[str, dict[str, float]] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """The weight error GPTQ leaves at each option, layer by layer: llm-compressor's own GPTQ solve on each Linear
    with its Hessian from the unquantized model's activations on ``samples`` and the observer's scales
    (``weight_qparams``), minus the original.
    What the final pass leaves differs from round-to-nearest's error, and unevenly across layers; this costs one
    forward pass and one GPTQ solve per Linear and option below W6 (``NEAR_LOSSLESS`` options take round-to-nearest's
    error), not a sequential GPTQ run. ``energy``, when given, receives each Linear's output error per option over
    the calibration tokens (``tr(dW H dW^T)``, GPTQ's own objective), taken while the layer's Hessian is held.
    The Linears on one input and all their options are solved as one stack of rows (``gptq_solve``)."""
    settings = settings or GPTQVariant()  # block size, dampening and column order as the final pass's
    names = [name for g in groups for name in g.layers if isinstance(model.get_submodule(name), torch.nn.Linear)]
    found = hessians(model, names, samples)
    linear = [g for g in groups if set(g.layers) <= set(names)]
    errors = rtn_errors(model, [g for g in groups if g not in linear], args)  # embeddings: RTN, as the final pass
    errors |= rtn_errors(model, linear, {o: a for o, a in args.items() if o in NEAR_LOSSLESS})
    menus = layer_menus(groups)
    shared: dict[int, list[str]] = {}  # Linears on one input (one Hessian object): one solve of all their options
    for name in names:
        shared.setdefault(id(found[name]), []).append(name)
    for members in shared.values():
        hessian = found[members[0]]
        pieces = [(n, o) for n in members for o in menus[n] if o in args and o not in NEAR_LOSSLESS]
        weights = [model.get_submodule(n).weight for n, _ in pieces]
        stack = [(w.detach().float(), args[o]) for w, (_, o) in zip(weights, pieces)]
        solved = gptq_solve(stack, hessian, settings) if stack else []
        for (n, option), weight, rows in zip(pieces, weights, solved):
            errors.setdefault(n, {})[option] = rows.to(weight.dtype) - weight
        for name in members:
            if energy is not None:
                energy[name] = {o: output_energy(d, hessian) for o, d in errors[name].items()}
            del found[name]
    return errors


def gptq_solve(
    pieces: list[tuple[torch.Tensor, QuantizationArgs]], hessian: torch.Tensor, settings: GPTQVariant | MixedVariant
) -> list[torch.Tensor]:
    """llm-compressor's GPTQ solve of float32 weights on one Hessian, each at its own arguments with its observer's
    scales fixed before the solve (``weight_qparams``), in one call: GPTQ's rows are independent (each column's error moves along its own row), so
    Linears that share the Hessian and the group sizes of one Linear are solved stacked. Each piece takes the finest
    group among them, its own scales repeated over their sub-groups (the same scale per column, so the same result).
    One call per Hessian pays the column loop's fixed cost once: Gemma 3 270M's solves at three W4 group sizes took 41 s
    on a 2-core CPU, 61 s one option at a time."""
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    columns = pieces[0][0].shape[1]
    sizes = [args.group_size or columns for _, args in pieces]
    common = math.gcd(*sizes)
    scales, zeros = [], []
    for (w, args), size in zip(pieces, sizes):
        scale, zero = weight_qparams(w, args)
        scales.append(scale.repeat_interleave(size // common, dim=1))
        zeros.append(zero.repeat_interleave(size // common, dim=1))
    base = pieces[0][1]
    alike = {"group_size", "strategy"}
    if any(args.model_dump(exclude=alike) != base.model_dump(exclude=alike) for _, args in pieces):
        raise ValueError("weights solved together may differ in their group size alone")
    group = {"strategy": "group", "group_size": common} if common < columns or base.group_size else {}
    stacked = base.model_copy(update={"actorder": settings.actorder, **group})
    quantized, _, _ = quantize_weight(
        torch.cat([w for w, _ in pieces]).unsqueeze(0),
        hessian.unsqueeze(0).clone(),
        torch.cat(scales).unsqueeze(0),
        torch.cat(zeros).unsqueeze(0),
        None,
        stacked,
        blocksize=settings.block_size,
        percdamp=settings.dampening_frac,
    )
    return list(quantized[0].split([w.shape[0] for w, _ in pieces]))


def output_energy(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(dW H dW^T)``: the squared output error a weight error causes over the calibration activations."""
    delta = delta.float()
    return float(((delta @ hessian) * delta).sum())


def fisher_scores(
    model: torch.nn.Module,
    groups: list[LayerGroup],
    samples: list[torch.Tensor],
    args: dict,
    seed: int = 0,
    errors: dict[str, dict[str, torch.Tensor]] | None = None,
    energy: dict[str, dict[str, float]] | None = None,
) -> dict[str, dict[str, float]]:
    """Gradient-weighted output error of every group at every option (see the module docstring); ``errors`` are the
    weight errors per Linear and option, round-to-nearest's unless given.

    With ``energy`` (each Linear's output error per option over the calibration tokens, ``gptq_errors``), a Linear
    is scored at its coarsest option only and its other options in proportion to their output error: one sampled
    label per token makes the score noisy, and scored alone at each option, group 64 came out worse than group 128
    for 14 of Gemma 3 270M's 72 groups; the output error ratio is exact over all calibration tokens,
    and the pass computes one output error per Linear instead of one per option."""
    layers = {name: model.get_submodule(name) for g in groups for name in g.layers}
    errors = errors if errors is not None else rtn_errors(model, groups, args)
    energy = {n: e for n, e in (energy or {}).items() if n in layers and any(v > 0 for v in e.values())}
    coarsest = {n: max(e, key=e.get) for n, e in energy.items()}
    scored = {n: {coarsest[n]: errors[n][coarsest[n]]} if n in energy else errors[n] for n in layers}
    sums = {name: dict.fromkeys(scored[name], 0.0) for name in layers}
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device

    def watch(name: str) -> Callable:
        def hook(module, inputs, output):
            x = inputs[0].detach()
            apply = partial(embedded, module) if isinstance(module, torch.nn.Embedding) else F.linear

            def on_grad(grad: torch.Tensor) -> None:
                for option, delta in scored[name].items():
                    dy = apply(x, delta)
                    sums[name][option] += 0.5 * (dy.float() * grad.float()).sum(dim=-1).pow(2).sum().item()

            output.register_hook(on_grad)

        return hook

    # the embedding's output must need a gradient before any hook (its own included) registers on it
    handles = [model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_())]
    handles += [module.register_forward_hook(watch(name)) for name, module in layers.items()]
    tokens = 0
    try:
        for ids in samples:
            logits = model(ids.unsqueeze(0).to(device)).logits[0].float()
            with torch.no_grad():  # labels drawn from the model itself: the squared gradient then estimates the Fisher
                grad = F.softmax(logits, dim=-1)
                labels = sample_tokens(grad.cpu(), generator).to(device)
                grad[torch.arange(len(labels), device=device), labels] -= 1  # the summed cross-entropy's gradient
            logits.backward(grad)
            tokens += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
    for name, by_option in energy.items():  # the other options in proportion to their output error
        (reference,) = sums[name]
        sums[name] = {o: sums[name][reference] * e / by_option[reference] for o, e in by_option.items()}
    return {
        g.name: _per_group(g, {o: sum(_part(sums, g, o, n) for n in g.layers) / tokens for o in g.bits}) for g in groups
    }


def sample_tokens(probs: torch.Tensor, generator: torch.Generator, block: int = 1024) -> torch.Tensor:
    """One token per row of ``probs`` (rows summing to 1) by inverting the cumulative distribution in two steps: a
    block of ``block`` tokens by the blocks' totals, then a token inside it, both summed in float64. Over Gemma 3's
    262k-token vocabulary ``torch.multinomial`` took 2.7 s per sample of 512 tokens on a 2-core CPU, a float64
    cumulative sum of each whole row 0.4 s, this 0.3 s; the same uniform draws give the same tokens as the whole-row
    sum."""
    rows, vocab = probs.shape
    blocks = F.pad(probs, (0, -vocab % block)).view(rows, -1, block)
    totals = blocks.sum(dim=-1, dtype=torch.float64)
    cumulative = totals.cumsum(dim=-1)
    drawn = torch.rand(rows, 1, generator=generator, dtype=torch.float64) * cumulative[:, -1:]
    chosen = torch.searchsorted(cumulative, drawn).clamp_(max=totals.shape[1] - 1)
    inside = drawn - cumulative.gather(1, chosen) + totals.gather(1, chosen)
    within = blocks.gather(1, chosen.unsqueeze(-1).expand(-1, -1, block)).squeeze(1).cumsum(dim=-1, dtype=torch.float64)
    index = torch.searchsorted(within, inside).clamp_(max=block - 1)
    return (chosen * block + index).squeeze(1).clamp_(max=vocab - 1)


def _part(sums: dict[str, dict[str, float]], group: LayerGroup, option: str, layer: str) -> float:
    """One layer's share of its group's score at ``option``: the score of the layer's own option, 0 where it is bf16."""
    return sums[layer].get(layer_option(group, option, layer), 0.0)


@torch.no_grad()
def embedded(module: torch.nn.Embedding, ids: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The embedding's output error for a weight error: the module's own forward (Gemma scales the rows it looks up),
    hooks left out, on the error in place of the table."""
    kept = module.weight.data
    module.weight.data = delta
    try:
        return module.forward(ids)
    finally:
        module.weight.data = kept


@contextlib.contextmanager
def untied(model: torch.nn.Module) -> Iterator[None]:
    """lm_head on a table of its own while a measure swaps weights by layer: a tied table's two copies may take
    different options, and a swap of one shared tensor would change both."""
    source, output = model.get_input_embeddings(), model.get_output_embeddings()
    shared = output is not None and output.weight is source.weight
    if shared:
        output.weight = torch.nn.Parameter(source.weight.detach().clone(), requires_grad=False)
    try:
        yield
    finally:
        if shared:
            output.weight = source.weight


def reference_logprobs(model: torch.nn.Module, samples: list[torch.Tensor]) -> tuple[list, list]:
    """The samples as batches on the model's device, and the unquantized model's log-probabilities for them (float32:
    no rounding floor under the small KLs measured against them)."""
    device = next(model.parameters()).device
    batches = [ids.unsqueeze(0).to(device) for ids in samples]
    return batches, [F.log_softmax(model(ids, use_cache=False).logits[0].float(), dim=-1) for ids in batches]


def mean_kl(logits: Callable[[int], torch.Tensor], reference: list[torch.Tensor]) -> float:
    """KL per token from the reference log-probabilities, of the logits ``logits(i)`` gives for batch ``i``."""
    total, tokens = 0.0, 0
    for index, base in enumerate(reference):
        logprobs = F.log_softmax(logits(index)[0].float(), dim=-1)
        total += F.kl_div(logprobs, base, log_target=True, reduction="sum").item()
        tokens += base.shape[0]
    return total / tokens


@torch.no_grad()
def kl_scores(
    model: torch.nn.Module,
    groups: list[LayerGroup],
    samples: list[torch.Tensor],
    args: dict,
    errors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, dict[str, float]]:
    """Measured KL from the unquantized model, per token, with one group at one option and the rest unquantized;
    ``errors`` (per Linear and option) replace round-to-nearest's where given."""
    batches, reference = reference_logprobs(model, samples)
    scores = {}
    with untied(model):
        for group in groups:
            measured = {}
            for option in (o for o in group.bits if o != "bf16"):
                kept = {name: model.get_submodule(name).weight.data for name in group.layers}
                for name, weight in kept.items():
                    taken = layer_option(group, option, name)
                    if taken != "bf16":
                        model.get_submodule(name).weight.data = (
                            weight + errors[name][taken] if errors else fake_quantized(weight, args[taken])
                        )
                measured[option] = mean_kl(lambda index: model(batches[index]).logits, reference)
                for name, weight in kept.items():
                    model.get_submodule(name).weight.data = weight
            scores[group.name] = _per_group(group, measured)
    return scores


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's rho (no ties expected between measured floats): how alike two measures order the same items."""
    ranks = [np.argsort(np.argsort(np.asarray(x))) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def _per_group(group: LayerGroup, measured: dict[str, float]) -> dict[str, float]:
    """Scores for the options the group can take; keeping bf16 costs nothing."""
    return {option: (0.0 if option == "bf16" else max(measured[option], 0.0)) for option in group.bits}


def measurement_samples(samples: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    """The first calibration samples up to ``tokens`` tokens (the last one cut to fit)."""
    chosen, total = [], 0
    for sample in samples:
        if total >= tokens:
            break
        chosen.append(sample[: tokens - total])
        total += chosen[-1].numel()
    return chosen


def read_table(record: SensitivityRecord) -> tuple[list[LayerGroup], dict[str, dict[str, float]]]:
    table = json.loads(Path(record.path).read_text())
    groups = [LayerGroup(**{k: v for k, v in g.items() if k != "score"}) for g in table["groups"]]
    return groups, {g["name"]: g["score"] for g in table["groups"]}
