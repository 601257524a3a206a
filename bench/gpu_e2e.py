"""The deployed flow end to end on a GPU machine: server, GPU worker, deployment triggered as the UI does.

One command, no network (wheels brought in advance, see docs/benchmarks.md):

    python bench/gpu_e2e.py --shape 1.1b --methods rtn,awq,gptq --store --out $OUT/e2e-1.1b.json

It builds a random-weight Llama of a real shape, starts a Prefect server (SQLite) and one process
worker on the `quantflow-gpu` pool pinned to card 0, deploys `prefect.yaml`, creates a run of
`quantflow/on-demand` through the API (what the UI's Run button does), waits for it, then triggers the
same spec again. It writes per-stage wall times (from the Prefect task runs), GPU time (the GPU steps'
own seconds), compile time per variant, peak GPU memory, the run's orchestration overhead and the
re-run's cost, with the report rows. ``--store`` starts a SeaweedFS server (the ``weed`` binary on PATH)
and uploads every artifact to it from the worker; the upload tasks' seconds are reported apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
from bench.models import SHAPES, build_baseline  # noqa: E402
from deployments.local import start_server, stop_group, stop_server  # noqa: E402

GPU_STEPS = ("quantize", "evaluate")  # calibration tokenizes on the CPU


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prefect(env: dict, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


async def trigger(spec: dict):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        deployment = await client.read_deployment_by_name("quantflow/on-demand")
        return await client.create_flow_run_from_deployment(deployment.id, parameters={"spec": spec})


async def wait_final(run_id, timeout: float):
    """The finished flow run, or None when it outlives ``timeout``."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = await client.read_flow_run(run_id)
            if run.state and run.state.is_final():
                return run
            await asyncio.sleep(1)
    return None


async def task_runs(flow_run_id) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    stages = []
    for run in sorted(runs, key=lambda r: r.start_time or r.expected_start_time):
        name = re.sub(r"^(plan|calibration|baseline|report|store-report)-[0-9a-f]{3}$", r"\1", run.name)
        seconds = (run.end_time - run.start_time).total_seconds() if run.start_time and run.end_time else None
        stages.append({"task": name, "state": run.state.name if run.state else None, "seconds": seconds})
    return stages


def task_seconds(stages: list[dict], prefix: str) -> float:
    return sum(s["seconds"] or 0.0 for s in stages if s["task"].startswith(prefix))


def summary(flow_run, wall: float, out: Path, stages: list[dict]) -> dict:
    """What one run cost: the flow's wall time, its stages, GPU time, compile time, memory, overhead.

    Overhead is the flow run's time less the steps' own seconds, the plan (which fingerprints the weights) and the
    uploads: what orchestration, process spawns and model loads between steps cost.
    """
    report = json.loads((out / "report.json").read_text())
    steps = report["steps"]
    gpu = sum(s["seconds"] for s in steps if s["step"] in GPU_STEPS)
    calibration = next(s["seconds"] for s in steps if s["step"] == "calibration")
    baseline = next(s["seconds"] for s in steps if s["step"] == "evaluate" and s["variant"] == "baseline")
    variant_steps = sum(s["seconds"] for s in steps if s["variant"] != "baseline")
    in_steps = max(calibration, baseline) + variant_steps  # calibration runs beside the baseline
    flow_seconds = (flow_run.end_time - flow_run.start_time).total_seconds()
    plan, uploads = task_seconds(stages, "plan"), task_seconds(stages, "upload") + task_seconds(stages, "store-report")
    overhead = flow_seconds - in_steps - plan - uploads
    return {
        "state": flow_run.state.name,
        "trigger_to_final_s": round(wall, 1),
        "flow_run_s": round(flow_seconds, 1),
        "steps_s": round(in_steps, 1),
        "plan_s": round(plan, 1),
        "upload_s": round(uploads, 1),
        "overhead_s": round(overhead, 1),
        "overhead_fraction": round(overhead / flow_seconds, 4),
        "gpu_s": round(gpu, 1),
        "gpu_s_per_variant": {
            name: round(sum(s["seconds"] for s in steps if s["variant"] == name and s["step"] in GPU_STEPS), 1)
            for name in dict.fromkeys(s["variant"] for s in steps)
        },
        "computed_steps": [f"{s['step']}:{s['variant']}" for s in steps if not s["cached"]],
        "steps": steps,
        "rows": [
            {
                k: r[k]
                for k in (
                    "name",
                    "perplexity",
                    "kl_mean",
                    "size_mb",
                    "peak_memory_mb",
                    "compile_seconds",
                    "quantize_seconds",
                    "quantize_peak_memory_mb",
                    "runtime",
                    "speed",
                )
            }
            for r in report["rows"]
        ],
        "evaluate_phases": finished_evaluations(out.parent / "cache"),
    }


def finished_evaluations(cache: Path) -> list[dict]:
    """Every finished evaluate step's own seconds and phases, read from the step cache (also after a cut-off run):
    the seconds not in a phase are the step process's start and imports."""
    found = []
    for record in sorted(cache.glob("evaluate/*/result.json"), key=lambda p: p.stat().st_mtime):
        data = json.loads(record.read_text())
        compile_s = sum(s.get("compile_seconds") or 0.0 for s in data.get("speed", []))
        found.append(
            {
                "variant": data["variant"],
                "seconds": data["seconds"],
                "phases": data.get("phase_seconds", {}),
                "compile_s": round(compile_s, 1),
            }
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1.1b", choices=sorted(SHAPES))
    parser.add_argument("--methods", default="rtn,awq,gptq")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantflow-e2e"))
    parser.add_argument("--timeout", type=float, default=540, help="for both runs together")
    parser.add_argument("--batches", default="1,8", help="decode batch sizes timed for every variant")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="an existing model folder instead of a random one of --shape")
    parser.add_argument("--device", default="cuda", help="'cpu' checks the orchestration on a machine without a GPU")
    parser.add_argument("--compile-mode", default="default", help="evaluation.speed.compile_mode")
    parser.add_argument("--compile-scope", default="step", help="evaluation.speed.compile_scope")
    parser.add_argument("--store", action="store_true", help="upload the artifacts to a local SeaweedFS server")
    parser.add_argument("--runs", default="first,re-run", help="which runs: the first, then the unchanged re-run")
    args = parser.parse_args()

    import torch

    model = args.model or args.work / f"{args.shape}-bf16"
    port, home = free_port(), args.work / "prefect"
    with ThreadPoolExecutor(1) as pool:  # the server starts while the model is built
        starting = pool.submit(start_server, port, home)
        if not (model / "config.json").exists():
            build_baseline(model, args.shape)
            torch.cuda.empty_cache()
        server, s3 = starting.result(), None
    if args.store:
        from quantflow.devtools import s3server

        s3 = s3server.start(args.work / "s3")
    env = {
        **os.environ,
        **(s3.env() if s3 else {}),
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "QUANTFLOW_ROOT": str(ROOT),
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    os.environ.update(env)
    worker = None
    try:
        prefect(
            env,
            "work-pool",
            "create",
            "quantflow-gpu",
            "--type",
            "process",
            "--overwrite",
            "--base-job-template",
            "deployments/pools/process-gpu.json",
        )
        prefect(env, "work-pool", "create", "quantflow-local", "--type", "process", "--overwrite")
        prefect(env, "--no-prompt", "deploy", "--all")
        log = (args.work / "worker.log").open("a")
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "quantflow-gpu", "--limit", "1"],
            env={**env, "CUDA_VISIBLE_DEVICES": "0"},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        variants = [{"method": m, "group_size": args.group_size} for m in args.methods.split(",")]
        spec = {
            "model": {"source": str(model)},
            "variants": variants,
            "device": args.device,
            "evaluation": {
                "speed": {
                    "batch_sizes": [int(b) for b in args.batches.split(",")],
                    "compile_mode": args.compile_mode,
                    "compile_scope": args.compile_scope,
                }
            },
            "output": {"dir": str(args.work / "out"), "cache_dir": str(args.work / "cache")},
        }
        if s3:
            spec["output"]["store"] = {
                "uri": "s3://quantflow-e2e",
                "endpoint_url": s3.endpoint_url,
                "create_bucket": True,
            }
        result = {
            "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(sys.argv),
            "shape": args.shape,
            "config": SHAPES[args.shape],
            "spec": spec,
            "runs": [],
        }
        deadline = time.monotonic() + args.timeout
        for attempt in args.runs.split(","):
            start = time.monotonic()
            created = asyncio.run(trigger(spec))
            run = asyncio.run(wait_final(created.id, deadline - start))
            stages = asyncio.run(task_runs(created.id))
            if run is None:  # what finished so far says where the time went
                result["runs"].append(
                    {
                        "run": attempt,
                        "timed_out_after_s": round(time.monotonic() - start),
                        "stages": stages,
                        "evaluate_phases": finished_evaluations(args.work / "cache"),
                    }
                )
                print(json.dumps(result["runs"][-1]), flush=True)
                break
            wall = time.monotonic() - start
            result["runs"].append(
                {"run": attempt, "name": run.name, "stages": stages, **summary(run, wall, args.work / "out", stages)}
            )
            print(json.dumps({k: v for k, v in result["runs"][-1].items() if k not in ("steps", "rows")}), flush=True)
        if [r["run"] for r in result["runs"]] == ["first", "re-run"] and "flow_run_s" in result["runs"][1]:
            first, again = result["runs"]
            result["rerun_fraction"] = round(again["trigger_to_final_s"] / first["trigger_to_final_s"], 4)
        from quantflow.infra.environment import environment

        result["environment"] = environment()
    finally:
        if worker:
            stop_group(worker, signal.SIGTERM, 10)
        stop_server(server)
        if s3:
            s3server.stop(args.work / "s3", s3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
