"""lm-evaluation-harness tasks: checked at plan time, scored on every variant, equal to a direct lm-eval run."""

import json
import sys
from pathlib import Path

import pytest

from quantflow import pipeline
from quantflow.errors import QuantflowError
from quantflow.reporting.report import load_report
from quantflow.spec import CalibrationSpec, EvaluationSpec, LmEvalSpec, parse_spec
from tests.conftest import small_spec

TASK = "pydoc_next_words"


def write_task(folder: Path, docs: int = 12) -> Path:
    """A multiple-choice task over local JSONL (no hub): which 4 words continue a held-out pydoc passage."""
    from quantflow.inputs.corpus import evaluation_documents

    texts = [t.split() for t in evaluation_documents(CalibrationSpec(), EvaluationSpec())[: docs + 3]]
    rows = []
    for i in range(docs):
        choices = [" ".join(texts[(i + k) % len(texts)][12:16]) for k in range(4)]
        label = i % 4
        choices[0], choices[label] = choices[label], choices[0]
        rows.append({"context": " ".join(texts[i][:12]), "choices": choices, "label": label})
    folder.mkdir(parents=True)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: "
        "'{{label}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("lm-eval") / "tasks")


def test_unknown_task_fails_at_plan_time(tiny_model, tmp_path, task_dir):
    raw = small_spec(
        tiny_model,
        tmp_path / "out",
        tmp_path / "cache",
        [{"method": "rtn", "group_size": 32}],
        lm_eval={"tasks": ["no_such_task"], "include_path": str(task_dir)},
    )
    with pytest.raises(QuantflowError, match="unknown lm-eval task") as error:
        pipeline.plan(parse_spec(raw), progress=lambda _: None)
    assert "include_path" in error.value.fix
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_unloadable_task_data_fails_at_plan_time_with_the_offline_fix(tiny_model, tmp_path, task_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "broken.yaml").write_text(
        (task_dir / f"{TASK}.yaml")
        .read_text()
        .replace(f"task: {TASK}", "task: broken_task")
        .replace(str(task_dir / "data.jsonl"), str(tmp_path / "missing.jsonl"))
    )
    raw = small_spec(
        tiny_model,
        tmp_path / "out",
        tmp_path / "cache",
        [{"method": "rtn", "group_size": 32}],
        lm_eval={"tasks": ["broken_task"], "include_path": str(broken)},
    )
    with pytest.raises(QuantflowError, match="could not load the data of broken_task") as error:
        pipeline.plan(parse_spec(raw), progress=lambda _: None)
    assert "local files" in error.value.fix


def test_missing_lm_eval_package_names_the_extra(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    raw = small_spec(
        tiny_model,
        tmp_path / "out",
        tmp_path / "cache",
        [{"method": "rtn", "group_size": 32}],
        lm_eval={"tasks": ["x"]},
    )
    with pytest.raises(QuantflowError, match="needs the lm-eval package") as error:
        pipeline.plan(parse_spec(raw), progress=lambda _: None)
    assert "quantflow[lm-eval]" in error.value.fix


def test_every_variant_is_scored_and_the_baseline_equals_a_direct_lm_eval_run(tiny_model, tmp_path, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    spec = LmEvalSpec(tasks=[TASK], include_path=task_dir, batch_size=4)
    raw = small_spec(
        tiny_model,
        tmp_path / "out",
        tmp_path / "cache",
        [{"method": "rtn", "group_size": 32, "bits": 2}],
        lm_eval=spec.model_dump(mode="json"),
    )
    out = pipeline.run(parse_spec(raw), progress=lambda _: None)
    rows = {r.name: r for r in load_report(out / "report.json").rows}
    for row in rows.values():
        scores = row.lm_eval[TASK]
        assert 0 <= scores["acc"] <= 1 and 0 <= scores["acc_norm"] <= 1 and scores["acc_stderr"] > 0
    direct = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tiny_model), "dtype": "float32", "device": "cpu"},
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_dir)),
        batch_size=4,
    )
    assert rows["baseline"].lm_eval[TASK]["acc"] == pytest.approx(direct["results"][TASK]["acc,none"], abs=1e-6)
    assert rows["baseline"].lm_eval[TASK]["acc_norm"] == pytest.approx(
        direct["results"][TASK]["acc_norm,none"], abs=1e-6
    )
    assert f"{TASK} (acc_norm)" in (out / "report.md").read_text()
