"""Execute compressed-tensors W4A16 artifacts with real int4 matmul kernels.

transformers decompresses compressed-tensors weights to dense bf16 at load, so a 4-bit artifact
runs as fast (and as big) as the baseline. Here the packed weights stay packed: every quantized
Linear becomes an ``Int4Linear`` that calls PyTorch's built-in tinygemm kernels
(``aten._weight_int4pack_mm`` on CUDA, ``aten._weight_int4pack_mm_for_cpu`` on CPU), which ship
with every recent torch, so nothing else needs installing. They cover 4-bit weights with group
sizes 32/64/128/256, symmetric or with zero points, which is what quantflow's AWQ/GPTQ/RTN
variants write. Unpacking uses compressed-tensors' own ``unpack_from_int32``, so the bit layout
is the library's, not a copy of it.

Layout mapping. compressed-tensors stores signed 4-bit values q in [-8, 7] and dequantizes
``w = (q - zp) * scale``. tinygemm takes unsigned u = q + 8 and dequantizes
``w = (u - 8) * scale + zero``, so ``zero = -zp * scale``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from quantflow.errors import QuantflowError
from quantflow.kernels import device_problem, kernels_label, linear
from quantflow.kernels.w4_pack import W4Weight

GROUP_SIZES = (32, 64, 128, 256)


def inner_k_tiles(in_features: int) -> int:
    """The largest tinygemm tiling (8, 4 or 2 tiles of 16) that divides the input width."""
    for tiles in (8, 4, 2):
        if in_features % (tiles * 16) == 0:
            return tiles
    raise QuantflowError(
        f"a layer with {in_features} inputs cannot use the int4 kernels (needs a multiple of 32)",
        "evaluate it with the dense runtime",
    )


class Int4Linear(nn.Module):
    """A Linear whose weight is 4-bit with per-group scale and zero; activations are bf16.

    It holds the weight in one of two forms of the same size (half a byte per weight), so peak memory does not depend
    on the form:

    - plain (as loaded): the 4-bit values two to a byte, ``[out, in / 2]``. Each call dequantizes the weight to bf16
      with tinygemm's formula and runs a dense matmul. That suits long inputs such as perplexity windows: tinygemm is
      built for a few rows and dequantizes the weight again for every 16-row tile, so at thousands of rows a dense
      matmul is several times faster (``bench/int4_prefill.py``). AutoAWQ's GEMM kernels take the same route for
      long inputs.
    - packed (after ``pack()``) for decode and short prefills: tinygemm's layout, or with ``pack("w4a16")`` (or
      "auto") on CUDA GPUs where quantflow's W4A16 Triton kernels pass their check, their layout, run through
      ``quantflow.kernels.linear`` (a tensor-core decode kernel up to 32 rows, unpack to bf16 + cuBLAS above). Per 7B
      layer on an H200 (docs/benchmarks.md) W4A16 is faster at every row count (59 µs against 65 at one row, 64
      against 142 at 8, 100 against 464 at 32, 1.2 ms against 28 at 2,048-token prefills); tinygemm stays the default
      until end-to-end decode is measured on W4A16. The decode harness packs every layer before it fuses or compiles
      anything.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        group_size: int,
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None,
        packed: bool,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("packed" if packed else "nibbles", weight)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_unsigned(
        cls,
        unsigned: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None,
        device: torch.device,
    ) -> Int4Linear:
        """The plain form of u in [0, 15] ([out, in], int32), and per-group scale and zero ([out, in / group])."""
        out_features, in_features = unsigned.shape
        inner_k_tiles(in_features)  # refuse a width the kernels cannot take now, not at the first decode
        scales_and_zeros = torch.stack([scale, zero], dim=2).transpose(0, 1).contiguous().to(device, torch.bfloat16)
        unsigned = unsigned.to(device, torch.int32)
        nibbles = (unsigned[:, ::2] << 4 | unsigned[:, 1::2]).to(torch.uint8)
        bias = bias.to(device, torch.bfloat16) if bias is not None else None
        return cls(nibbles, scales_and_zeros, group_size, in_features, out_features, bias, packed=False)

    def pack(self, kernel: str = "tinygemm") -> Int4Linear:
        """Switch to a packed layout in place (no-op when packed); returns the layer. ``kernel``: 'tinygemm', 'w4a16'
        or 'auto' (W4A16 where its kernels run, else tinygemm)."""
        if self.is_packed:
            return self
        if kernel == "w4a16" or (kernel == "auto" and w4a16_runs(self.nibbles.device, self.out_features)):
            return self._pack_w4a16()
        tiles = inner_k_tiles(self.in_features)
        if self.nibbles.device.type == "cuda":
            packed = torch.ops.aten._convert_weight_to_int4pack(self.nibbles, tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.unsigned().to(torch.int32), tiles)
        del self.nibbles
        self.register_buffer("packed", packed)
        return self

    def _pack_w4a16(self) -> Int4Linear:
        from quantflow.kernels.w4_pack import repack

        scale, zero = self.scales_and_zeros.transpose(0, 1).float().unbind(2)  # [out, in / group] each
        zero_point = torch.round(-zero / scale)  # zero = -zp * scale in bf16: zp comes back exactly
        weight = repack((self.unsigned().to(torch.int32) - 8).to(torch.int8), scale, zero_point, self.group_size)
        del self.nibbles, self.scales_and_zeros
        for name in ("words", "scale", "offset", "count"):
            self.register_buffer(f"w4_{name}", getattr(weight, name))
        return self

    @property
    def is_packed(self) -> bool:
        """Which form the layer holds: the buffer it has says so."""
        return "packed" in self._buffers or "w4_words" in self._buffers

    @property
    def w4(self) -> W4Weight:
        """The weight in quantflow's W4A16 layout (that form only), as ``quantflow.kernels.linear`` takes it."""
        return W4Weight(
            self.w4_words, self.w4_scale, self.w4_offset, self.out_features, self.in_features, self.group_size,
            self.w4_count,
        )  # fmt: skip

    def unsigned(self) -> torch.Tensor:
        """u in [0, 15] as [out, in] uint8 (plain form only)."""
        return torch.stack([self.nibbles >> 4, self.nibbles & 15], dim=-1).reshape(self.out_features, -1)

    def dequantized(self) -> torch.Tensor:
        """The bf16 weight [out, in] as tinygemm computes it: (u - 8) * scale + zero per group (plain form only)."""
        groups = (self.unsigned().to(torch.bfloat16) - 8).view(self.out_features, -1, self.group_size)
        scale, zero = self.scales_and_zeros.transpose(0, 1).unsqueeze(-1).unbind(2)  # [out, in / group, 1] each
        return torch.addcmul(zero, groups, scale).reshape(self.out_features, self.in_features)

    @classmethod
    def concat(cls, layers: list[Int4Linear], bias: torch.Tensor | None) -> Int4Linear:
        """Layers of one input width and group size as one, outputs side by side (``quantflow.evaluation.fuse``, which
        joins the biases); packs them first.

        Every packed layout stacks along the output dimension: tinygemm's CUDA one is [out / 8, in / (16 * tiles), 32,
        tiles / 2] (tiles of 8 output rows, which tinygemm needs anyway), the CPU's [out, in / 2], scales and zeros [in
        / group, out, 2]; W4A16's words are [out / 64, ...] (``quantflow.kernels.w4_pack``), scales and offsets [in /
        group, out]: layers whose widths are multiples of 64 join without padding in between.
        """
        packed = [layer.pack() for layer in layers]
        if all("w4_words" in layer._buffers for layer in packed) and all(m.out_features % 64 == 0 for m in packed):
            joined = cls.__new__(cls)
            nn.Module.__init__(joined)
            joined.in_features, joined.group_size = layers[0].in_features, layers[0].group_size
            joined.out_features = sum(layer.out_features for layer in layers)
            joined.register_buffer("w4_words", torch.cat([layer.w4_words for layer in layers]))
            for name in ("scale", "offset"):
                joined.register_buffer(f"w4_{name}", torch.cat([getattr(layer, f"w4_{name}") for layer in layers], 1))
            joined.register_buffer("w4_count", torch.cat([layer.w4_count for layer in layers]))
            joined.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
            return joined
        return cls(
            torch.cat([layer.pack().packed for layer in layers]),
            torch.cat([layer.scales_and_zeros for layer in layers], dim=1),
            layers[0].group_size,
            layers[0].in_features,
            sum(layer.out_features for layer in layers),
            bias,
            packed=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if "w4_words" in self._buffers:
            y = linear(flat, self.w4)
        elif not self.is_packed:
            y = flat @ self.dequantized().t()
        elif self.packed.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales_and_zeros)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return (y + self.bias if self.bias is not None else y).to(x.dtype)


def w4a16_runs(device: torch.device, out_features: int) -> bool:
    """Whether quantflow's W4A16 kernels run a layer here (CUDA, their check passed, a width fused layers can join)."""
    return device.type == "cuda" and out_features % 64 == 0 and device_problem(device) is None


def pack_all(model: nn.Module, kernel: str = "tinygemm") -> nn.Module:
    """Every Int4Linear of ``model`` in a packed layout (for decoding, ``Int4Linear.pack``); returns the model."""
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.pack(kernel)
    return model


def weight_scheme(config: dict) -> dict:
    """The artifact's 4-bit weight quantization args, refused unless the int4 kernels can run them.

    A mixed-precision artifact (several config groups naming their layers) qualifies when its other groups are
    8-bit weight-only per channel: those layers run on the int8 weight-only kernel or dense (``convert_any``). Its
    4-bit groups may differ in group size (a finer group on some layers); each layer takes its own from its scales.
    """
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "compressed-tensors" or quant.get("format") != "pack-quantized":
        raise QuantflowError(
            "the model folder is not a compressed-tensors pack-quantized artifact",
            "use the dense runtime for this model",
        )
    groups = list(quant.get("config_groups", {}).values())
    four = [g["weights"] for g in groups if g["weights"]["num_bits"] == 4]
    others = [g["weights"] for g in groups if g["weights"]["num_bits"] != 4]
    weight_only = not any(group.get("input_activations") for group in groups)
    symmetry = {w["symmetric"] for w in four}
    if len(symmetry) > 1 or not weight_only or any(w["num_bits"] != 8 or w["strategy"] != "channel" for w in others):
        raise QuantflowError(
            "the int4 runtime handles 4-bit weight-only schemes of one symmetry per model (and per-channel 8-bit "
            "layers beside them)",
            "use the dense runtime for this model",
        )
    for args in four or [groups[0]["weights"]]:
        if args["num_bits"] != 4 or args["strategy"] != "group" or args["group_size"] not in GROUP_SIZES:
            raise QuantflowError(
                f"the int4 kernels need 4-bit weights in groups of {GROUP_SIZES}; this artifact has "
                f"{args['num_bits']} bits, strategy {args['strategy']}, group size {args.get('group_size')}",
                "use the dense runtime for this model",
            )
    return four[0]


def use_int4(model_path: str | Path, kernels: str, device: str) -> bool:
    """Whether a model folder is evaluated on the int4 kernels: W4 artifacts under 'int4', and on CUDA under 'auto'.

    Unquantized folders (the baseline) always run dense; under 'int4' an artifact the kernels cannot run is an error
    (``pipeline.plan`` refuses such variants before any work).
    """
    config = json.loads((Path(model_path) / "config.json").read_text())
    if kernels in ("dense", "fp8") or not config.get("quantization_config"):
        return False
    if kernels == "int4":
        weight_scheme(config)
        return True
    if device != "cuda":
        return False
    try:
        weight_scheme(config)
    except QuantflowError:
        return False
    return True


def convert_layer(
    tensors: dict[str, torch.Tensor], args: dict, bias: torch.Tensor | None, device: torch.device
) -> Int4Linear:
    """One compressed Linear (weight_packed, weight_scale, weight_shape[, weight_zero_point]) to an Int4Linear, in
    the group size its scales give (a mixed artifact's layers may differ from ``args``)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    shape = torch.Size(tensors["weight_shape"].tolist())
    scale = tensors["weight_scale"].float()
    signed = unpack_from_int32(tensors["weight_packed"], 4, shape)
    if args["symmetric"]:
        zero = torch.zeros_like(scale)
    else:
        zp = unpack_from_int32(tensors["weight_zero_point"], 4, scale.shape, packed_dim=0)
        zero = -zp.float() * scale
    group_size = shape[1] // scale.shape[1]
    return Int4Linear.from_unsigned(signed.to(torch.int32) + 8, scale, zero, group_size, bias, device)


def convert_any(
    parts: dict[str, torch.Tensor], args: dict, bias: torch.Tensor | None, device: torch.device
) -> nn.Module:
    """A packed Linear of a W4 or mixed artifact: 4-bit on int4 kernels; 8-bit (its packing says which) on the int8
    weight-only kernel when symmetric, else dequantized to a bf16 Linear (no kernel takes 8-bit zero points)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from quantflow.kernels.int8 import Int8WeightOnlyLinear

    shape = torch.Size(parts["weight_shape"].tolist())
    if parts["weight_packed"].shape[1] * 8 == shape[1]:  # eight 4-bit values per int32
        return convert_layer(parts, args, bias, device)
    signed = unpack_from_int32(parts["weight_packed"], 8, shape).to(device)
    scale = parts["weight_scale"].to(device)
    if "weight_zero_point" not in parts:
        return Int8WeightOnlyLinear(signed, scale, bias.to(device) if bias is not None else None)
    zero = unpack_from_int32(parts["weight_zero_point"], 8, scale.shape, packed_dim=0).to(device)
    dense = nn.Linear(shape[1], shape[0], bias=bias is not None, device=device, dtype=torch.bfloat16)
    dense.weight.data = ((signed.float() - zero.float()) * scale.float()).to(torch.bfloat16)
    if bias is not None:
        dense.bias.data = bias.to(device, torch.bfloat16)
    return dense


def load_int4(path: str | Path, device: str) -> nn.Module:
    """Load a quantflow W4 (or mixed) artifact with its 4-bit Linears on int4 kernels and everything else in bf16."""
    from quantflow.evaluation.int8 import check_layer
    from quantflow.evaluation.packed import load_converted
    from quantflow.kernels.int8 import Int8WeightOnlyLinear

    args = weight_scheme(json.loads((Path(path) / "config.json").read_text()))
    model = load_converted(
        path,
        device,
        "weight_packed",
        ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point"),
        lambda parts, bias, target: convert_any(parts, args, bias, target),
    )
    if any(isinstance(m, Int8WeightOnlyLinear) for m in model.modules()):
        check_layer(model)  # a mixed artifact's W8 layers: the int8 kernel checked against its dequantized weights
    return model


def runtime_label(model: nn.Module) -> str:
    """What ran the Linears: the int4 kernels, and for a mixed artifact what ran the rest."""
    from quantflow.kernels.int8 import Int8WeightOnlyLinear

    kinds = [type(m) for m in model.modules() if isinstance(m, nn.Linear | Int4Linear | Int8WeightOnlyLinear)]
    four, eight, dense = kinds.count(Int4Linear), kinds.count(Int8WeightOnlyLinear), kinds.count(nn.Linear)
    w4a16 = [m for m in model.modules() if isinstance(m, Int4Linear) and "w4_words" in m._buffers]
    if w4a16:
        kernel = kernels_label(w4a16[0].w4_words.device)
    else:
        kernel = "tinygemm kernels"
    label = f"int4 {kernel} on the packed weights (bf16 activations; perplexity windows dequantize per layer)"
    if eight or dense > 1:  # more than lm_head left dense: a mixed artifact
        label += f" for {four} Linears; {eight} on the int8 weight-only kernel, {dense} in bf16 (lm_head included)"
    return label
