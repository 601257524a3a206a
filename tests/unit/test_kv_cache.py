"""The KV cache as an evaluation axis: llm-compressor's calibrated FP8 KV cache in the artifact, its exact emulation
when the artifact is evaluated, its bytes per token and capacity in the report, and the refusal of a model whose
attention the scheme does not cover."""

import pytest
import torch
from safetensors import safe_open

from quantflow import pipeline
from quantflow.errors import QuantflowError
from quantflow.evaluation.kv_cache import bytes_per_token, capacity, kv_precision
from quantflow.pipeline.planning import plan
from quantflow.reporting.report import load_report
from quantflow.spec import parse_spec
from tests.conftest import read_json, small_spec


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("kv-run")
    variants = [{"method": "rtn", "group_size": 32}]
    kv_cache = ["bf16", "fp8", "fp8-head", "int8-token-head"]
    spec = small_spec(tiny_model, root / "out", root / "cache", variants, kv_cache=kv_cache, speed=None)
    spec = parse_spec(spec)
    return spec, pipeline.run(spec, progress=lambda _: None)


def test_each_model_gets_an_fp8_kv_twin_whose_artifact_carries_the_scales_vllm_reads(finished):
    _, out = finished
    report = load_report(out / "report.json")
    assert report.schema_version == "1.9"
    assert [r.name for r in report.rows][:4] == ["baseline", "rtn", "baseline-kv-fp8", "rtn-kv-fp8"]
    for name, groups in (("baseline-kv-fp8", 0), ("rtn-kv-fp8", 1)):
        config = read_json(out / name / "config.json")["quantization_config"]
        assert config["kv_cache_scheme"]["type"] == "float" and config["kv_cache_scheme"]["num_bits"] == 8
        assert config["kv_cache_scheme"]["strategy"] == "tensor" and not config["kv_cache_scheme"]["dynamic"]
        assert len(config["config_groups"]) == groups
        with safe_open(out / name / "model.safetensors", "pt") as stored:
            scales = sorted(k for k in stored.keys() if k.endswith(("k_scale", "v_scale")))
        assert scales == [f"model.layers.{i}.self_attn.{kv}_scale" for i in range(2) for kv in "kv"]
    assert read_json(out / "rtn" / "config.json")["quantization_config"].get("kv_cache_scheme") is None


def test_the_fp8_head_twins_artifacts_carry_one_scale_per_kv_head_and_the_attn_head_scheme(finished):
    """compressed-tensors' attn_head strategy: k_scale and v_scale of shape (KV heads, 1, 1) per layer, each head's
    own range (the tiny Llama's 2 KV heads do not share one), and config.json's kv_cache_scheme says attn_head, which
    is what vLLM reads to size its per-head scales."""
    _, out = finished
    rows = {r.name: r for r in load_report(out / "report.json").rows}
    assert {"baseline", "rtn", "baseline-kv-fp8", "rtn-kv-fp8", "baseline-kv-fp8-head", "rtn-kv-fp8-head"} <= set(rows)
    for name in ("baseline-kv-fp8-head", "rtn-kv-fp8-head"):
        scheme = read_json(out / name / "config.json")["quantization_config"]["kv_cache_scheme"]
        assert (scheme["type"], scheme["num_bits"], scheme["strategy"]) == ("float", 8, "attn_head")
        assert not scheme["dynamic"] and scheme["symmetric"]
        with safe_open(out / name / "model.safetensors", "pt") as stored:
            scales = {k: stored.get_tensor(k) for k in stored.keys() if k.endswith(("k_scale", "v_scale"))}
        assert sorted(scales) == [f"model.layers.{i}.self_attn.{kv}_scale" for i in range(2) for kv in "kv"]
        assert all(scale.shape == (2, 1, 1) for scale in scales.values())
        assert all(scale[0].item() != scale[1].item() for scale in scales.values())
        assert rows[name].kv_cache.precision == "fp8-head" and "per-head k/v scales" in rows[name].scheme
        assert rows[name].kv_cache.bytes_per_token == rows["baseline"].kv_cache.bytes_per_token // 2
    assert rows["rtn-kv-fp8-head"].kv_cache.paired_with == "rtn"
    assert rows["baseline-kv-fp8-head"].kv_cache.paired_with == "baseline"


def test_the_fp8_head_cache_is_emulated_with_each_heads_own_scale(finished):
    """Moving one KV head's k scale far off moves the logits: the emulation reads each head's scale."""
    from transformers import AutoModelForCausalLM

    _, out = finished
    ids = torch.arange(3, 200).unsqueeze(0)
    model = AutoModelForCausalLM.from_pretrained(out / "baseline-kv-fp8-head", dtype=torch.float32)
    assert kv_precision(model) == "fp8-head"
    with torch.no_grad():
        reference = model(ids).logits
        for layer in model.model.layers:
            layer.self_attn.k_scale.data[1] *= 1e6
        moved = model(ids).logits
    assert (moved - reference).abs().max().item() > 1e-3


def test_the_int8_token_head_twins_keep_their_base_artifact_and_are_evaluated_on_an_emulated_cache(finished):
    """vLLM's runtime int8_per_token_head: no KV scales in any artifact (the rtn twin's is rtn's own), a small
    nonzero perplexity cost, bytes that count a float32 scale per token and KV head, and a label naming vLLM's flag."""
    _, out = finished
    report = load_report(out / "report.json")
    rows = {r.name: r for r in report.rows}
    twins = [rows["baseline-kv-int8-token-head"], rows["rtn-kv-int8-token-head"]]
    assert twins[1].artifact == rows["rtn"].artifact and twins[0].artifact is None
    for twin, base in zip(twins, ("baseline", "rtn"), strict=True):
        cache, plain = twin.kv_cache, rows[base].kv_cache
        assert cache.precision == "int8-token-head" and cache.paired_with == base
        assert cache.bytes_per_token == 2 * 2 * (16 + 4) * 2  # layers x KV heads x (16 int8 + fp32 scale) x (K, V)
        assert 0 < abs(cache.kv_ppl_delta_pct) < 1, cache.kv_ppl_delta_pct
        assert twin.perplexity != rows[base].perplexity and plain.precision == "bf16"
        assert "--kv-cache-dtype int8_per_token_head" in twin.runtime and "Triton" in twin.runtime
        assert "emulated by quantflow" in twin.runtime
    assert "int8_per_token_head" in twins[1].scheme and twins[1].scheme.startswith(rows["rtn"].scheme)
    assert twins[0].scheme.startswith("weights unquantized, int8 KV cache") and rows["baseline"].scheme == ""
    config = read_json(out / "rtn-kv-int8-token-head" / "config.json")["quantization_config"]
    assert config.get("kv_cache_scheme") is None


def test_the_int8_cache_scales_each_token_and_kv_head_on_its_own_and_hooks_the_attention(tiny_model):
    """A huge key in one token and head leaves every other token's and head's values as they were; on the model,
    the emulation moves the logits a little, not a lot."""
    from transformers import AutoModelForCausalLM

    from quantflow.evaluation.kv_cache import emulate_runtime_kv, quantize_per_token_head

    states = torch.randn(1, 2, 5, 16)
    spiked = states.clone()
    spiked[0, 0, 2, 3] = 1e4
    plain, moved = quantize_per_token_head(states), quantize_per_token_head(spiked)
    steps = states.abs().amax(-1, keepdim=True) / 127
    assert 0 < (plain - states).abs().max() and ((plain - states).abs() <= steps * 1.0001).all()
    # vLLM's Triton store truncates toward zero: with a scale of exactly 1, 2.7 is stored as 2 and -2.7 as -2
    row = torch.tensor([127.0, 2.7, -2.7, 0.5] + [0.0] * 12).reshape(1, 1, 1, 16)
    assert quantize_per_token_head(row)[0, 0, 0, :4].tolist() == [127.0, 2.0, -2.0, 0.0]
    others = torch.ones_like(states, dtype=torch.bool)
    others[0, 0, 2] = False
    assert torch.equal(plain[others], moved[others]) and not torch.equal(plain[0, 0, 2], moved[0, 0, 2])

    ids = torch.arange(3, 200).unsqueeze(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        reference = model(ids).logits
        emulate_runtime_kv(model, "int8-token-head")
        error = (model(ids).logits - reference).abs().max().item()
    assert kv_precision(model) == "int8-token-head"
    assert 0 < error < 1e-2 * reference.abs().max().item(), error


def test_the_report_gives_long_context_perplexity_kv_bytes_and_capacity_per_row(finished):
    spec, out = finished
    rows = {r.name: r for r in load_report(out / "report.json").rows}
    # tiny Llama: 2 layers x 2 KV heads x head dim 16 x (K, V)
    assert rows["baseline"].kv_cache.bytes_per_token == 2 * 2 * 16 * 2 * 2
    assert rows["baseline-kv-fp8"].kv_cache.bytes_per_token == rows["baseline"].kv_cache.bytes_per_token // 2
    assert rows["rtn-kv-fp8"].kv_cache.precision == "fp8" and rows["rtn"].kv_cache.precision == "bf16"
    for row in rows.values():
        cache = row.kv_cache
        assert cache.long_window == 4 * spec.evaluation.window  # 256, the tiny model's whole context
        assert cache.long_perplexity > 1
        size = row.size_mb * 2**20
        assert abs(cache.capacity.max_kv_tokens - (80 * 2**30 - size) / cache.bytes_per_token) < 1 + 2**20 / 100
        assert cache.capacity.max_batch == cache.capacity.max_kv_tokens // 256
    twin, plain = rows["rtn-kv-fp8"].kv_cache, rows["rtn"].kv_cache
    assert twin.paired_with == "rtn" and twin.long_perplexity != plain.long_perplexity
    assert twin.kv_ppl_delta_pct == pytest.approx(100 * (twin.long_perplexity / plain.long_perplexity - 1), abs=1e-3)
    assert "## KV cache" in (out / "report.md").read_text()


def test_the_fp8_cache_is_emulated_with_the_stored_scales(finished):
    """compressed-tensors quantizes K and V with the artifact's k/v scales: the logits move off the bf16 cache's,
    and scales far off the calibrated ones (clipping, or values rounded to zero below FP8's range) move them further."""
    from transformers import AutoModelForCausalLM

    _, out = finished
    ids = torch.arange(3, 200).unsqueeze(0)
    plain = AutoModelForCausalLM.from_pretrained(out / "baseline-kv-fp8", dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(out / "baseline-kv-fp8", dtype=torch.float32)
    assert kv_precision(quantized) == "fp8"
    for layer in plain.model.layers:  # the same weights, the cache left in full precision
        layer.self_attn.quantization_enabled = False
    with torch.no_grad():
        reference = plain(ids).logits
        error = (quantized(ids).logits - reference).abs().max().item()
        errors = []
        for factor in (1e-2, 1e6):
            for layer in quantized.model.layers:
                layer.self_attn.k_scale.data *= factor
                layer.self_attn.v_scale.data *= factor
            errors.append((quantized(ids).logits - reference).abs().max().item())
            for layer in quantized.model.layers:
                layer.self_attn.k_scale.data /= factor
                layer.self_attn.v_scale.data /= factor
    assert 0 < error and all(wrong > 3 * error for wrong in errors), (error, errors)


def test_a_bf16_cache_costs_twice_the_bytes_of_an_fp8_one_and_capacity_counts_the_weights():
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    assert bytes_per_token(config, "bf16") == 30 * 3 * 64 * 2 * 2 == 2 * bytes_per_token(config, "fp8")
    assert bytes_per_token(config, "int8-token-head") == 30 * 3 * (64 + 4) * 2 == 12_240  # 53% of bf16's 23,040
    fits = capacity(weight_bytes=2**30, per_token=1024, card_memory_gb=2, context=1000)
    assert fits.max_kv_tokens == 2**30 // 1024 and fits.max_batch == 1048


@pytest.mark.parametrize("option", ["fp8", "int8-token-head"])
def test_a_model_whose_attention_the_scheme_does_not_cover_is_refused_at_plan_time(tmp_path, option):
    """GPT-NeoX (Pythia) joins q, k and v in one query_key_value Linear: llm-compressor would calibrate no k/v scale,
    and the int8 emulation, which hooks the same attention modules, would leave the cache in full precision."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from tests.conftest import make_tokenizer

    folder = tmp_path / "neox"
    tokenizer = make_tokenizer(folder)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    variants = [{"method": "rtn", "group_size": 32}]
    spec = small_spec(folder, tmp_path / "out", tmp_path / "cache", variants, kv_cache=["bf16", option])
    with pytest.raises(QuantflowError) as refused:
        plan(parse_spec(spec), progress=lambda _: None)
    assert f"evaluation.kv_cache '{option}' cannot quantize this gpt_neox model's KV cache" in refused.value.problem
    assert "kv_cache to [bf16]" in refused.value.fix
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache" / "plan").exists()
    plan(parse_spec({**spec, "evaluation": {**spec["evaluation"], "kv_cache": ["bf16"]}}), progress=lambda _: None)


@pytest.mark.parametrize("option", ["fp8-head", "int8-token-head"])
def test_per_head_scales_on_a_model_that_caches_a_latent_instead_of_kv_heads_are_refused_at_plan_time(tmp_path, option):
    """DeepSeek-V3's multi-head latent attention (kv_b_proj) is calibrated per tensor, but it caches one latent vector
    per token: there is no KV head to give a scale."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from tests.conftest import make_model

    folder = make_model(
        tmp_path / "mla",
        classes=(DeepseekV3Config, DeepseekV3ForCausalLM),
        moe_intermediate_size=32,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_group=1,
        topk_group=1,
    )
    spec = small_spec(folder, tmp_path / "out", tmp_path / "cache", [], kv_cache=["bf16", option])
    spec = {**spec, "variants": [{"method": "rtn", "group_size": 8}]}
    with pytest.raises(QuantflowError) as refused:
        plan(parse_spec(spec), progress=lambda _: None)
    assert f"'{option}' needs one scale per KV head, and this deepseek_v3 model has none" in refused.value.problem
    assert "model.layers.0.self_attn" in refused.value.problem and "'fp8' (per-tensor" in refused.value.fix
    assert not (tmp_path / "out").exists()
    plan(parse_spec({**spec, "evaluation": {**spec["evaluation"], "kv_cache": ["bf16", "fp8"]}}), lambda _: None)


def test_the_axis_twins_every_weight_variant_and_changes_only_the_twins_quantize_key(tiny_model, tmp_path):
    from quantflow.inputs.calibration import CalibrationRecord
    from quantflow.pipeline.steps import quantize_key

    variants = [{"method": "rtn", "group_size": 32}, {"method": "bnb-int8"}]
    plain = plan(parse_spec(small_spec(tiny_model, tmp_path / "a", tmp_path / "c", variants)), lambda _: None)
    axis = plan(
        parse_spec(small_spec(tiny_model, tmp_path / "b", tmp_path / "c", variants, kv_cache=["bf16", "fp8"])),
        lambda _: None,
    )
    assert [v.name for v in axis.variants] == ["rtn", "bnb-int8", "baseline-kv-fp8", "rtn-kv-fp8"]
    assert axis.kv == {"baseline-kv-fp8": "fp8", "rtn-kv-fp8": "fp8"}
    assert [d.name for d in axis.dropped] == ["bnb-int8-kv-fp8"]  # quantized at load: no artifact for the scales
    record = CalibrationRecord.model_construct(hash="h")
    rtn, twin = axis.variant("rtn"), axis.variant("rtn-kv-fp8")
    assert quantize_key(plain, plain.variant("rtn"), record) == quantize_key(axis, rtn, record)
    assert quantize_key(axis, twin, record) != quantize_key(axis, rtn, record)
    runtime = plan(
        parse_spec(small_spec(tiny_model, tmp_path / "d", tmp_path / "c", variants, kv_cache=["int8-token-head"])),
        lambda _: None,
    )
    # no scales to calibrate: the int8 twin's artifact is rtn's own, quantized once
    assert quantize_key(runtime, runtime.variant("rtn-kv-int8-token-head"), record) == quantize_key(plain, rtn, record)


def test_the_axis_refuses_a_repeated_option_and_a_name_its_twins_take(tiny_model, tmp_path):
    with pytest.raises(QuantflowError, match="kv_cache repeats an option"):
        parse_spec(small_spec(tiny_model, tmp_path / "o", tmp_path / "c", [{"method": "rtn"}], kv_cache=["fp8"] * 2))
    variants = [{"method": "rtn"}, {"method": "gptq", "name": "rtn-kv-fp8"}]
    spec = parse_spec(small_spec(tiny_model, tmp_path / "o", tmp_path / "c", variants, kv_cache=["bf16", "fp8"]))
    with pytest.raises(QuantflowError, match="'rtn-kv-fp8' is taken by the kv_cache axis's twin of 'rtn'"):
        plan(spec, lambda _: None)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "awq-gptq", "autoround", "fp8", "int8", "nvfp4"])
def test_every_recipe_takes_the_kv_scheme_on_its_last_quantizer_and_keeps_its_settings(method):
    from llmcompressor.modifiers.quantization.quantization.mixin import QuantizationMixin

    from quantflow.quantization.kv_cache import with_kv_cache
    from quantflow.quantization.quantize import recipe_for

    variant = parse_spec({"variants": [{"method": method}]}).variants[0]
    recipe = recipe_for(variant, 32 if hasattr(variant, "group_size") else None)
    assert with_kv_cache(recipe, "bf16") is recipe
    with_kv = with_kv_cache(recipe, "fp8")
    assert [type(m) for m in with_kv] == [type(m) for m in recipe]
    last = max(i for i, m in enumerate(recipe) if isinstance(m, QuantizationMixin))
    assert with_kv[last].kv_cache_scheme.type == "float" and with_kv[last].kv_cache_scheme.num_bits == 8
    assert with_kv[last].requires_calibration_data
    unchanged = recipe[last].model_dump(exclude={"kv_cache_scheme", "requires_calibration_data"})
    assert with_kv[last].model_dump(exclude={"kv_cache_scheme", "requires_calibration_data"}) == unchanged
    assert all(a is b for i, (a, b) in enumerate(zip(recipe, with_kv, strict=True)) if i != last)
    per_head = with_kv_cache(recipe, "fp8-head")[last].kv_cache_scheme
    assert (per_head.strategy, per_head.observer) == ("attn_head", "static_minmax")


def test_the_card_size_is_report_arithmetic_and_reuses_every_evaluation(tiny_model, tmp_path):
    from quantflow.pipeline.steps import baseline_key

    def key(**evaluation) -> str:
        spec = small_spec(tiny_model, tmp_path / "o", tmp_path / "c", [{"method": "rtn"}], **evaluation)
        return baseline_key(plan(parse_spec(spec), lambda _: None))

    assert key(card_memory_gb=24) == key(card_memory_gb=80) != key(kv_cache=["bf16", "fp8"])


def test_a_sweeps_combinations_get_twins_and_a_dropped_one_takes_its_twin_along(tiny_model, tmp_path):
    spec = small_spec(tiny_model, tmp_path / "o", tmp_path / "c", [], kv_cache=["bf16", "fp8"])
    spec = parse_spec({**spec, "variants": [], "sweep": {"methods": ["rtn"], "group_sizes": [32, 128]}})
    planned = plan(spec, lambda _: None)
    names = [v.name for v in planned.variants]
    assert names == ["rtn-w4-g32-sym", "rtn-w4-g32-sym-kv-fp8", "baseline-kv-fp8"], names
    assert [d.name for d in planned.dropped] == ["rtn-w4-g128-sym"]
    assert set(planned.kv) == {"rtn-w4-g32-sym-kv-fp8", "baseline-kv-fp8"}
