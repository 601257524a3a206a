"""The sweep grid: expansion into named variants, schema and shape drops with reasons, the cap, empty results."""

import pytest

from quantflow import pipeline
from quantflow.errors import QuantflowError
from quantflow.spec import parse_spec
from quantflow.sweep import expand
from tests.conftest import make_model, small_spec


def test_each_axis_applies_only_to_the_methods_that_have_it():
    spec = parse_spec(
        {
            "sweep": {
                "methods": ["gptq", "awq", "fp8", "bnb-nf4"],
                "bits": [4, 8],
                "group_sizes": [64, None],
                "symmetric": [True, False],
                "settings": {"gptq": {"dampening_frac": [0.01, 0.05]}, "awq": {"n_grid": 10}},
            }
        }
    )
    assert spec.variants == []  # a sweep alone does not add the default variants
    kept, dropped = expand(spec)
    names = [v.name for v in kept]
    assert len([n for n in names if n.startswith("gptq-")]) == 2 * 2 * 2 * 2
    assert "gptq-w8-ch-asym-dampening_frac0.05" in names and "awq-w4-g64-sym-n_grid10" in names
    assert names.count("fp8") == 1 and names.count("bnb-nf4") == 1  # no bits/group/symmetry axes: one variant each
    assert {d.name for d in dropped} == {f"awq-w8-{g}-{s}-n_grid10" for g in ("g64", "ch") for s in ("sym", "asym")}
    assert all("the awq variant refuses it (bits: Input should be 4)" == d.reason for d in dropped)
    gptq = next(v for v in kept if v.name == "gptq-w8-ch-asym-dampening_frac0.05")
    assert (gptq.bits, gptq.group_size, gptq.symmetric, gptq.dampening_frac) == (8, None, False, 0.05)


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"methods": ["rtn", "gptq"], "bits": [2, 3, 4, 8], "group_sizes": [32, 64, 128]}, "expands to 24 variants"),
        ({"methods": ["fp9"]}, "sweep.methods.0"),
        ({"methods": ["rtn"], "max_variants": 0}, "sweep.max_variants"),
    ],
)
def test_bad_grids_get_one_clear_error(sweep, message):
    with pytest.raises(QuantflowError, match=message) as error:
        parse_spec({"sweep": {"max_variants": 16, **sweep}})
    assert "\n" in str(error.value) and "Traceback" not in str(error.value)


def test_a_listed_variant_may_not_take_a_swept_name():
    with pytest.raises(QuantflowError, match="rtn-w4-g64-sym collide"):
        parse_spec(
            {
                "variants": [{"method": "rtn", "name": "rtn-w4-g64-sym"}],
                "sweep": {"methods": ["rtn"], "group_sizes": [64]},
            }
        )


def test_plan_drops_what_the_model_cannot_take_and_fails_when_nothing_is_left(tmp_path):
    model = make_model(tmp_path / "model")  # 64-wide layers (down_proj 128)

    def plan(sweep):
        raw = {**small_spec(model, tmp_path / "out", tmp_path / "cache", []), "sweep": sweep}
        del raw["variants"]
        return pipeline.plan(parse_spec(raw), progress=lambda _: None)

    planned = plan({"methods": ["rtn", "fp8"], "group_sizes": [32, 128]})
    assert [v.name for v in planned.variants] == ["rtn-w4-g32-sym", "fp8"]
    assert [d.name for d in planned.dropped] == ["rtn-w4-g128-sym"]
    assert "group_size 128 does not divide the input width of 12 layers" in planned.dropped[0].reason
    assert planned.variant("fp8").method == "fp8"
    with pytest.raises(QuantflowError, match="no combination of the sweep fits this model.*rtn-w4-g128-sym"):
        plan({"methods": ["rtn", "gptq"], "group_sizes": [128, 256]})
    assert not (tmp_path / "out").exists()
