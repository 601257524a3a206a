"""A link in the Prefect UI opens after the run: the local store stops with the run (as the demo's does), and the
artifact's own words bring it back at the same address with the same data."""

from __future__ import annotations

import asyncio
import re
import shlex
import subprocess
import urllib.request

import pytest

from quantflow.spec import parse_spec
from tests.conftest import small_spec
from tests.integration.conftest import BIN
from tests.integration.test_prefect_flow import run_artifacts

pytestmark = pytest.mark.integration


@pytest.fixture
def local_store(prefect_server, tmp_path, monkeypatch):
    """The default local store under a fresh QUANTFLOW_HOME, its keys in the environment, as `quantflow demo` has."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from quantflow.devtools import s3server

    monkeypatch.setenv("QUANTFLOW_HOME", str(tmp_path / "home"))
    data = tmp_path / "home" / "s3"
    server = s3server.start(data)
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    # Prefect read its environment at import: the session's server (not a temporary one, slow to start under load)
    # reaches the flow through its settings context
    with temporary_settings(updates={PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
        yield server
    s3server.stop(data)


def test_a_stored_link_opens_after_the_store_is_brought_back_as_the_artifact_says(local_store, tiny_model, tmp_path):
    from flows.quantize import quantflow_run
    from quantflow.devtools import s3server

    raw = small_spec(tiny_model, tmp_path / "out", tmp_path / "cache", [{"method": "rtn", "group_size": 32}])
    raw["evaluation"]["speed"] = None
    raw["output"]["store"] = {"uri": "s3://links/demo", "endpoint_url": local_store.endpoint_url, "create_bucket": True}
    state = quantflow_run(parse_spec(raw), return_state=True)
    assert state.is_completed(), state
    s3server.stop(tmp_path / "home" / "s3")  # the run is over: the demo stops its store here

    listed = asyncio.run(run_artifacts(state.state_details.flow_run_id))
    artifacts = {a.key: a for a in listed if a.key}
    # the UI lists the flow's own artifacts above its tasks': the comparison and the report, nothing else
    assert {a.key for a in listed if a.task_run_id is None and a.type != "result"} == {
        "quantflow-comparison",
        "quantflow-report",
    }
    link = artifacts["quantflow-report-link"]
    url = re.search(r"\((http[^)]+)\)", link.data).group(1)  # Prefect keeps a link artifact as [text](url)
    with pytest.raises(OSError):  # refused or reset: dead now, as the description says it may be
        urllib.request.urlopen(url, timeout=10)
    command = re.search(r"`(quantflow storage up[^`]*)`", link.description)
    assert command, link.description
    up = subprocess.run(
        [str(BIN / "quantflow"), *shlex.split(command.group(1))[1:]], capture_output=True, text=True, timeout=180
    )
    assert up.returncode == 0, up.stderr
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.read() == (tmp_path / "out" / "report.md").read_bytes()
