"""`quantflow serve`: a local Prefect server plus a served deployment the UI can run, used as a user does.

The served deployment is run as the UI's Run form sends it: the parameters read from the deployment (its values and
its schema's defaults), a variant added as the form adds an item. `--config` opens the form on a tiny model's spec, so
a run costs seconds, not the demo's minutes; the submitted shape is the form's all the same. HOME is a fresh folder:
nothing a run does may land there, only under QUANTFLOW_HOME and the output folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from deployments.local import STARTUP_WAIT_S, stop_group
from quantflow.devtools.demo import demo_spec
from tests.conftest import read_json, small_spec
from tests.integration.conftest import (
    BIN,
    form_item,
    form_parameters,
    free_port,
    prefect_api,
    run_artifacts,
    run_logs,
    wait_final,
    wait_http,
)

pytestmark = pytest.mark.integration
DEPLOYMENT = "quantflow/quantflow-local"


def user_env(home: Path, quantflow_home: Path) -> dict[str, str]:
    """A user's shell: no Prefect settings of their own, HOME and QUANTFLOW_HOME where the test can look."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "HOME": str(home), "QUANTFLOW_HOME": str(quantflow_home)}


def start_serve(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "quantflow"), "serve", *args],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
        # as from a terminal: a test run started in the background (`cmd &`) inherits SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def served_deployments(port: int) -> dict[str, dict]:
    """The server's deployments by name, once `serve` registered its own (it does so after the server answers)."""
    wait_http(f"http://127.0.0.1:{port}/api/health", STARTUP_WAIT_S + 30)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/deployments/filter",
            data=b"{}",
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        found = {d["name"]: d for d in json.loads(urllib.request.urlopen(request, timeout=5).read())}
        if "quantflow-local" in found:
            return found
        time.sleep(1)
    raise TimeoutError("`quantflow serve` registered no deployment within 120 s")


def test_serve_starts_a_server_and_registers_the_deployment(tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"  # shown below if `serve` ignored Ctrl-C and had to be killed
    process = start_serve(
        ["--port", str(port), "--home", str(tmp_path / "prefect")], user_env(tmp_path, tmp_path / "qf"), log
    )
    try:
        found = served_deployments(port)
        # the Run form opens on the demo's spec, which a laptop's CPU finishes in minutes
        assert found["quantflow-local"]["parameters"]["spec"] == demo_spec().model_dump(mode="json")
        # the browser UI asks this server, not Prefect's default port (it showed "Can't connect" with --port 4300)
        ui = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=5).read())
        assert ui["api_url"] == f"http://127.0.0.1:{port}/api", ui
        # the printed link opens the run form in the V2 UI (a deep link without /v2 lands in V1's JSON editors)
        form = f"http://127.0.0.1:{port}/v2/deployments/deployment/{found['quantflow-local']['id']}/run"
        assert f"run form: {form}" in log.read_text() and "/deployments/deployment/" not in log.read_text().replace(
            form, ""
        )
    finally:
        stop_group(process, signal.SIGINT, 60)  # the runner pauses its deployment, then the server gets up to 10 s
    assert process.returncode != -signal.SIGKILL, log.read_text()[-3000:]  # it stopped on Ctrl-C
    with pytest.raises(TimeoutError):  # Ctrl-C also stopped the server it started, before `serve` returned
        wait_http(f"http://127.0.0.1:{port}/api/health", 5)


@dataclass
class Served:
    api: str
    env: dict[str, str]
    home: Path  # the user's HOME: nothing may land here
    quantflow_home: Path
    out: Path  # the output folder the form's spec names
    root: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    """`quantflow serve --config tiny.yaml` started as a user does (no PREFECT_* in the environment, default home)."""
    root = tmp_path_factory.mktemp("served")
    (root / "home").mkdir()
    spec = small_spec(tiny_model, root / "out", root / "cache", [{"method": "rtn", "group_size": 32}])
    (root / "tiny.yaml").write_text(yaml.safe_dump(spec))
    env = user_env(root / "home", root / "quantflow-home")
    port = free_port()
    process = start_serve(["--port", str(port), "--config", str(root / "tiny.yaml")], env, root / "serve.log")
    try:
        served_deployments(port)
        yield Served(f"http://127.0.0.1:{port}/api", env, root / "home", root / "quantflow-home", root / "out", root)
    finally:
        stop_group(process, signal.SIGINT, 60)


async def submit(served: Served, change=None) -> list:
    """Fill the Run form (its defaults, then ``change`` as the user types it), submit, wait for the run's end."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        deployment = await client.read_deployment_by_name(DEPLOYMENT)
        parameters = form_parameters(deployment)
        if change:
            change(parameters, deployment)
        run = await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
    return await wait_final(run.id, timeout=600)


def submit_all(served: Served, *changes) -> list:
    """Several form submissions at once: the served deployment runs them side by side."""

    async def together():
        return await asyncio.gather(*(submit(served, change) for change in changes))

    with prefect_api(served.api):
        return asyncio.run(together())


def test_the_forms_defaults_run_to_completion_with_the_report(served):
    (run,) = submit_all(served, None)
    assert run.state.is_completed(), (run.state.message, (served.root / "serve.log").read_text()[-3000:])
    with prefect_api(served.api):
        artifacts = {a.key: a for a in asyncio.run(run_artifacts(run.id)) if a.key}
    assert "quantflow report" in artifacts["quantflow-report"].data and "quantflow-comparison" in artifacts
    assert [row["name"] for row in read_json(served.out / "report.json")["rows"]] == ["baseline", "rtn"]


def test_a_variant_added_in_the_form_runs_too(served, tmp_path):
    def add_variant(parameters, deployment):
        parameters["spec"]["output"]["dir"] = str(tmp_path / "out")
        parameters["spec"]["variants"].append(form_item(deployment, "RTNVariant", name="rtn-asym", symmetric=False))

    (run,) = submit_all(served, add_variant)
    assert run.state.is_completed(), run.state.message
    rows = read_json(tmp_path / "out" / "report.json")["rows"]
    assert [row["name"] for row in rows] == ["baseline", "rtn", "rtn-asym"]
    assert (tmp_path / "out" / "rtn-asym" / "model.safetensors").is_file()


def bad_inputs(out: Path):
    """Values a user can type in the form that the server's schema check lets through; each with what it must say."""

    def unnamed_second_rtn(parameters, deployment):  # "Add item" without a name: two variants called rtn
        parameters["spec"]["output"]["dir"] = str(out / "unnamed")
        parameters["spec"]["variants"].append(form_item(deployment, "RTNVariant"))

    def group_too_large(parameters, deployment):  # the tiny model's layers are 64 and 128 wide
        parameters["spec"]["output"]["dir"] = str(out / "group")
        parameters["spec"]["variants"][0]["group_size"] = 256

    return [
        (unnamed_second_rtn, "invalid run spec in the flow run's parameters: (spec): Value error, variant names must"),
        (group_too_large, "variant 'rtn': group_size 256 does not divide the input width"),
    ]


def test_a_bad_value_in_the_form_fails_the_run_with_the_clis_error_in_its_state_and_log(served, tmp_path):
    cases = bad_inputs(tmp_path / "out")
    runs = submit_all(served, *(change for change, _ in cases))
    for run, (change, says) in zip(runs, cases):
        assert run.state.is_failed(), (change.__name__, run.state)
        assert says in run.state.message and "fix: " in run.state.message, run.state.message
        with prefect_api(served.api):
            logs = asyncio.run(run_logs(run.id))
        said = [line for line in logs if line.startswith("error: ")]
        assert len(said) == 1 and says in said[0] and "\n  fix: " in said[0], logs
    assert not (tmp_path / "out").exists()  # nothing half-written


def changed_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_nothing_lands_outside_quantflow_home(served, tiny_model, tmp_path):
    """A CLI run (on a temporary Prefect server) and a failed served run: afterwards the user's HOME is as empty as it
    was (Prefect kept its database, results and logs in ~/.prefect before; tests/unit/test_cli.py checks a failed
    CLI run)."""
    spec = small_spec(tiny_model, tmp_path / "out", tmp_path / "cache", [{"method": "rtn", "group_size": 32}])
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    (failed_served,) = submit_all(served, bad_inputs(tmp_path / "served-out")[0][0])
    assert failed_served.state.is_failed()
    env = {**served.env, "QUANTFLOW_HOME": str(tmp_path / "cli-home")}  # its own database: no second writer on it
    command = [sys.executable, "-m", "deployments.cli", "run", "--config", str(tmp_path / "spec.yaml")]
    ran = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert (tmp_path / "out" / "report.json").is_file() and (tmp_path / "cli-home" / "prefect" / "prefect.db").is_file()
    assert changed_under(served.home) == []


def test_server_stops_its_prefect_server_on_sigterm_and_keeps_to_quantflow_home(tmp_path):
    """A service manager stops `quantflow server` with SIGTERM: the Prefect server it started must stop too (it
    outlived its parent), and its database lands under QUANTFLOW_HOME, not in the current folder."""
    port, cwd = free_port(), tmp_path / "cwd"
    cwd.mkdir()
    log = tmp_path / "server.log"
    process = subprocess.Popen(
        [str(BIN / "quantflow"), "server", "--port", str(port)],
        env=user_env(tmp_path / "home", tmp_path / "qf"),
        cwd=cwd,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", STARTUP_WAIT_S + 30)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        with pytest.raises(TimeoutError):  # checked before the cleanup below kills what is left
            wait_http(f"http://127.0.0.1:{port}/api/health", 5)
    finally:
        if process.poll() is None:
            stop_group(process, signal.SIGKILL, 10)
    assert (tmp_path / "qf" / "prefect" / "prefect.db").is_file() and list(cwd.iterdir()) == [], log.read_text()
