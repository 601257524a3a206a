"""The quantflow flow on a real Prefect server: deploy from prefect.yaml, trigger as the UI does,
a real process worker runs it, artifacts appear, and a repeat run is served from the cache."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from deployments.local import stop_group
from quantflow.pipeline import run as run_pipeline
from quantflow.spec import parse_spec
from tests.conftest import docstring_corpus, read_json, small_spec
from tests.integration.conftest import BIN, form_parameters, run_artifacts, wait_final

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]


def prefect(env, *args, timeout=180):
    result = subprocess.run(
        [str(BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def prefect_module(env, module: str) -> str:
    result = subprocess.run(
        [str(BIN / "python"), "-m", module], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def deployed(prefect_server):
    return deploy(prefect_server)


POOLS = {
    "quantflow-gpu": "process",
    "quantflow-local": "process",
    "quantflow-docker": "docker",
    "quantflow-k8s": "kubernetes",
}


def deploy(server_env: dict, names: tuple[str, ...] = (), pools: tuple[str, ...] = tuple(POOLS)) -> dict:
    """The work pools, every deployment of prefect.yaml and the automations on the server; returns the env. With
    ``names``, only those deployments, on the ``pools`` named (each `prefect` call costs seconds)."""
    env = {**server_env, "QUANTFLOW_ROOT": str(ROOT)}
    for pool in pools:
        kind = POOLS[pool]
        template = ["--base-job-template", f"deployments/pools/{kind}-gpu.json"] if pool != "quantflow-local" else []
        prefect(env, "work-pool", "create", pool, "--type", kind, "--overwrite", *template)
    if names:
        output = prefect(env, "--no-prompt", "deploy", *[arg for name in names for arg in ("--name", name)])
        assert all(f"/{name}" in output for name in names), output
        return env
    output = prefect(env, "--no-prompt", "deploy", "--all")
    assert "created" in (made := prefect_module(env, "deployments.automations")) or "already present" in made
    assert "quantflow/nightly" in output and "quantflow/on-demand" in output and "quantflow/local" in output
    return env


def start_worker(env: dict, pool: str, log: Path) -> subprocess.Popen:
    """A real `prefect worker start` taking one flow run at a time, in its own process group."""
    return subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--limit", "1"],
        env=env,
        cwd=ROOT,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.fixture
def worker(deployed, tmp_path):
    process = start_worker(deployed, "quantflow-local", tmp_path / "worker.log")
    yield process
    stop_group(process, signal.SIGKILL, 10)


async def trigger(spec: dict, deployment: str = "quantflow/local"):
    """Create a flow run of a deployment through the API, as the UI's Run form does with the spec typed in."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        found = await client.read_deployment_by_name(deployment)
        parameters = {**form_parameters(found), "spec": spec}
        return await client.create_flow_run_from_deployment(found.id, parameters=parameters)


async def trigger_and_wait(spec: dict, deployment: str = "quantflow/local", timeout: float = 600):
    start = time.monotonic()
    run = await wait_final((await trigger(spec, deployment)).id, timeout)
    return run, time.monotonic() - start


async def child_runs(parent_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    async with get_client() as client:
        return await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
        )


async def task_graph(flow_run_id) -> tuple[dict, set]:
    """The run's task runs by name and the edges the UI draws between them (upstream name, downstream name)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    names = {run.id: run.name for run in runs}
    edges = {
        (names[upstream.id], names[run.id])
        for run in runs
        for inputs in run.task_inputs.values()
        for upstream in inputs
        if getattr(upstream, "id", None) in names
    }
    return {names[run.id]: run for run in runs}, edges


def test_deployment_ui_trigger_worker_artifacts_and_cache(deployed, worker, tiny_model, tmp_path, monkeypatch):
    for key, value in deployed.items():
        monkeypatch.setenv(key, value)
    variants = [
        {"method": "rtn", "group_size": 32},
        {"method": "bnb-int8"},
        {"method": "mixed", "group_size": 32, "target_bits": 5.5},
    ]
    spec = small_spec(tiny_model, tmp_path / "out", tmp_path / "cache", variants)
    first, first_seconds = asyncio.run(trigger_and_wait(spec))
    assert first.state.is_completed(), first.state
    assert first.name == f"{tiny_model.name}: rtn, bnb-int8, mixed"
    computed = read_json(tmp_path / "out" / "report.json")["steps"]
    # calibration, baseline, rtn x2, bnb-int8, mixed x3 (sensitivity, quantize, evaluate)
    assert len(computed) == 8 and not any(step["cached"] for step in computed)
    assert (tmp_path / "out" / "rtn" / "model.safetensors").is_file() and (tmp_path / "out" / "report.json").is_file()
    tasks, edges = asyncio.run(task_graph(first.id))
    assert set(tasks) == {  # named for what they do: no random suffix
        "plan",
        "calibration",
        "baseline",
        "quantize rtn",
        "evaluate rtn",
        "evaluate bnb-int8",
        "sensitivity mixed",
        "quantize mixed",
        "evaluate mixed",
        "report",
        "progress",  # the run's progress bar, made in a task so that the UI lists it below the comparison and report
    }
    assert edges == {  # what each task consumes; the plan feeds only calibration and baseline
        ("plan", "calibration"),
        ("plan", "baseline"),
        ("calibration", "quantize rtn"),
        ("quantize rtn", "evaluate rtn"),
        ("baseline", "evaluate rtn"),
        ("baseline", "evaluate bnb-int8"),
        ("calibration", "report"),
        ("baseline", "report"),
        ("evaluate rtn", "report"),
        ("evaluate bnb-int8", "report"),
        ("calibration", "sensitivity mixed"),
        ("calibration", "quantize mixed"),
        ("sensitivity mixed", "quantize mixed"),
        ("quantize mixed", "evaluate mixed"),
        ("baseline", "evaluate mixed"),
        ("evaluate mixed", "report"),
    }, edges
    calibration, baseline = tasks["calibration"], tasks["baseline"]
    assert calibration.start_time < baseline.end_time and baseline.start_time < calibration.end_time, "no overlap"
    artifacts = {a.key: a for a in asyncio.run(run_artifacts(first.id)) if a.key}
    table = artifacts["quantflow-comparison"]
    assert table.type == "table" and "Best: " in table.description
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert (
        [row["Variant"].split(" ")[0] for row in rows]
        == [
            "baseline",
            "rtn",
            "bnb-int8",
            "mixed",
        ]
        and rows[1]["Δ perplexity"].startswith(("+", "-"))
        and rows[1]["Δ perplexity"].endswith("%")
    )
    report = artifacts["quantflow-report"].data
    assert (
        "quantflow report" in report and report.count("](data:image/png;base64,") == 4
    )  # both quality plots, throughput, and the mixed variant's precision map
    assert "```text" in report and "\\n" not in report  # samples are text blocks, not quoted one-liners
    assert artifacts["quantflow-progress"].type == "progress" and artifacts["quantflow-progress"].data == 100
    second, second_seconds = asyncio.run(trigger_and_wait(spec))
    assert second.state.is_completed()
    again = read_json(tmp_path / "out" / "report.json")["steps"]
    assert [s["key"] for s in again] == [s["key"] for s in computed] and all(s["cached"] for s in again), again
    print(f"re-run through the deployment: {second_seconds:.1f} s vs {first_seconds:.1f} s (a figure, not a check)")


@pytest.mark.parametrize(
    "variant, field",
    [('{"method": "gptq", "bits": 5}', "bits"), ('{"method": "rtn", "group_size": 100}', "group_size")],
)
def test_invalid_spec_is_refused_at_submission(deployed, monkeypatch, variant, field):
    """What the UI form submits is checked against the spec's schema before any run is created."""
    for key, value in deployed.items():
        monkeypatch.setenv(key, value)
    result = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "quantflow/local", "--param", f'spec={{"variants": [{variant}]}}'],
        env=deployed,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert field in (result.stdout + result.stderr) and "Created flow run" not in result.stdout


SWEEP = {  # 3 variants run; group 128 divides only down_proj's 128 inputs (dropped at plan), AWQ is W4 only
    "methods": ["rtn", "awq"],
    "bits": [4, 8],
    "group_sizes": [32, 128],
    "symmetric": [False],
    "settings": {"awq": {"n_grid": 3}},
}


def test_a_sweep_fans_out_over_two_gpu_workers(deployed, worker, tiny_model, tmp_path, monkeypatch):
    """Each variant of the grid is its own flow run; two workers on their own cards take them side by side."""
    for key, value in deployed.items():
        monkeypatch.setenv(key, value)
    cards = ("5", "7")  # each worker's own card, as docs/operations.md starts them (no GPU is needed to see where)
    gpu_workers = [
        start_worker({**deployed, "CUDA_VISIBLE_DEVICES": card}, "quantflow-gpu", tmp_path / f"gpu-worker-{card}.log")
        for card in cards
    ]
    try:
        sources = ["builtin:pydoc", str(docstring_corpus(tmp_path / "doc.jsonl"))]  # objects, as the UI's form sends
        sweep = {**SWEEP, "calibrations": [{"source": source} for source in sources]}
        spec = {**small_spec(tiny_model, tmp_path / "out", tmp_path / "cache", [], speed=None), "sweep": sweep}
        del spec["variants"]
        parent, _ = asyncio.run(trigger_and_wait(spec, "quantflow/fan-out"))
    finally:
        for process in gpu_workers:
            stop_group(process, signal.SIGKILL, 10)
    assert parent.state.is_completed(), parent.state
    report = read_json(tmp_path / "out" / "report.json")
    ran = {row["name"] for row in report["rows"]} - {"baseline"}
    awq = {"awq-w4-g32-asym-n_grid3-cal-pydoc", "awq-w4-g32-asym-n_grid3-cal-doc"}  # AWQ once per source, RTN once
    assert ran == {"rtn-w4-g32-asym", "rtn-w8-g32-asym", *awq}
    (effect,) = report["calibration_effect"]
    assert {cell["row"] for cell in effect["by_source"].values()} == awq
    dropped = {d["name"]: d["reason"] for d in report["dropped"]}
    assert "does not divide the input width" in dropped["rtn-w4-g128-asym"] and len(dropped) == 2 + 2 + 2
    assert "bits: Input should be 4" in dropped["awq-w8-g32-asym-n_grid3"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Sweep combinations left out" in markdown and "**rtn-w8-g128-asym**: variant" in markdown
    assert report["pareto"] and set(report["pareto"]) <= ran | {"baseline"}
    children = [run for run in asyncio.run(child_runs(parent.id)) if run.parameters["variant"]]
    assert {run.parameters["variant"] for run in children} == ran and all(r.state.is_completed() for r in children)
    devices = {row["name"]: row["visible_devices"] for row in report["rows"] if row["name"] != "baseline"}
    assert set(devices.values()) == set(cards), devices  # both workers took variants, each on its own card
    assert any(
        a.start_time < b.end_time and b.start_time < a.end_time for a in children for b in children if a is not b
    ), "no two variant flow runs overlapped"
    assert len({run.infrastructure_pid for run in children}) == len(children)


def finished_steps(cache: Path) -> dict[str, float]:
    return {str(path.relative_to(cache)): path.stat().st_mtime_ns for path in cache.glob("*/*/result.json")}


def kill_run_and_worker(worker_process: subprocess.Popen, infrastructure_pid: str | None) -> None:
    """What a host crash does: the worker, the flow-run process and its step process all die at once."""
    if infrastructure_pid:
        pid = int(str(infrastructure_pid).split(":")[-1])
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    stop_group(worker_process, signal.SIGKILL, 10)


def test_killed_worker_restarts_and_resumes_without_redoing_finished_steps(deployed, tiny_model, tmp_path, monkeypatch):
    for key, value in deployed.items():
        monkeypatch.setenv(key, value)
    cache = tmp_path / "cache"
    variants = [{"method": "rtn", "group_size": 32}, {"method": "gptq", "group_size": 32}]
    spec = small_spec(tiny_model, tmp_path / "out", cache, variants)
    first_worker = start_worker(deployed, "quantflow-local", tmp_path / "worker-1.log")
    run = asyncio.run(trigger(spec))
    deadline = time.monotonic() + 300
    while (
        not list((cache / "quantize").glob(".tmp-*")) or len(finished_steps(cache)) < 4
    ):  # model, calibration, baseline, rtn done; gptq started
        assert time.monotonic() < deadline, f"gptq never started; finished: {finished_steps(cache)}"
        time.sleep(0.2)
    killed_run = asyncio.run(read_run(run.id))
    kill_run_and_worker(first_worker, killed_run.infrastructure_pid)
    before = finished_steps(cache)
    assert not (tmp_path / "out").exists(), "a killed run must not leave variant folders"
    second_worker = start_worker(deployed, "quantflow-local", tmp_path / "worker-2.log")
    try:
        resumed, _ = asyncio.run(trigger_and_wait(spec))
    finally:
        stop_group(second_worker, signal.SIGKILL, 10)
    assert resumed.state.is_completed(), resumed.state
    steps = read_json(tmp_path / "out" / "report.json")["steps"]
    did = {(s["step"], s["variant"]): s["cached"] for s in steps}
    # rtn's evaluation runs beside gptq's quantization: it may or may not have finished when the host died
    rtn_key = next(s["key"] for s in steps if (s["step"], s["variant"]) == ("evaluate", "rtn"))
    rtn_evaluated = f"evaluate/{rtn_key}/result.json" in before
    assert did == {
        ("calibration", "baseline"): True,
        ("evaluate", "baseline"): True,
        ("quantize", "rtn"): True,
        ("evaluate", "rtn"): rtn_evaluated,
        ("quantize", "gptq"): False,
        ("evaluate", "gptq"): False,
    }, did
    assert {s["step"] + "/" + s["key"] + "/result.json" for s in steps if s["cached"]} <= set(before), (
        "cached = finished"
    )
    assert len(finished_steps(cache)) == len(before) + 2 + (not rtn_evaluated)  # gptq's two steps, rtn's evaluation
    assert not list((cache / "quantize").glob(".tmp-*")), (
        "the killed step's scratch folder should be removed by the resumed run"
    )
    # an uninterrupted run to compare with, made while the automation's heartbeat timeout runs out
    clean = run_pipeline(
        parse_spec(small_spec(tiny_model, tmp_path / "clean-out", tmp_path / "clean-cache", variants)),
        progress=lambda _: None,
    )
    assert comparable(read_json(tmp_path / "out" / "report.json")) == comparable(read_json(clean / "report.json"))
    zombie = asyncio.run(wait_final(run.id, timeout=240))  # the automation notices the missing heartbeats
    assert zombie.state.is_crashed(), zombie.state


def comparable(report: dict) -> list[tuple]:
    """The parts of a report that must not depend on how the run was scheduled (timings may)."""
    return [
        (row["name"], row["perplexity"], row["kl_mean"], row["size_mb"], row["quantized_layers"])
        for row in report["rows"]
    ] + [report["generations"]]


async def read_run(run_id):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_flow_run(run_id)
