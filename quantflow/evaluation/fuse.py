"""Fuse the projections that read the same input (q/k/v, gate/up) into one matmul, as serving stacks do.

At one token per step every decoder Linear is a short kernel whose fixed cost is a large part of its
time, and q/k/v (and gate/up) read the same activations. vLLM loads them as one ``qkv_proj`` and one
``gate_up_proj``; transformers' modules call them one by one. Rewriting each model family's forward
would copy transformers' code, so instead the projections keep their names: each becomes a
``ProjectionSlice`` of one ``FusedProjections``. The first slice called with a new input runs the
fused matmul and keeps its parts; the others return theirs. Called in any other order, or with
different inputs, a slice recomputes: the result is the same, only the saving is lost.

The decode harness applies this to every runtime alike (bf16, int4, FP8, int8 and FP4), so the comparison stays fair.
It works in place and renames the weights (``fused_q.linear.weight``), so a fused model is for
running, not for saving.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import SiLUActivation

from quantflow.evaluation.int4 import Int4Linear
from quantflow.kernels.fp4 import FP4Linear
from quantflow.kernels.fp8 import FP8GatedMLP, FP8Linear
from quantflow.kernels.int8 import Int8Linear, Int8WeightOnlyLinear

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
GATED_SILU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")  # forward: down(act(gate(x)) * up(x))


class FusedProjections(nn.Module):
    """One Linear (dense or int4) whose output is the concatenation of several projections' outputs."""

    def __init__(self, linear: nn.Module, sizes: list[int]) -> None:
        super().__init__()
        self.linear, self.sizes = linear, sizes
        self._input: torch.Tensor | None = None
        self._parts: tuple[torch.Tensor, ...] = ()

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self._input is not x:
            self._parts, self._input = self.linear(x).split(self.sizes, dim=-1), x
        part = self._parts[index]
        if index == len(self.sizes) - 1:  # the last part: keep no activations alive between steps
            self._parts, self._input = (), None
        return part


class ProjectionSlice(nn.Module):
    """Stands in for one of the fused projections; returns its columns of the fused output."""

    def __init__(self, fused: FusedProjections, index: int) -> None:
        super().__init__()
        self.index = index
        object.__setattr__(self, "fused", fused)  # not a submodule: the parent registers it once, as "fused_*"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(x, self.index)


def joined_bias(layers: list[nn.Module], like: torch.Tensor) -> torch.Tensor | None:
    """The layers' biases end to end (zeros for a layer without one), or None if none has a bias."""
    if all(layer.bias is None for layer in layers):
        return None
    return torch.cat([layer.bias if layer.bias is not None else like.new_zeros(layer.out_features) for layer in layers])


def concat(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing all of ``layers`` (same input width) side by side, or None if they cannot be joined."""
    if all(type(layer) is nn.Linear for layer in layers):  # exact type: bitsandbytes' 4-bit Linears subclass it
        weight = layers[0].weight
        joined = nn.Linear(
            layers[0].in_features,
            sum(layer.out_features for layer in layers),
            bias=False,
            device="meta",
            dtype=weight.dtype,
        )
        joined.weight = nn.Parameter(torch.cat([layer.weight for layer in layers]), requires_grad=False)
        if (bias := joined_bias(layers, weight)) is not None:
            joined.bias = nn.Parameter(bias, requires_grad=False)
        return joined
    if (
        all(isinstance(layer, Int4Linear) for layer in layers)
        and len({(layer.group_size, layer.in_features) for layer in layers}) == 1
    ):
        device = next(layers[0].buffers()).device  # tinygemm's tensors or W4A16's, whichever form it holds
        like = torch.empty(0, dtype=torch.bfloat16, device=device)  # its bias is bf16
        return Int4Linear.concat(layers, joined_bias(layers, like))
    if (
        all(isinstance(layer, FP4Linear) for layer in layers)
        and len({(layer.group, layer.in_features) for layer in layers}) == 1
    ):
        like = torch.empty(0, dtype=torch.bfloat16, device=layers[0].packed.device)
        return FP4Linear.concat(layers, joined_bias(layers, like))
    kind = type(layers[0])
    if kind in (FP8Linear, Int8Linear, Int8WeightOnlyLinear) and all(type(layer) is kind for layer in layers):
        like = torch.empty(0, dtype=torch.bfloat16, device=layers[0].weight.device)  # they keep biases in bf16
        return kind.concat(layers, joined_bias(layers, like))
    return None


def gated_fp8_mlp(module: nn.Module) -> FP8GatedMLP | None:
    """The FP8 form of a SiLU-gated MLP of FP8 Linears (its gate and up without biases), else None. Only the
    families whose forward is known to be down(SiLU(gate(x)) * up(x)) qualify: the new module replaces that forward."""
    if type(module).__name__ not in GATED_SILU_MLPS or not isinstance(
        getattr(module, "act_fn", None), nn.SiLU | SiLUActivation
    ):
        return None
    gate, up, down = (getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj"))
    if not all(type(layer) is FP8Linear for layer in (gate, up, down)) or gate.bias is not None or up.bias is not None:
        return None
    return FP8GatedMLP(gate, up, down) if gate.in_features == up.in_features else None


def fuse_projections(model: nn.Module) -> int:
    """Fuse q/k/v and gate/up in every module that has them (a SiLU-gated FP8 MLP becomes one ``FP8GatedMLP``);
    returns how many groups were fused (0 if already done)."""
    fused = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (mlp := gated_fp8_mlp(child)) is not None:
                parent.register_module(name, mlp)
                fused += 1
    for module in list(model.modules()):
        for names in GROUPS:
            layers = [getattr(module, name, None) for name in names]
            if any(layer is None or isinstance(layer, ProjectionSlice) for layer in layers):
                continue
            if len({layer.in_features for layer in layers}) != 1 or (joined := concat(layers)) is None:
                continue
            group = FusedProjections(joined, [layer.out_features for layer in layers])
            module.register_module(f"fused_{names[0].split('_')[0]}", group)
            for index, name in enumerate(names):
                setattr(module, name, ProjectionSlice(group, index))
            fused += 1
    return fused
