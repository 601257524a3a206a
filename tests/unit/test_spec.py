"""Run spec: YAML, overrides, and error messages that name the field and the fix."""

from pathlib import Path

import pytest

from quantflow.errors import QuantflowError
from quantflow.spec import AWQVariant, GPTQVariant, RunSpec, apply_overrides, load_spec, parse_spec, slug, variant_for

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_defaults_name_variants_after_methods():
    spec = RunSpec()
    assert [v.name for v in spec.variants] == ["rtn", "awq", "gptq"]
    assert spec.model.trust_remote_code is False


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_specs_are_valid(path):
    from quantflow.sweep import expand

    spec = load_spec(path)
    assert spec.variants or expand(spec)[0]


def test_examples_cover_opt_and_llama():
    names = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert {"opt-125m.yaml", "opt-2.7b.yaml", "llama-3.2-1b.yaml"} <= names


def test_yaml_round_trip(tmp_path):
    import yaml

    spec = RunSpec(variants=[GPTQVariant(group_size=64, actorder=None)])
    file = tmp_path / "spec.yaml"
    file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    assert load_spec(file) == spec


@pytest.mark.parametrize(
    "variant, field, words",
    [
        ({"method": "gptq", "bits": 5}, "variants.0.gptq.bits", "2, 3, 4 or 8"),
        (
            {"method": "gptq", "group_size": 48},
            "variants.0.gptq.group_size",
            "Input should be 8, 16, 32, 64, 128, 256, 512, 1024 or 'auto'",
        ),
        ({"method": "awq", "bits": 3}, "variants.0.awq.bits", "4"),
        ({"method": "fp3"}, "variants.0", "does not match any of the expected tags"),
        ({"method": "rtn", "colour": "red"}, "variants.0.rtn.colour", "Extra inputs are not permitted"),
        ({"method": "rtn", "name": "../../x"}, "variants.0.rtn.name", "should match pattern"),
    ],
)
def test_bad_variant_names_field_and_reason(variant, field, words):
    with pytest.raises(QuantflowError) as info:
        parse_spec({"variants": [variant]}, "test.yaml")
    message = str(info.value)
    assert field in message and words in message and "fix:" in message and "test.yaml" in message


def test_duplicate_and_reserved_names_rejected():
    with pytest.raises(QuantflowError, match="repeated: gptq"):
        parse_spec({"variants": [{"method": "gptq"}, {"method": "gptq"}]})
    with pytest.raises(QuantflowError, match="reserved"):
        parse_spec({"variants": [{"method": "gptq", "name": "baseline"}]})


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(
        QuantflowError, match="rtn, gptq, awq, awq-gptq, autoround, mixed, fp8, int8, bnb-nf4, bnb-fp4, bnb-int8"
    ):
        variant_for("squeeze")
    assert isinstance(parse_spec({"variants": [variant_for("AWQ ")]}).variants[0], AWQVariant)


def test_overrides_apply_and_revalidate():
    spec = apply_overrides(RunSpec(), {"model.source": "facebook/opt-125m", "calibration.num_samples": 16})
    assert spec.model.source == "facebook/opt-125m" and spec.calibration.num_samples == 16
    with pytest.raises(QuantflowError, match="calibration.num_samples"):
        apply_overrides(RunSpec(), {"calibration.num_samples": 0})


def test_spec_file_errors(tmp_path):
    with pytest.raises(QuantflowError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(QuantflowError, match="not valid YAML"):
        load_spec(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(QuantflowError, match="mapping"):
        load_spec(listy)


@pytest.mark.parametrize(
    "text, expected",
    [("facebook/opt-125m", "facebook-opt-125m"), ("../../x", "x"), ("..", "unnamed"), ("A b..c", "a-b.c")],
)
def test_slug_cannot_escape(text, expected):
    assert slug(text) == expected
    assert "/" not in slug(text) and ".." not in slug(text)


def test_gpu_memory_budget_must_be_positive():
    from quantflow.spec import parse_spec

    assert parse_spec({"gpu_memory_gb": 8}).gpu_memory_gb == 8
    with pytest.raises(QuantflowError, match="gpu_memory_gb"):
        parse_spec({"gpu_memory_gb": 0})


def test_out_of_memory_under_a_budget_becomes_the_fix():
    import torch

    from quantflow.infra.resources import over_budget

    with pytest.raises(
        QuantflowError, match="step 'quantize' needed more than the configured gpu_memory_gb of 8 GiB"
    ) as error:
        with over_budget("quantize", 8.0):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "raise gpu_memory_gb" in error.value.fix


def test_overrides_keep_variants_built_in_code():
    """The demo's spec is built from models (methods left at their defaults); the CLI's overrides must not drop them."""
    from quantflow.devtools.demo import demo_spec

    spec = apply_overrides(demo_spec(Path("out")), {"output.dir": "elsewhere"})
    assert [v.method for v in spec.variants] == ["rtn", "awq", "gptq", "bnb-nf4"] and str(
        spec.output.dir
    ) == "elsewhere"


def test_a_model_that_fits_neither_the_gpu_budget_nor_host_memory_is_refused():
    from quantflow.infra.resources import check_fits

    gib = 2**30
    check_fits(14 * gib, 8, 2, 4 * gib)  # 2 x 6.4 GiB on the cards + 4 GiB offloaded
    check_fits(100 * gib, None, 1, 0)  # no budget: the whole card, placement decides
    with pytest.raises(QuantflowError, match=r"weights \(14.0 GiB\) do not fit gpu_memory_gb 4 GiB x 1") as error:
        check_fits(14 * gib, 4, 1, 2 * gib)
    assert "raise gpu_memory_gb" in error.value.fix


@pytest.mark.parametrize("method", ["awq", "awq-gptq"])
def test_awq_grids_llm_compressor_cannot_space_are_refused(method):
    """A 2-point grid with duo scaling divided by zero inside llm-compressor after calibration had run."""
    with pytest.raises(QuantflowError, match="n_grid must be at least 3 with duo_scaling True"):
        parse_spec({"variants": [{"method": method, "n_grid": 2}]})
    with pytest.raises(QuantflowError, match="at least 4 with duo_scaling 'both'"):
        parse_spec({"variants": [{"method": method, "n_grid": 3, "duo_scaling": "both"}]})
    assert parse_spec({"variants": [{"method": method, "n_grid": 2, "duo_scaling": False}]}).variants[0].n_grid == 2


def test_autoround_with_zero_points_is_refused():
    """Its asymmetric artifact measured far worse than RTN's on SmolLM2 (docs/recipes.md)."""
    with pytest.raises(QuantflowError, match="autoround with symmetric: false writes a broken artifact"):
        parse_spec({"variants": [{"method": "autoround", "symmetric": False}]})
    assert parse_spec({"variants": [{"method": "autoround"}]}).variants[0].symmetric
