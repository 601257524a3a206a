"""Mixed precision: which Linears share a choice, what each menu option costs in bits, and the allocation.

A ``mixed`` variant gives every quantized Linear one option from its menu (W4 at the variant's group size or a
finer one, W8 per output channel, or kept in bf16) so that the summed sensitivity is least while the effective bits per
weight stay within ``target_bits``. Serving engines fuse q/k/v and gate/up into one matmul each (vLLM's
``qkv_proj`` and ``gate_up_proj``), and one matmul runs one scheme, so those layers form one group that takes one
option together.

The allocation is a multiple-choice knapsack, solved exactly by dynamic programming over the bit budget
(hand-written: it is twenty lines of numpy, and no maintained solver takes grouped choices without a MILP
dependency), exact in whole bits; a solution never exceeds the budget.
"""

from __future__ import annotations

import math
import re

import numpy as np
from pydantic import BaseModel

from quantflow.errors import QuantflowError
from quantflow.spec import FINER

# cheapest first; w4gN: W4 at group N, finer than the variant's (Marlin and the int4 kernels take 32 to 128);
# w6: the embeddings' menu only (compressed-tensors packs 1 to 8 bits, the Linears' serving kernels take 4 and 8)
OPTIONS = ("w4", "w4g64", "w4g32", "w6", "w8", "bf16")
# bump when a change to the sensitivity measures or to how a mixed artifact is written changes what they give: the
# sensitivity table's cache key and mixed variants' quantize key carry it, so a cache filled by an earlier build of
# the same quantflow version is not read as current (2: W6 and W8 scored by round-to-nearest's error; 3: an
# Embedding subclass's table packed, not saved dense; 4: under GPTQ, a Linear's finer options scored in proportion
# to their output error; 5: the Fisher pass's labels drawn by inverting the cumulative distribution; 6: in two
# steps, a block of the vocabulary then a token: the same uniform draws give the same labels but where float64
# rounding of the two sums differs at a boundary; W4 group sizes solved stacked, equal to 1e-5; 7: options scored
# with the variant's observer's scales, MSE's clipping search where it asks for it, not always min-max; 8: GPTQ's
# Hessians from the measured tokens, not the whole calibration set)
MIXED_VERSION = 8
RESOLUTION = 20_000  # DP cells over the spare budget when costs share no usable unit
MAX_CELLS = 2_000_000  # largest exact DP (a float64 row per group of this many cells)
TIED = (  # members of a block that a fused serving kernel runs as one matmul
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
)


class LayerGroup(BaseModel):
    """Linears that take one option together, with their weight count and each option's stored bits per weight.

    A tied table's option may name one option per copy, embedding first: 'w6/w4' stores the input embedding at W6
    and lm_head at W4 (``layer_option``)."""

    name: str
    layers: list[str]
    weights: int
    bits: dict[str, float]  # option -> bits per weight; an option the shapes cannot take is absent
    note: str = ""  # why an option is absent
    menu: str = "options"  # the variant field whose options these are: 'options' (Linears) or 'embeddings'


def finer_group(option: str) -> int | None:
    """The group size a 'w4gN' option names (None for every other option)."""
    return int(option[3:]) if option in FINER else None


def option_group(option: str, group_size: int | None) -> int | None:
    """The group size W4 takes at ``option``: its own for 'w4gN', the variant's for 'w4'."""
    return finer_group(option) or group_size


def option_bits(option: str, in_features: int, group_size: int | None, symmetric: bool) -> float | None:
    """Stored bits per weight, bf16 scales and packed zero points included; None where the width cannot take it."""
    if option == "bf16":
        return 16.0
    if option in ("w6", "w8"):  # one scale (and a zero point of the same width) per output row of in_features weights
        bits = int(option[1:])
        return bits + (16 + (0 if symmetric else bits)) / in_features
    group_size = option_group(option, group_size)
    if group_size is None:
        return 4 + (16 + (0 if symmetric else 4)) / in_features
    if in_features % group_size:
        return None
    return 4 + (16 + (0 if symmetric else 4)) / group_size


def layer_groups(
    widths: dict[str, tuple[int, int]], options: list[str], group_size: int | None, symmetric: bool
) -> list[LayerGroup]:
    """Group the quantized Linears (name -> (out, in)) for fused kernels, each with its menu costs.

    Members of a q/k/v or gate/up set sit side by side under one parent module; anything else is its own group.
    """
    groups, taken = [], set()
    for name in widths:
        if name in taken:
            continue
        parent, _, leaf = name.rpartition(".")
        members = [name]
        for tied in TIED:
            if leaf in tied:
                siblings = [f"{parent}.{t}" if parent else t for t in tied]
                members = [sibling for sibling in siblings if sibling in widths]
        taken.update(members)
        groups.append(_group(members, widths, options, group_size, symmetric))
    return groups


def _group(
    members: list[str],
    widths: dict[str, tuple[int, int]],
    options: list[str],
    group_size: int | None,
    symmetric: bool,
    menu: str = "options",
) -> LayerGroup:
    total = sum(widths[m][0] * widths[m][1] for m in members)
    bits, notes = {}, []
    for option in options:
        if (finer := finer_group(option)) and group_size is not None and finer >= group_size:
            notes.append(f"{option} dropped: not finer than group size {group_size}")
            continue
        per_layer = [option_bits(option, widths[m][1], group_size, symmetric) for m in members]
        if any(b is None for b in per_layer):
            notes.append(f"{option} dropped: group size {group_size} does not divide width {widths[members[0]][1]}")
            continue
        bits[option] = sum(b * widths[m][0] * widths[m][1] for b, m in zip(per_layer, members, strict=True)) / total
    name = members[0] if len(members) == 1 else _joined(members)
    return LayerGroup(name=name, layers=members, weights=total, bits=bits, note="; ".join(notes), menu=menu)


def embedding_groups(
    names: list[str], shape: tuple[int, int], tied: bool, options: list[str], group_size: int | None, symmetric: bool
) -> list[LayerGroup]:
    """The input embedding and lm_head (``names``, each [vocab, hidden]) as menu groups: untied, one group each; tied
    (two names, one table), one group counted once over the table. Quantized, a tied table is stored twice (llm-compressor
    unties it: the embedding rounded to nearest, lm_head by the final pass), so each copy takes an option of its own
    and an option costs both copies' bits: 'w6/w4' (embedding W6, lm_head W4) as well as 'w4' for both. Pairs that
    cost bf16's 16 bits or more are dropped: one bf16 table is cheaper."""
    widths = dict.fromkeys(names, shape)
    if not tied:
        return [_group([name], widths, options, group_size, symmetric, "embeddings") for name in names]
    copy = _group(names[:1], widths, options, group_size, symmetric, "embeddings")  # one copy's bits per option
    quantized = [o for o in copy.bits if o != "bf16"]
    bits = {"bf16": 16.0} if "bf16" in copy.bits else {}
    notes = [copy.note] if copy.note else []
    for first in quantized:
        for second in quantized:
            option, cost = copy_pair(first, second), copy.bits[first] + copy.bits[second]
            if cost < 16:
                bits[option] = cost
            else:
                notes.append(f"{option} dropped: a tied table quantized is stored twice, {cost:.2f} bits >= bf16's")
    bits = dict(sorted(bits.items(), key=lambda item: item[1]))
    table = shape[0] * shape[1]
    return [
        LayerGroup(
            name="+".join(names), layers=names, weights=table, bits=bits, note="; ".join(notes), menu="embeddings"
        )
    ]


def copy_pair(embedding: str, head: str) -> str:
    """A tied table's option: 'w6/w4' for the input embedding at W6 and lm_head at W4, 'w4' for both at W4."""
    return embedding if embedding == head else f"{embedding}/{head}"


def layer_option(group: LayerGroup, option: str, layer: str) -> str:
    """The option one layer of ``group`` takes when the group takes ``option`` (a tied table's copies may differ)."""
    parts = option.split("/")
    return parts[group.layers.index(layer)] if len(parts) > 1 else option


def layer_menus(groups: list[LayerGroup]) -> dict[str, list[str]]:
    """Every layer's quantized options across its group's menu: the weight errors the sensitivity must score."""
    menus = {}
    for group in groups:
        for layer in group.layers:
            taken = {layer_option(group, option, layer) for option in group.bits} - {"bf16"}
            menus[layer] = [o for o in OPTIONS if o in taken]
    return menus


def _joined(members: list[str]) -> str:
    """'model.layers.0.self_attn.q_proj/k_proj/v_proj'."""
    parent = members[0].rpartition(".")[0]
    return f"{parent}.{'/'.join(m.rpartition('.')[2] for m in members)}"


def budget_bounds(groups: list[LayerGroup]) -> tuple[float, float]:
    """(cheapest, dearest) effective bits per weight the menu allows over these groups."""
    total = sum(g.weights for g in groups)
    return (
        sum(min(g.bits.values()) * g.weights for g in groups) / total,
        sum(max(g.bits.values()) * g.weights for g in groups) / total,
    )


def check_budget(groups: list[LayerGroup], target_bits: float, variant: str) -> None:
    """A budget outside what the menu can spend is a spec error, named with the range that works."""
    bad = next((g for g in groups if not g.bits), None)
    if bad is not None:
        raise QuantflowError(
            f"variant '{variant}': no menu option fits {bad.name} ({bad.note})", f"add 'bf16' to {bad.menu}"
        )
    low, high = budget_bounds(groups)
    if not low - 1e-9 <= target_bits <= high + 1e-9:
        raise QuantflowError(
            f"variant '{variant}': target_bits {target_bits} is outside what its options can spend on this model "
            f"({low:.3f} with every layer at its cheapest option, {high:.3f} at its dearest)",
            f"set target_bits between {low:.3f} and {high:.3f}",
        )


def allocate(groups: list[LayerGroup], scores: dict[str, dict[str, float]], target_bits: float) -> dict[str, str]:
    """The option per group with the least summed score whose effective bits stay within ``target_bits``.

    Multiple-choice knapsack over the spare budget (the bits above every group's cheapest option), by dynamic
    programming over budget cells; ``scores[group][option]`` is the sensitivity of that group alone at that option.
    """
    base = [min(g.bits.values()) for g in groups]
    extra = [{o: (b - low) * g.weights for o, b in g.bits.items()} for g, low in zip(groups, base)]
    spare = target_bits * sum(g.weights for g in groups) - sum(low * g.weights for g, low in zip(groups, base))
    cell = budget_cell([c for costs in extra for c in costs.values()], spare)
    cells = int(np.floor(spare / cell + 1e-6)) if spare > 0 else 0
    steps = [{o: int(np.ceil(c / cell - 1e-6)) for o, c in costs.items()} for costs in extra]
    best = np.zeros(cells + 1)  # least score reachable with at most c cells spent
    picks = []
    for group, cost in zip(groups, steps):
        options = list(group.bits)
        candidates = np.full((len(options), cells + 1), np.inf)
        for row, option in enumerate(options):
            if cost[option] <= cells:
                candidates[row, cost[option] :] = best[: cells + 1 - cost[option]] + scores[group.name][option]
        picks.append((options, candidates.argmin(axis=0)))
        best = candidates.min(axis=0)
    chosen, left = {}, cells
    for group, cost, (options, pick) in zip(reversed(groups), reversed(steps), reversed(picks)):
        chosen[group.name] = options[pick[left]]
        left -= cost[chosen[group.name]]
    return {g.name: chosen[g.name] for g in groups}


def rule_order(groups: list[LayerGroup], variant: str) -> list[LayerGroup]:
    """The groups llama.cpp's k-quant mixes give more bits, most important first: the value and down projections of
    the first and last blocks, then of every third block between them (llama.cpp's ``use_more_bits``), then of the
    rest, then the other groups of the first and last blocks. A model whose Linears are not named so is refused."""
    blocks = sorted({b for g in groups if (b := block_and_kind(g.layers[0])[0]) is not None})
    kinds = {block_and_kind(layer)[1] for g in groups for layer in g.layers}
    if not blocks or not {"v_proj", "down_proj"} <= kinds:
        known = ", ".join(sorted(kinds)[:6])
        raise QuantflowError(
            f"variant '{variant}': allocation 'rule' knows Linears named v_proj and down_proj in numbered blocks; "
            f"this model's are named {known}",
            "use allocation: measured (the default)",
        )
    first, last, n = blocks[0], blocks[-1], len(blocks)

    def rank(group: LayerGroup) -> tuple[int, int]:
        block, _ = block_and_kind(group.layers[0])
        index = blocks.index(block) if block is not None else -1
        named = {block_and_kind(layer)[1] for layer in group.layers} & {"v_proj", "down_proj"}
        edge = block in (first, last)
        more = index < n / 8 or index >= 7 * n / 8 or (index - n // 8) % 3 == 2
        tier = (0 if edge else 1 if more else 2) if named else (3 if edge else 4)
        return tier, index

    return [g for g in sorted(groups, key=rank) if rank(g)[0] < 4]


def rule_allocation(groups: list[LayerGroup], target_bits: float, variant: str) -> dict[str, str]:
    """Every group at its cheapest option, then the rule's groups (``rule_order``) promoted in turn to the next dearer
    option while the budget lasts: llama.cpp's fixed mix, at the same budget as the measured allocation."""
    chosen = {g.name: min(g.bits, key=g.bits.get) for g in groups}
    total = sum(g.weights for g in groups)
    spare = target_bits * total - sum(g.bits[chosen[g.name]] * g.weights for g in groups)
    for group in rule_order(groups, variant):
        # llama.cpp's rule buys bits (W8), not finer W4 groups
        dearer = sorted(
            (b, o) for o, b in group.bits.items() if b > group.bits[chosen[group.name]] and not finer_group(o)
        )
        if dearer and (cost := (dearer[0][0] - group.bits[chosen[group.name]]) * group.weights) <= spare + 1e-6:
            chosen[group.name], spare = dearer[0][1], spare - cost
    return chosen


def budget_cell(costs: list[float], spare: float) -> float:
    """The DP's unit of budget. Stored sizes are whole bits, so the greatest common divisor of the options' extra
    costs makes every cost a whole number of cells and the optimum exact; when that would need more than
    ``MAX_CELLS`` cells, ``spare / RESOLUTION`` with costs rounded up (never over budget, at most one cell per
    group short of the optimum)."""
    whole = [round(c) for c in costs if round(c) > 0]
    if whole and all(abs(c - round(c)) < 1e-6 for c in costs):
        unit = math.gcd(*whole)
        if spare / unit <= MAX_CELLS:
            return float(unit)
    return max(spare, 1e-9) / RESOLUTION


def option_counts(precision: dict[str, str]) -> dict[str, int]:
    """How many Linears took each menu option (model cards and the report say it the same way)."""
    taken = list(precision.values())
    return {option: taken.count(option) for option in OPTIONS}


def effective_bits(groups: list[LayerGroup], chosen: dict[str, str]) -> float:
    return sum(g.bits[chosen[g.name]] * g.weights for g in groups) / sum(g.weights for g in groups)


def precision_by_layer(groups: list[LayerGroup], chosen: dict[str, str]) -> dict[str, str]:
    """Layer name -> option, the per-Linear view the recipe and the report's precision map need."""
    return {layer: layer_option(g, chosen[g.name], layer) for g in groups for layer in g.layers}


def block_and_kind(layer: str) -> tuple[int | None, str]:
    """(decoder block index, projection kind) of a Linear's name, for the report's blocks x projections map."""
    found = re.search(r"\.(\d+)\.", f".{layer}.")
    return (int(found.group(1)) if found else None), layer.rpartition(".")[2]


def map_cell(layer: str) -> tuple[int | None, str]:
    """(decoder block, column) of a Linear in the precision map. The column is the name inside the block less its
    first part (``self_attn.q_proj`` -> ``q_proj``), so each expert of a mixture keeps a column of its own
    (``experts.3.down_proj``, ``shared_expert.up_proj``) where the projection kind alone would merge them."""
    found = re.search(r"\.(\d+)\.(.+)$", f".{layer}")
    if not found:
        return None, layer.rpartition(".")[2]
    inner = found.group(2)
    return int(found.group(1)), inner.partition(".")[2] or inner
