"""Calibration data as a sweep axis: one variant per (method x source), one cached calibration step per source, the
report's side-by-side table, and a missing source refused at plan time."""

import json
import shutil

import pytest
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools.validation import validate

from flows.quantize import quantflow_run, quantflow_variant
from quantflow import pipeline
from quantflow.errors import QuantflowError
from quantflow.reporting.report import load_report
from quantflow.spec import parse_spec
from quantflow.sweep import expand
from tests.conftest import small_spec

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def test_the_axis_crosses_only_the_methods_that_read_calibration_data():
    spec = parse_spec(
        {
            "sweep": {
                "methods": ["rtn", "gptq", "fp8", "bnb-nf4"],
                "group_sizes": [64],
                "calibrations": [
                    "builtin:pydoc",
                    {"source": "builtin:pydoc", "chat_template": True},
                    "/d/My Chat.jsonl",
                ],
            }
        }
    )
    kept, dropped = expand(spec)
    assert [v.name for v in kept] == [
        "rtn-w4-g64-sym",
        "gptq-w4-g64-sym-cal-pydoc",
        "gptq-w4-g64-sym-cal-pydoc-chat",
        "gptq-w4-g64-sym-cal-my-chat",
        "fp8",
        "bnb-nf4",
    ]
    assert kept[2].calibration.chat_template is True and kept[3].calibration.source == "/d/My Chat.jsonl"
    assert kept[0].calibration is None and dropped == []


def test_two_sources_with_one_label_are_refused():
    with pytest.raises(QuantflowError, match="calibration sources share the label data"):
        parse_spec({"sweep": {"methods": ["gptq"], "calibrations": ["a/data.jsonl", "b/data.txt"]}})


@pytest.mark.parametrize(
    "where, field",
    [("sweep", "sweep.calibrations"), ("variant", "variant gptq: calibration.source")],
)
def test_a_missing_source_is_refused_at_plan_time_writing_nothing(tiny_model, tmp_path, where, field):
    missing = str(tmp_path / "missing.jsonl")
    raw = small_spec(tiny_model, tmp_path / "out", tmp_path / "cache", [{"method": "gptq", "calibration": missing}])
    if where == "sweep":
        raw["sweep"] = {"methods": ["gptq"], "calibrations": ["builtin:pydoc", missing]}
        del raw["variants"]
    with pytest.raises(QuantflowError, match=f"{field} .*missing.jsonl does not exist") as refused:
        pipeline.plan(parse_spec(raw), progress=lambda _: None)
    assert "builtin:pydoc" in refused.value.fix
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def swept(tiny_model, tmp_path_factory):
    """GPTQ over two sources: the default corpus and the same rendered with a chat template (untimed; a user file
    is swept in the Prefect fan-out test)."""
    root = tmp_path_factory.mktemp("calibrations")
    model = shutil.copytree(tiny_model, root / "chat-model")
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    raw = small_spec(model, root / "out", root / "cache", [], speed=None)
    del raw["variants"]
    sources = ["builtin:pydoc", {"source": "builtin:pydoc", "chat_template": True}]
    raw["sweep"] = {"methods": ["gptq"], "group_sizes": [32], "calibrations": sources}
    out = pipeline.run(parse_spec(raw), progress=lambda _: None)
    return load_report(out / "report.json"), out


def test_each_source_is_its_own_calibration_and_the_report_compares_them(swept):
    report, out = swept
    rows = {r.name: r for r in report.rows}
    assert set(rows) == {
        "baseline",
        "gptq-w4-g32-sym-cal-pydoc",
        "gptq-w4-g32-sym-cal-pydoc-chat",
    }
    chat = rows["gptq-w4-g32-sym-cal-pydoc-chat"].calibration
    assert chat.chat_template and chat.own and chat.samples == 8
    calibrations = [s for s in report.steps if s.step == "calibration"]
    assert len({s.key for s in calibrations}) == 2  # the run's set and the chat-rendered one
    pydoc = next(s for s in calibrations if s.variant == "gptq-w4-g32-sym-cal-pydoc")
    assert pydoc.cached  # the same data as the run's own set: one step, read back
    (effect,) = report.calibration_effect
    assert effect.variant == "gptq-w4-g32-sym" and list(effect.by_source) == ["pydoc", "pydoc-chat"]
    perplexities = [cell.perplexity for cell in effect.by_source.values()]
    assert len(set(perplexities)) == 2  # different data, different GPTQ result
    assert all(cell.kl_mean > 0 for cell in effect.by_source.values())
    text = (out / "report.md").read_text()
    assert "## Calibration data" in text
    assert f"| gptq-w4-g32-sym | gptq | {perplexities[0]:.3f} / " in text
    assert report.schema_version == "1.9"


@pytest.mark.parametrize("flow", [quantflow_run, quantflow_variant], ids=lambda flow: flow.name)
def test_the_flows_parameter_schema_takes_a_bare_source_as_yaml_does(flow):
    """Prefect's server checks a run's parameters against the flow's schema before the spec sees them."""
    schema = parameter_schema(flow.fn).model_dump()
    spec = {"variants": [{"method": "gptq", "calibration": "a.jsonl"}], "sweep": {"methods": ["awq"]}}
    spec["sweep"]["calibrations"] = ["builtin:pydoc", {"source": "builtin:pydoc", "chat_template": True}]
    validate({"spec": spec}, schema, raise_on_error=True, ignore_required=True)
