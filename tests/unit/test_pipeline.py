"""The whole core pipeline on a tiny model: artifacts, report, cache hits, clean failures."""

import time

import pytest

from quantflow import pipeline
from quantflow.errors import QuantflowError
from quantflow.evaluation.evaluate import EvalRecord
from quantflow.evaluation.runtime import Protocol, Subject, evaluate_subject
from quantflow.infra.cache import StepCache
from quantflow.infra.resources import Resources
from quantflow.infra.steps import cached
from quantflow.pipeline import steps
from quantflow.reporting.report import load_report
from quantflow.spec import parse_spec
from tests.conftest import read_json, small_spec

VARIANTS = [
    {"method": "rtn", "group_size": 32},
    {"method": "gptq", "group_size": 32},
    {"method": "awq", "group_size": 32, "n_grid": 4},
    {"method": "bnb-int8"},
]


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    spec = parse_spec(small_spec(tiny_model, root / "out", root / "cache", VARIANTS))
    return spec, pipeline.run(spec, progress=lambda _: None)


def test_outputs_and_report(finished):
    spec, out = finished
    report = load_report(out / "report.json")
    assert [r.name for r in report.rows] == ["baseline", "rtn", "gptq", "awq", "bnb-int8"]
    for name in ("rtn", "gptq", "awq"):
        folder = out / name
        assert (
            (folder / "model.safetensors").is_file()
            and (folder / "README.md").is_file()
            and (folder / "tokenizer.json").is_file()
        )
        assert read_json(folder / "config.json")["quantization_config"]["quant_method"] == "compressed-tensors"
        assert not (folder / "result.json").exists()
    assert not (out / "bnb-int8").exists()  # load-time variant, save not asked
    rows = {r.name: r for r in report.rows}
    assert rows["baseline"].kl_mean is None and rows["baseline"].ppl_delta_pct == 0
    assert all(rows[n].kl_mean > 0 for n in ("rtn", "gptq", "awq", "bnb-int8"))
    assert (
        rows["rtn"].size_ratio < 0.6
        and rows["gptq"].quantized_layers == 14
        and rows["gptq"].skipped_layers == ["lm_head"]
    )
    assert rows["bnb-int8"].size_kind == "in_memory_weights"
    for row in rows.values():  # where each evaluation's time went, phase by phase
        assert set(row.evaluate_phases) == {"load", "quality", "speed", "samples"}, row.evaluate_phases
        assert row.evaluate_phases["load"] > 0 and row.evaluate_phases["quality"] > 0
    # bits per weight over the quantized Linears, from first principles: W4 plus a bf16 scale per 32 weights, plus a
    # 4-bit zero point per 32 for the asymmetric AWQ; LLM.int8 adds an fp32 scale per output row (512 rows per
    # 36,864 weights in each layer of this model); the baseline is bf16
    bits = {name: row.effective_bits for name, row in rows.items()}
    assert bits == {"baseline": 16.0, "rtn": 4.5, "gptq": 4.5, "awq": 4.625, "bnb-int8": 8.444}, bits
    assert report.pareto and set(report.pareto) <= set(rows)
    assert report.environment["packages"]["llmcompressor"] and report.units["kl_mean"].startswith("nats")
    assert (out / "quality_vs_size.png").stat().st_size > 1000 and (out / "throughput_vs_memory.png").is_file()
    markdown = (out / "report.md").read_text()
    assert "| gptq | gptq |" in markdown and "Greedy samples" in markdown
    # every row timed at each batch and at one long prompt (the spec's 16 tokens here), each in a column of its own
    assert all([s["batch"] for s in r.speed] == [1, 2] and r.prefill["prompt_len"] == 16 for r in report.rows)
    assert "| prefill tok/s 16 tok |" in markdown


def test_rerun_is_all_cache_hits(finished):
    spec, out = finished
    first = load_report(out / "report.json").steps
    expected = [("calibration", "baseline"), ("evaluate", "baseline")] + [
        (step, v["method"])
        for v in VARIANTS
        for step in (("quantize", "evaluate") if v["method"] != "bnb-int8" else ("evaluate",))
    ]
    assert [(s.step, s.variant) for s in first] == expected and not any(s.cached for s in first)
    again = pipeline.run(
        spec.model_copy(update={"output": spec.output.model_copy(update={"dir": out.parent / "again"})}),
        progress=lambda _: None,
    )
    second = load_report(again / "report.json").steps
    assert [(s.step, s.variant, s.key) for s in second] == [(s.step, s.variant, s.key) for s in first]
    assert all(s.cached for s in second), [s for s in second if not s.cached]


def test_rerun_into_the_same_folder_keeps_the_published_weights_and_rewrites_the_card(finished):
    """A re-run must not copy every artifact again (3.7 GB each at 7B); a changed or damaged copy is replaced."""
    import os

    spec, out = finished
    weights = {name: out / name / "model.safetensors" for name in ("rtn", "gptq", "awq")}
    inodes = {name: path.stat().st_ino for name, path in weights.items()}
    (out / "rtn" / "README.md").write_text("stale")
    keys = {s.variant: s.key for s in load_report(out / "report.json").steps if s.step == "quantize"}
    assert pipeline.run(spec, progress=lambda _: None) == out
    assert {name: path.stat().st_ino for name, path in weights.items()} == inodes  # not copied again
    assert (out / "rtn" / "README.md").read_text().startswith("---")  # the model card is written anew
    (out / "gptq" / "tokenizer.json").unlink()  # a damaged copy
    os.utime(spec.output.cache_dir / "quantize" / keys["rtn"] / "model.safetensors")  # a cache entry written again
    pipeline.run(spec, progress=lambda _: None)
    changed = {name for name, path in weights.items() if path.stat().st_ino != inodes[name]}
    assert changed == {"rtn", "gptq"} and (out / "gptq" / "tokenizer.json").is_file(), changed
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".old-*"))


def test_changing_one_variant_reruns_only_that_branch(finished):
    spec, _ = finished
    changed = parse_spec(
        {
            **spec.model_dump(mode="json"),
            "variants": [*VARIANTS[:1], {"method": "gptq", "group_size": 32, "dampening_frac": 0.05}],
        }
    )
    the_plan = pipeline.plan(changed, progress=lambda _: None)
    calibration, baseline = steps.calibrate(the_plan), steps.evaluate_baseline(the_plan)
    rtn, gptq = (
        steps.evaluate(the_plan, v, steps.quantize(the_plan, v, calibration.record), baseline) for v in changed.variants
    )
    assert calibration.step.cached and baseline.step.cached and rtn.cached and not gptq.cached


def test_gathering_a_result_no_worker_produced_fails_instead_of_recomputing(finished):
    """A fan-out parent reads its children's results; a missing one means an unshared cache, not work to redo."""
    spec, _ = finished
    changed = parse_spec({**spec.model_dump(mode="json"), "variants": [{"method": "rtn", "group_size": 16}]})
    the_plan = pipeline.plan(changed, progress=lambda _: None)
    with pytest.raises(QuantflowError, match="share") as error:
        steps.gather(the_plan)  # calibration and baseline come from the fixture's run; rtn-g16 was never computed
    assert "output.cache_dir" in error.value.fix
    assert not list((the_plan.cache.root / "quantize").glob(".tmp-*"))


def test_saved_artifact_reproduces_its_perplexity_in_a_fresh_process(finished, tmp_path):
    spec, out = finished
    report = load_report(out / "report.json")
    row = next(r for r in report.rows if r.name == "gptq")
    record, step = cached(
        StepCache(tmp_path),
        "evaluate",
        "gptq",
        "fresh",
        EvalRecord,
        evaluate_subject,
        None,
        subject=Subject(name="gptq", model_path=str(out / "gptq")),
        protocol=Protocol(calibration=spec.calibration, evaluation=spec.evaluation),
        resources=Resources(device="cpu"),
        baseline=None,
    )
    assert not step.cached and record.perplexity == pytest.approx(row.perplexity, rel=1e-6)


def test_failed_quantization_leaves_nothing_behind(tiny_model, tmp_path, monkeypatch):
    spec = parse_spec(
        small_spec(tiny_model, tmp_path / "out", tmp_path / "cache", [{"method": "rtn", "group_size": 32}])
    )
    the_plan = pipeline.plan(spec, progress=lambda _: None)
    calibration = steps.calibrate(the_plan, isolate=False)

    def explode(**_):
        raise RuntimeError("killed mid-quantization")

    monkeypatch.setattr("llmcompressor.oneshot", explode)
    with pytest.raises(RuntimeError, match="killed"):
        steps.quantize(the_plan, spec.variants[0], calibration.record, isolate=False)
    assert list((tmp_path / "cache" / "quantize").iterdir()) == []
    assert not (tmp_path / "out").exists()


def test_bad_scheme_fails_at_plan_time(tiny_model_96, tmp_path):
    spec = parse_spec(
        small_spec(tiny_model_96, tmp_path / "out", tmp_path / "cache", [{"method": "gptq", "group_size": 64}])
    )
    with pytest.raises(QuantflowError, match="group_size 64 does not divide"):
        pipeline.plan(spec, progress=lambda _: None)
    assert not (tmp_path / "cache" / "calibration").exists()


def test_cuda_on_a_cpu_machine_is_refused(tiny_model, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    spec = parse_spec({**small_spec(tiny_model, tmp_path / "o", tmp_path / "c", VARIANTS[:1]), "device": "cuda"})
    with pytest.raises(QuantflowError, match="no CUDA device"):
        pipeline.plan(spec, progress=lambda _: None)


def sleepy_work(out, final, seconds):
    """A step that hangs (module-level so a spawned child can import it)."""
    import time as _time

    _time.sleep(seconds)


def test_step_timeout_kills_the_child_process(tmp_path):
    from quantflow.inputs.calibration import CalibrationRecord

    start = time.perf_counter()
    with pytest.raises(QuantflowError, match="ran longer than its timeout of 3 s and was killed"):
        cached(StepCache(tmp_path), "calibration", "baseline", "k", CalibrationRecord, sleepy_work, 3, seconds=120)
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "calibration" / "k").exists()


def refusing_work(out, final):
    raise QuantflowError("step needed more than the configured gpu_memory_gb of 8 GiB", "raise gpu_memory_gb")


def test_a_child_steps_error_reaches_the_caller_with_its_fix(tmp_path):
    from quantflow.inputs.calibration import CalibrationRecord

    with pytest.raises(QuantflowError, match="gpu_memory_gb of 8 GiB") as error:
        cached(StepCache(tmp_path), "calibration", "baseline", "k", CalibrationRecord, refusing_work)
    assert error.value.fix == "raise gpu_memory_gb"
    assert not (tmp_path / "calibration" / "k").exists()


def test_local_engine_refuses_a_prefect_credentials_block(tiny_model, tmp_path):
    raw = small_spec(tiny_model, tmp_path / "out", tmp_path / "cache", [{"method": "rtn", "group_size": 32}])
    raw["output"]["store"] = {"uri": "s3://team-bucket/models", "credentials_block": "aws-credentials/team"}
    with pytest.raises(QuantflowError, match="read only when the run executes under Prefect"):
        pipeline.run(parse_spec(raw), progress=lambda _: None)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    raw["output"]["store"]["credentials_block"] = "team-keys"
    with pytest.raises(QuantflowError, match="credentials_block"):
        parse_spec(raw)


def test_an_unchanged_replan_reads_the_shape_checks_back(tiny_model, tmp_path, monkeypatch):
    """The shape checks are remembered by model and variants; the machine's checks still run on every plan."""
    from quantflow.pipeline import planning

    variants = [{"method": "rtn", "group_size": 32}, {"method": "gptq", "group_size": "auto"}, {"method": "fp8"}]
    spec = parse_spec(small_spec(tiny_model, tmp_path / "out", tmp_path / "cache", variants))
    first = pipeline.plan(spec, progress=lambda _: None)
    built = []
    original = planning.weightless_model
    monkeypatch.setattr(planning, "weightless_model", lambda *a: built.append(a) or original(*a))
    again = pipeline.plan(spec, progress=lambda _: None)
    assert again.schemes == first.schemes and again.schemes["gptq"].group_size == 64 and built == []
    fp8_only = spec.model_copy(update={"variants": spec.variants[2:]})
    pipeline.plan(fp8_only, progress=lambda _: None)
    demanding = fp8_only.model_copy(update={"evaluation": spec.evaluation.model_copy(update={"kernels": "fp8"})})
    with pytest.raises(QuantflowError, match="needs FP8 matmuls"):  # a machine check: run again on a remembered plan
        pipeline.plan(demanding, progress=lambda _: None)
    changed = parse_spec(small_spec(tiny_model, tmp_path / "out", tmp_path / "cache", [variants[0]]))
    pipeline.plan(changed, progress=lambda _: None)
    assert len(built) == 2  # other variants (fp8 alone, then rtn alone): checked again


def test_a_refused_plan_remembers_no_shape_checks(tiny_model_96, tmp_path):
    raw = small_spec(tiny_model_96, tmp_path / "out", tmp_path / "cache", [{"method": "rtn", "group_size": 64}])
    with pytest.raises(QuantflowError, match="64"):
        pipeline.plan(parse_spec(raw), progress=lambda _: None)
    assert not (tmp_path / "cache" / "plan").exists()
