"""The one workaround for loading quantized mixture-of-experts artifacts in transformers.

transformers 5.17 dequantizes a compressed-tensors checkpoint's per-expert weights while it fuses them into its
3-D expert tensors (``DecompressExperts``), but it collects only ``weight_packed``, ``weight_scale`` and
``weight_shape``, and decompresses every expert with one scheme. Three things quantflow writes are lost:

- an asymmetric scheme's ``weight_zero_point`` (AWQ's default): compressed-tensors stops the load with
  "Asymmetric quant requires zero-point values". Upstream: huggingface/transformers#47430 (PR, open).
- NVFP4's per-tensor ``weight_global_scale``: the experts load silently scaled by a wrong constant (measured on
  a tiny Qwen3-MoE: mean relative weight error 3.6e4 instead of 0.1). Upstream: huggingface/transformers#48371
  (issue) and #48372 (PR), open.
- the scheme of each expert: every expert is decompressed with one scheme, but a mixed-precision artifact gives
  experts W4 groups, W8 channels or bf16 (plain weights, which are not even collected): the load stops on a shape
  mismatch, or a bf16 expert comes back as random initialisation. Each expert is decompressed with the scheme its
  name matches (``expert_schemes``).

The artifacts themselves are right (per-expert Linears with every part, the layout vLLM loads). Within
``expert_load()`` the converter collects those parts and hands them to the decompressor.
``tests/unit/test_moe.py::test_upstream_still_drops_expert_zero_points`` and
``tests/unit/test_fp4.py::test_upstream_still_drops_expert_global_scales`` and
``tests/unit/test_moe.py::test_upstream_still_gives_every_expert_one_scheme`` load such artifacts without this module
and expect the failures: when they fail, the fixes have landed and this module can go.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

EXTRA_PARTS = ("zero_point", "global_scale")  # what transformers 5.17 leaves behind, as weight_<part>


def _collect_missing_parts(converter):
    """The experts' converter with the zero points and global scales among its sources (unchanged when it has them)."""
    from transformers.core_model_loading import WeightConverter
    from transformers.integrations.compressed_tensors import DecompressExperts

    if not isinstance(converter, WeightConverter) or not any(
        isinstance(op, DecompressExperts) for op in converter.operations
    ):
        return converter
    sources = list(converter._original_source_patterns)
    packed = [p.removesuffix("_packed$") for p in sources if p.endswith("_packed$")]
    if packed and int8_scheme(next(op for op in converter.operations if isinstance(op, DecompressExperts))):
        sources = [p for p in sources if not p.endswith(("_packed$", "_shape$"))] + [f"{p}$" for p in packed]
        return WeightConverter(
            source_patterns=sources,
            target_patterns=list(converter._original_target_patterns),
            operations=list(converter.operations),
        )
    missing = [f"{p}_{part}$" for p in packed for part in EXTRA_PARTS if f"{p}_{part}$" not in sources]
    missing += [f"{p}$" for p in packed if f"{p}$" not in sources]  # a mixed artifact's bf16 experts
    if not missing:
        return converter
    return WeightConverter(
        source_patterns=[*sources, *missing],
        target_patterns=list(converter._original_target_patterns),
        operations=list(converter.operations),
    )


def int8_scheme(op) -> bool:
    """INT8 W8A8 experts: stored as plain int8 ``weight`` and ``weight_scale`` (compressed-tensors' int-quantized
    format), which transformers 5.17 looks for as packed weights and finds none of ("Concatenate ... Ckpt contains:
    0"). Same upstream family as the zero points; no fix of its own was found."""
    from transformers.integrations.compressed_tensors import get_experts_scheme

    scheme = op.scheme or get_experts_scheme(op.hf_quantizer.compressor.quantization_config)
    return scheme.weights.type == "int" and scheme.weights.num_bits == 8 and scheme.format == "int-quantized"


def _dequantize_int8(input_dict: dict) -> dict:
    """Each expert's int8 weight times its per-channel scale, stacked (bf16), as transformers does for FP8."""
    out = {}
    for key in (k for k in input_dict if "weight_scale" not in k):
        scales = input_dict[key.replace("weight", "weight_scale")]
        out[key] = torch.stack(
            [(q.float() * s.float()).to(torch.bfloat16) for q, s in zip(input_dict[key], scales, strict=True)]
        )
    return out


class _Packed(nn.Module):
    """One expert projection's stored tensors, as compressed-tensors' decompressor reads them from a module."""

    def __init__(self, tensors: dict[str, torch.Tensor], scheme) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        self.quantization_scheme = scheme


def expert_schemes(config, layer: str, proj: str, count: int) -> list:
    """The scheme of each of a layer's ``count`` experts for projection ``proj``, by the expert Linear's name
    (``model.layers.1.mlp.experts.3.down_proj``) or the ``Linear`` class every expert is in the checkpoint, None for
    an expert left in bf16.

    transformers 5.17 decompresses every expert with one scheme (``get_experts_scheme``: the first group that names
    experts), but a mixed-precision artifact gives experts different schemes (W4 groups, W8 channels, bf16): with
    the one scheme the load stops ("The size of tensor a (32) must match the size of tensor b (2)"). Same upstream
    family as the zero points (huggingface/transformers#47430); no fix of its own was found."""
    from compressed_tensors.utils.match import match_name

    schemes = []
    for index in range(count):
        name = f"{layer}.{index}.{proj}"
        found = [
            group
            for group in config.config_groups.values()
            if any(target == "Linear" or match_name(name, target) for target in group.targets)
        ]
        ignored = any(match_name(name, target) for target in config.ignore or [])
        schemes.append(None if ignored or not found else found[0])
    return schemes


def _decompress_with_zero_points(original):
    """``DecompressExperts.convert`` that hands each expert its own scheme, zero point and global scale."""

    def convert(self, input_dict, source_patterns, target_patterns, full_layer_name=None, **kwargs):
        if int8_scheme(self):
            return _dequantize_int8(input_dict)
        config = self.hf_quantizer.compressor.quantization_config
        single = len(config.config_groups) == 1
        if single and not any(f"weight_{part}" in key for key in input_dict for part in EXTRA_PARTS):
            return original(self, input_dict, source_patterns, target_patterns, full_layer_name, **kwargs)
        layer = (full_layer_name or "").rpartition(".")[0]
        out = {}
        for key in (k for k in input_dict if "weight_packed" in k):
            plain = input_dict.get(key.replace("weight_packed", "weight"), [])
            count = len(input_dict[key]) + len(plain)
            schemes = expert_schemes(config, layer, key.split(".")[-2], count)
            out[key] = torch.stack(_expert_weights(input_dict, key, schemes, list(plain)))
        return out

    return convert


def _expert_weights(input_dict: dict, key: str, schemes: list, plain: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each expert's dense weight, in expert order: a quantized expert decompressed with its own scheme and every
    stored part, an expert left in bf16 (``plain``, in order) as it is."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format

    parts = {
        f"weight_{part}": list(input_dict[key.replace("weight_packed", f"weight_{part}")])
        for part in ("packed", "scale", "shape", *EXTRA_PARTS)
        if key.replace("weight_packed", f"weight_{part}") in input_dict
    }
    experts, dtype = [], None
    for scheme in schemes:
        if scheme is None:
            experts.append(plain.pop(0))
            continue
        module = _Packed({name: values.pop(0) for name, values in parts.items()}, scheme)
        compressor = BaseCompressor.get_value_from_registry(scheme.format or infer_module_format(nn.Linear, scheme))
        compressor.decompress_module(module)
        experts.append(module.weight.data)
        dtype = module.weight.dtype
    return [e.to(dtype) if dtype is not None else e for e in experts]


@contextlib.contextmanager
def expert_load() -> Iterator[None]:
    """Within this context transformers loads compressed-tensors experts with their zero points and global scales."""
    from transformers.integrations.compressed_tensors import DecompressExperts
    from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer

    update, convert = CompressedTensorsHfQuantizer.update_weight_conversions, DecompressExperts.convert

    def collecting(self, weight_conversions):
        return [_collect_missing_parts(c) for c in update(self, weight_conversions)]

    CompressedTensorsHfQuantizer.update_weight_conversions = collecting
    DecompressExperts.convert = _decompress_with_zero_points(convert)
    try:
        yield
    finally:
        CompressedTensorsHfQuantizer.update_weight_conversions, DecompressExperts.convert = update, convert


# Families whose checkpoints name expert projections their own way: llm-compressor 0.14 saves unfused experts
# under its Linear names (gate_proj/up_proj/down_proj) while transformers 5.17 reverts only the block's prefix
# (mlp -> block_sparse_moe), so a Mixtral artifact held ``block_sparse_moe.experts.0.gate_proj``, which neither
# vLLM (``make_expert_params_mapping(ckpt_gate_proj_name="w1", ckpt_down_proj_name="w2", ckpt_up_proj_name="w3")``)
# nor transformers' own Mixtral conversion (``.experts.*.w1.weight``) loads. Upstream: vllm-project/llm-compressor
# #3069 ("Cannot dispatch MOE correctly if using naming w1,w3 or block_sparse_moe", open); the test
# ``tests/unit/test_moe_families.py::test_upstream_still_saves_mixtral_experts_under_linear_names`` says when it is
# fixed.
CHECKPOINT_EXPERT_NAMES = {"mixtral": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}}


def module_names(tensors: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under the names of the modules quantflow's kernel runtimes build (transformers 5's,
    experts unfused by llm-compressor): a Mixtral's ``block_sparse_moe.experts.E.w1`` is ``mlp.experts.E.gate_proj``
    there. Other families' names are the modules' already."""
    names = CHECKPOINT_EXPERT_NAMES.get(model_type)
    if not names:
        return tensors
    rename = expert_renamer({stored: module for module, stored in names.items()})
    return {rename(key.replace(".block_sparse_moe.", ".mlp.")): value for key, value in tensors.items()}


def expert_renamer(names: dict[str, str]) -> Callable[[str], str]:
    """A function renaming the projection of an expert Linear's name (``experts.3.gate_proj`` -> ``experts.3.w1``)
    by ``names``, and leaving every other name as it is."""
    pattern = re.compile(r"(\.experts\.\d+\.)(" + "|".join(names) + r")\b")
    return lambda name: pattern.sub(lambda found: found.group(1) + names[found.group(2)], name)


def checkpoint_expert_names(folder: Path) -> int:
    """Rename a saved artifact's expert projections to its family's checkpoint names, in the tensors and in the
    quantization config's targets and ignore list; returns how many tensors were renamed (0 for other families)."""
    from safetensors.torch import load_file, save_file

    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    names = CHECKPOINT_EXPERT_NAMES.get(config.get("model_type", ""))
    if not names:
        return 0
    rename = expert_renamer(names)
    renamed = 0
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(shard))
        if any(rename(k) != k for k in tensors):
            renamed += sum(rename(k) != k for k in tensors)
            save_file({rename(k): v for k, v in tensors.items()}, str(shard), metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        found = json.loads(index.read_text())
        found["weight_map"] = {rename(k): v for k, v in found["weight_map"].items()}
        index.write_text(json.dumps(found, indent=2))
    quantization = config.get("quantization_config", {})
    for group in quantization.get("config_groups", {}).values():
        group["targets"] = [rename(t) for t in group["targets"]]
    quantization["ignore"] = [rename(t) for t in quantization.get("ignore", [])]
    config_path.write_text(json.dumps(config, indent=2))
    return renamed


def in_compute_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast the floating-point parameters a quantized load left in another dtype to ``dtype``, in place.

    transformers 5.17 loads a compressed-tensors Mixtral's renamed tensors (``block_sparse_moe`` -> ``mlp``: the
    router and the fused experts) in the checkpoint's bf16 whatever ``dtype=`` asked, and the float32 forward on CPU
    stops ("expected m1 and m2 to have the same dtype"); Qwen3-MoE, whose names need no renaming, loads right.
    Integer tensors (packed weights, zero points, bitsandbytes' storage) are left alone."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model
