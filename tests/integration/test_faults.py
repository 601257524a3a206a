"""Runs that go wrong, and one that goes right, through the CLI under the Prefect engine: what they leave behind.

One module fixture makes every run once (each costs seconds of process start-up); the tests read what the runs left:

- a run killed (SIGKILL to its whole process group) while it evaluates a variant, then resumed;
- that resume, with the store going down in the middle of the variant's upload (its host gone: the connection
  carrying the first object is cut, new ones refused), killed after Prefect recorded the failed attempt;
- a second resume, with the store back, that finishes; and an uninterrupted run to compare its report with;
- runs that fail: a wrong secret key (under both engines), and bad input (a model that does not exist).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from quantflow.delivery.store import S3Credentials, client, pull, using_credentials
from quantflow.errors import QuantflowError
from quantflow.pipeline import run as run_pipeline
from quantflow.spec import StoreSpec, parse_spec
from tests.conftest import read_json, small_spec
from tests.integration.conftest import prefect_api
from tests.integration.test_prefect_flow import comparable

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
DEADLINE_S = 600  # generous: a loaded 2-core machine runs these many times slower than a quiet one


class StoreOutage:
    """A TCP relay in front of the S3 server that goes down for good at the first request matching ``request``: the
    connection carrying it is cut mid-request and new connections are refused, as when the store's host dies."""

    def __init__(self, upstream: str, request: bytes) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream, self.request = (host, int(port)), re.compile(request)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.down = threading.Event()
        self.open: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.down.is_set():
            try:
                near, _ = self.listener.accept()
                far = socket.create_connection(self.upstream)
            except OSError:
                return
            self.open += [near, far]
            threading.Thread(target=self._relay, args=(near, far, True), daemon=True).start()
            threading.Thread(target=self._relay, args=(far, near, False), daemon=True).start()

    def _relay(self, source: socket.socket, sink: socket.socket, outgoing: bool) -> None:
        try:
            while data := source.recv(65536):
                if outgoing and self.request.search(data):
                    self.go_down()
                    return
                sink.sendall(data)
        except OSError:
            pass

    def go_down(self) -> None:
        self.down.set()
        for sock in self.open:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() and recv()s
            except OSError:
                pass
            sock.close()


def spec_file(spec: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    return folder / "spec.yaml"


def cli_run(spec: dict, folder: Path, env: dict, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deployments.cli", "run", "--config", str(spec_file(spec, folder)), *flags],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        cwd=ROOT,
        env=env,
    )


def cli_start(spec: dict, folder: Path, env: dict) -> subprocess.Popen:
    """A CLI run in its own process group (its step processes too), its console written to files in ``folder``."""
    return subprocess.Popen(
        [sys.executable, "-m", "deployments.cli", "run", "--config", str(spec_file(spec, folder))],
        stdout=(folder / "console.out").open("w"),
        stderr=(folder / "console.err").open("w"),
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )


def kill_when(process: subprocess.Popen, ready, what: str) -> None:
    """SIGKILL the run's whole process group once ``ready()`` holds: what a host crash does to it."""
    deadline = time.monotonic() + DEADLINE_S
    while not ready():
        assert process.poll() is None, f"the run ended before {what}: rc {process.returncode}"
        assert time.monotonic() < deadline, f"no {what} within {DEADLINE_S} s"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


async def task_states_and_logs(out: Path, task: str) -> tuple[set[str], str]:
    """The state names of the task runs called ``task`` in the flow runs that write ``out``, and those runs' logs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
        TaskRunFilter,
        TaskRunFilterName,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as prefect:
        newest = await prefect.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=10)
        ids = [r.id for r in newest if r.parameters["spec"]["output"]["dir"] == str(out)]
        tasks = await prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[task])),
        )
        logs = await prefect.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
    return {t.state.name for t in tasks if t.state}, "\n".join(log.message for log in logs)


def states_of(out: Path, task: str) -> set[str]:
    return asyncio.run(task_states_and_logs(out, task))[0]


def failure_logged(out: Path, task: str, text: str) -> bool:
    """Whether the task run waits for a retry and the failure's log line reached the server (logs go in batches)."""
    states, logs = asyncio.run(task_states_and_logs(out, task))
    return "AwaitingRetry" in states and text in logs


def manifests(store: StoreSpec) -> list[str]:
    s3 = client(store)
    listed = s3.list_objects_v2(Bucket=store.bucket).get("Contents", [])
    return [o["Key"] for o in listed if o["Key"].endswith("manifest.json")]


def manifests_over_missing_bytes(store: StoreSpec, scratch: Path) -> list[str]:
    """The manifests whose artifact does not pull whole: pull checks every file's size and sha256 against them."""
    broken = []
    for index, key in enumerate(manifests(store)):
        try:
            pull(f"s3://{store.bucket}/{key.removesuffix('manifest.json')}", scratch / f"pulled-{index}", store)
        except QuantflowError as error:
            broken.append(f"{key}: {error}")
    return broken


def steps_done(report: dict) -> dict[tuple[str, str], bool]:
    return {(s["step"], s["variant"]): s["cached"] for s in report["steps"]}


@pytest.fixture(scope="module")
def runs(prefect_server, s3_server, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    keys = s3_server.env()
    env = {**prefect_server, **keys, "QUANTFLOW_HOME": str(root / "home"), "PREFECT_LOGGING_LEVEL": "INFO"}
    bucket = f"qf-{uuid.uuid4().hex[:8]}"

    def spec_for(name: str, prefix: str | None = "team") -> dict:
        variants = [{"method": "rtn", "group_size": 32}]
        spec = small_spec(tiny_model, root / name / "out", root / name / "cache", variants, speed=None)
        store = {"uri": f"s3://{bucket}/{prefix}", "create_bucket": True, "max_attempts": 1} if prefix else None
        return {**spec, "output": {**spec["output"], "store": store}}

    wrong = f"wrong-{uuid.uuid4().hex}"
    found: dict = {"root": root, "bucket": bucket, "secret": keys["AWS_SECRET_ACCESS_KEY"], "wrong secret": wrong}
    # the uninterrupted run to compare with: the plain engine, in this process
    found["clean"] = read_json(run_pipeline(parse_spec(spec_for("clean", None)), lambda _: None) / "report.json")
    found["wrong"] = [
        cli_run(spec_for("wrong"), root / "wrong", {**env, "AWS_SECRET_ACCESS_KEY": wrong}, *flags)
        for flags in (["--engine", "prefect"], ["--engine", "local"])
    ]
    bad = {**spec_for("bad"), "model": {"source": str(root / "no-such-model")}}
    found["bad input"] = cli_run(bad, root / "bad", env)

    resumed, folder = spec_for("resumed"), root / "resumed"
    out, store = Path(resumed["output"]["dir"]), StoreSpec(**resumed["output"]["store"])
    credentials = S3Credentials(  # this process reads the store with the run's keys, not from its environment
        access_key_id=keys["AWS_ACCESS_KEY_ID"],
        secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=keys["AWS_ENDPOINT_URL_S3"],
    )
    with prefect_api(prefect_server["PREFECT_API_URL"]):
        killed = cli_start(resumed, folder / "1", env)
        kill_when(killed, lambda: "Running" in states_of(out, "evaluate rtn"), "evaluation of rtn")
        found["evaluated at the kill"] = len(list((out.parent / "cache" / "evaluate").glob("*/result.json"))) > 1

        # the weights go down with the store: the small files before them are up, the manifest is not
        outage = StoreOutage(keys["AWS_ENDPOINT_URL_S3"], rf"PUT /{bucket}/team/\S+\.safetensors".encode())
        cut = cli_start(resumed, folder / "2", {**env, "AWS_ENDPOINT_URL_S3": outage.url})
        logged = lambda: failure_logged(out, "upload rtn", "cannot reach the S3 endpoint")  # noqa: E731
        kill_when(cut, logged, "failed upload attempt on record")
        found["outage"] = outage.down.is_set()
        found["report before the upload"] = read_json(out / "report.json")
        with using_credentials(credentials):
            found["manifests after the upload kill"] = manifests(store)
            found["broken after the upload kill"] = manifests_over_missing_bytes(store, root / "pulled-after-kill")

    found["resumed"] = cli_run(resumed, folder / "3", env)
    with using_credentials(credentials):
        found["broken after the resume"] = manifests_over_missing_bytes(store, root / "pulled-after-resume")
        found["manifests after the resume"] = manifests(store)
    found["consoles"] = [
        (folder / n / f"console.{stream}").read_text() for n in ("1", "2") for stream in ("out", "err")
    ]
    return found


def test_runs_killed_in_evaluate_and_in_upload_resume_from_finished_steps(runs):
    root = runs["root"]
    assert not runs["evaluated at the kill"], "the first run was killed after its evaluation: nothing was tested"
    # the second run was cut off by the store in the middle of the upload: every step before it came from the cache,
    # except the evaluation the first kill interrupted
    assert runs["outage"], "the store never went down"
    assert steps_done(runs["report before the upload"]) == {
        ("calibration", "baseline"): True,
        ("evaluate", "baseline"): True,
        ("quantize", "rtn"): True,
        ("evaluate", "rtn"): False,
    }
    assert not [k for k in runs["manifests after the upload kill"] if k.startswith("team/")], "manifest before files"
    assert not runs["broken after the upload kill"] and not runs["broken after the resume"], runs
    assert runs["resumed"].returncode == 0, runs["resumed"].stderr
    resumed = read_json(root / "resumed" / "out" / "report.json")
    assert all(steps_done(resumed).values()) and len(resumed["steps"]) == 4, resumed["steps"]
    assert comparable(resumed) == comparable(runs["clean"])
    stored = [row["artifact_uri"] for row in resumed["rows"] if row["artifact_uri"]]
    listed = {f"s3://{runs['bucket']}/{k}".removesuffix("manifest.json") for k in runs["manifests after the resume"]}
    assert len(stored) == 1 and stored[0].rstrip("/") + "/" in listed, (stored, listed)


async def every(read, page: int = 200) -> list:
    """All that a paged read of the API returns (one call returns at most the server's page size)."""
    found: list = []
    while batch := await read(limit=page, offset=len(found)):
        found += batch
        if len(batch) < page:
            break
    return found


async def everything_prefect_kept() -> str:
    """Every flow run, task run, state (with its history), log and artifact on the server, as the API returns them."""
    from prefect.client.orchestration import get_client

    async with get_client() as prefect:
        flows = await every(prefect.read_flow_runs)
        tasks = await every(prefect.read_task_runs)
        history = [await prefect.read_flow_run_states(run.id) for run in flows]
        history += [await prefect.read_task_run_states(run.id) for run in tasks]
        logs = await every(prefect.read_logs)
        artifacts = await every(prefect.read_artifacts)
    assert logs and artifacts, "nothing to scan: the runs left no logs or artifacts on the server"
    kept = [*flows, *tasks, *(state for states in history for state in states), *logs, *artifacts]
    return "\n".join(item.model_dump_json() for item in kept)


def every_file(folder: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in Path(folder).rglob("*") if p.is_file())


def test_the_secret_key_appears_nowhere_on_success_or_failure(runs, prefect_server):
    assert runs["resumed"].returncode == 0 and "stored: rtn -> s3://" in runs["resumed"].stdout, runs["resumed"].stderr
    for failure in runs["wrong"]:
        assert failure.returncode == 2 and "refused the credentials" in failure.stderr, failure.stderr
    assert runs["bad input"].returncode == 2 and "fix:" in runs["bad input"].stderr, runs["bad input"].stderr
    finished = [*runs["wrong"], runs["bad input"], runs["resumed"]]
    with prefect_api(prefect_server["PREFECT_API_URL"]):
        kept = asyncio.run(everything_prefect_kept())
    assert "refused the credentials" in kept and "no-such-model" in kept, "the failed runs should be among the scanned"
    assert "AwaitingRetry" in kept and "cannot reach the S3 endpoint" in kept, (
        "the upload cut off by the store should be among the scanned"
    )
    scanned = {
        "console": "".join(r.stdout + r.stderr for r in finished) + "".join(runs["consoles"]),
        "Prefect API's flow runs (parameters), task runs, states, logs and artifacts": kept,
        "files of QUANTFLOW_HOME, the outputs and the step caches": every_file(runs["root"]).decode(errors="replace"),
        "Prefect's home: the SQLite database, its journal, result storage, the server log": every_file(
            prefect_server["PREFECT_HOME"]
        ).decode(errors="replace"),
    }
    for where, text in scanned.items():
        assert runs["secret"] not in text, f"the secret key appears in the {where}"
        assert runs["wrong secret"] not in text, f"the wrong secret key appears in the {where}"
