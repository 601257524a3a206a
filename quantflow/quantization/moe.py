"""Mixture-of-experts models: their experts as Linears, what stays in bf16, and the routing of calibration tokens.

transformers 5 holds each MoE layer's experts as fused 3-D tensors (``gate_up_proj[E, 2I, H]``); llm-compressor
0.14 unfuses them before calibration into one ``Linear`` per expert and projection (``linearize_moe``) and saves
them that way, the per-expert layout vLLM loads. quantflow's shape checks, recipes and reports therefore see the
unfused layout too: a group size is checked against every expert's widths, not only attention's.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from pydantic import BaseModel

from quantflow.errors import QuantflowError

# Linears that route tokens rather than transform them: they decide which expert runs, are tiny, and an error
# in them sends tokens to the wrong expert, so they stay in bf16 (transformers 5's own routers are not Linears
# and are never targeted; the shared-expert gate of Qwen2-MoE / Qwen3-Next is one).
ROUTER_PATTERNS = ("re:.*\\.gate$", "re:.*shared_expert_gate$", "re:.*router$", "re:.*mlp\\.router\\.layer$")
FLOOR_SHARE = 0.1  # an expert routed under this fraction of an even share of its layer's tokens is flagged
EXPERT_NAME = re.compile(r"^(?P<layer>.*)\.experts\.(?P<expert>\d+)\.(?P<proj>[^.]+)$")


EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def experts_per_layer(config: dict) -> int | None:
    """A model's experts per MoE layer from its config.json, or None for a dense model (no llm-compressor import)."""
    found = [config.get(key) for key in EXPERT_COUNT_KEYS if config.get(key)]
    return int(found[0]) if found else None


def expert_runtime(model: torch.nn.Module, experts: int) -> str:
    """How a loaded model runs its experts, for the report's runtime column: the speed of an MoE depends on it."""
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

    unfused = next((m for m in model.modules() if isinstance(m, LinearExperts2D)), None)
    if unfused is not None:
        kind = type(unfused[0].down_proj).__name__
        return (
            f"; experts ({experts} per layer): one {kind} per expert and projection, called in a loop over the "
            "experts with their routed tokens (no grouped MoE kernel)"
        )
    return (
        f"; experts ({experts} per layer): fused bf16 tensors in transformers' expert loop, dense (quantized experts "
        "dequantized at load), so their speed is not the quantized kernels'"
    )


def fused_experts(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The experts modules llm-compressor recognises (fused 3-D tensors or a registered custom layout)."""
    from llmcompressor.modeling.moe.linearize import get_non_linearized_moes

    return get_non_linearized_moes(model)


def is_moe(model: torch.nn.Module) -> bool:
    """True for a model with experts, fused or already unfused."""
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

    return bool(fused_experts(model)) or any(isinstance(m, LinearExperts2D) for m in model.modules())


def unfuse(model: torch.nn.Module) -> torch.nn.Module:
    """Unfuse a loaded model's experts into per-expert Linears with llm-compressor's ``linearize_moe``."""
    from llmcompressor.modeling.moe.linearize import linearize_moe

    return linearize_moe(model) if fused_experts(model) else model


def unfuse_weightless(model: torch.nn.Module) -> torch.nn.Module:
    """Replace a meta-device model's fused experts by llm-compressor's per-expert Linears, as ``oneshot`` will.

    ``linearize_moe`` itself copies weights and sets up offloading, neither of which a meta model has: the
    same classes are built here empty, on the meta device.
    """
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

    for name, module in fused_experts(model):
        unfused = LinearExperts2D.get_linear_experts_cls(module.__class__)
        with torch.device("meta"):
            model.set_submodule(name, unfused(getattr(module, "config", model.config)))
    return model


def check_experts(skeleton: torch.nn.Module, variant_name: str, method: str) -> None:
    """Refuse, at plan time, a mixture whose experts llm-compressor cannot unfuse: they would stay fused 3-D
    tensors that no Linear-targeting recipe quantizes, and the artifact would be bf16 experts under a W4 label."""
    fused = sorted({name.rpartition(".")[0] for name, p in skeleton.named_parameters() if p.ndim == 3})
    if fused:
        model_type = getattr(skeleton.config, "model_type", "unknown")
        raise QuantflowError(
            f"variant '{variant_name}' (method {method}) cannot quantize the experts of this {model_type} model: "
            f"llm-compressor does not unfuse their layout ({len(fused)} modules with 3-D expert tensors, e.g. "
            f"{fused[0]})",
            "use a method on a supported MoE family (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, gpt-oss, Llama 4), "
            "or a bitsandbytes variant (its experts stay bf16)",
        )


def with_routers(ignore: list[str]) -> list[str]:
    """A variant's ignore list plus the router patterns."""
    return [*ignore, *(pattern for pattern in ROUTER_PATTERNS if pattern not in ignore)]


def routers_kept(variant, model: torch.nn.Module):
    """The variant with the router patterns in its ignore list on a mixture of experts; unchanged on a dense model
    (and for load-time variants, which have no ignore list)."""
    if not hasattr(variant, "ignore") or not is_moe(model):
        return variant
    return variant.model_copy(update={"ignore": with_routers(variant.ignore)})


def expert_of(name: str) -> tuple[str, int] | None:
    """(layer prefix, expert index) of an unfused expert Linear's name, else None."""
    found = EXPERT_NAME.match(name)
    return (found["layer"], int(found["expert"])) if found else None


class ExpertRouting(BaseModel):
    """Calibration tokens routed to one expert in normal (top-k) routing."""

    layer: str
    expert: int
    tokens: int
    share: float  # of the layer's token-expert assignments
    under_floor: bool


class RoutingRecord(BaseModel):
    """How calibration tokens spread over experts, and which experts saw too few to be trusted.

    Every expert is calibrated on every token (llm-compressor's ``moe_calibrate_all_experts``), so no expert is
    left without statistics; these counts say how much of that data the expert would see in use: an expert
    under the floor was calibrated on tokens the router rarely sends it.
    """

    top_k: int
    floor: int
    tokens: int
    experts: list[ExpertRouting]

    @property
    def flagged(self) -> list[ExpertRouting]:
        return [e for e in self.experts if e.under_floor]


def routing_record(counts: dict[str, list[int]], top_k: int, floor_share: float = FLOOR_SHARE) -> RoutingRecord:
    """Per-expert token counts of each experts layer as a record, flagging experts under ``floor_share`` of an even
    share (a layer's assignments divided by its number of experts)."""
    experts, tokens = [], 0
    for layer, per_expert in counts.items():
        assigned = sum(per_expert)
        tokens = max(tokens, assigned // max(top_k, 1))
        even = assigned / len(per_expert)
        experts += [
            ExpertRouting(
                layer=layer,
                expert=index,
                tokens=count,
                share=round(count / assigned, 4) if assigned else 0.0,
                under_floor=count < floor_share * even,
            )
            for index, count in enumerate(per_expert)
        ]
    floor = max((int(floor_share * sum(c) / len(c)) for c in counts.values()), default=0)
    return RoutingRecord(top_k=top_k, floor=floor, tokens=tokens, experts=experts)


@contextlib.contextmanager
def counted_routing(model: torch.nn.Module, found: list[RoutingRecord]) -> Iterator[None]:
    """Count the tokens top-k routing sends each expert while llm-compressor calibrates ``model``.

    The experts modules receive ``(hidden_states, top_k_index, top_k_weights)``; each calibration batch is counted
    the first time it reaches a module. The pipeline's second pass (propagating quantized outputs) and the
    searches of AWQ and AutoRound forward the same batch again: those repeats are not routing decisions of their
    own. With ``moe_calibrate_all_experts`` every expert still sees every token for its statistics; these counts
    are what it would see in use. Appends one record to ``found`` on exit (none when nothing was counted).
    """
    from llmcompressor.core import active_session
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

    counts: dict[str, list[int]] = {}
    seen: set[tuple[str, int]] = set()
    top_k = [0]

    def hook(name: str, experts: int):
        def count(module, args, kwargs):
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            batch = getattr(active_session().state, "current_batch_idx", None)
            key = (name, len(seen) if batch is None else int(batch))
            if key in seen:
                return
            seen.add(key)
            top_k[0] = index.shape[-1]
            add = torch.bincount(index.reshape(-1).cpu(), minlength=experts).tolist()
            counts[name] = [a + b for a, b in zip(counts.get(name, [0] * experts), add, strict=True)]

        return count

    handles = [
        module.register_forward_pre_hook(hook(name, module.num_experts), with_kwargs=True)
        for name, module in model.named_modules()
        if isinstance(module, LinearExperts2D)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    if counts:
        found.append(routing_record(counts, top_k[0]))
