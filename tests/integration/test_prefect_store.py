"""Credentials from Prefect blocks (prefect-aws) on a real Prefect server, uploading to a real SeaweedFS."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest

from quantflow.spec import parse_spec
from tests.conftest import read_json, small_spec

pytestmark = pytest.mark.integration
AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")


@pytest.fixture
def block_only(prefect_server, s3_server, monkeypatch):
    """A saved S3Bucket block holding the server's keys; the AWS_* variables are removed, so only the block can work."""
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.credentials import AwsClientParameters

    for key in ("PREFECT_API_URL", "PREFECT_HOME"):
        monkeypatch.setenv(key, prefect_server[key])
    # an earlier in-process Prefect client may have configured logging under the servers' WARNING level; this test reads
    # INFO lines
    monkeypatch.setattr(logging.getLogger("prefect"), "level", logging.INFO)
    keys = s3_server.env()
    name = f"qf-{uuid.uuid4().hex[:8]}"
    credentials = AwsCredentials(
        aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=s3_server.endpoint_url),
    )
    credentials.save(name)
    S3Bucket(bucket_name=name, credentials=credentials).save(name)
    for key in AWS_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    return name, keys["AWS_SECRET_ACCESS_KEY"]


def test_flow_uploads_with_a_credentials_block_and_never_shows_the_secret(block_only, tiny_model, tmp_path):
    from flows.quantize import quantflow_run
    from quantflow.delivery.store import pull, using_credentials
    from tasks.credentials import block_credentials

    name, secret = block_only
    raw = small_spec(tiny_model, tmp_path / "out", tmp_path / "cache", [{"method": "rtn", "group_size": 32}])
    raw["evaluation"]["speed"] = None
    raw["output"]["store"] = {
        "uri": f"s3://{name}/team",
        "create_bucket": True,
        "credentials_block": f"s3-bucket/{name}",
    }
    state = quantflow_run(parse_spec(raw), return_state=True)
    assert state.is_completed(), state
    report = read_json(tmp_path / "out" / "report.json")
    uri = next(row["artifact_uri"] for row in report["rows"] if row["name"] == "rtn")
    with using_credentials(block_credentials(f"aws-credentials/{name}")):
        manifest = pull(uri, tmp_path / "pulled", parse_spec(raw).output.store)
    assert manifest["files"]
    logs = asyncio.run(flow_logs(state.state_details.flow_run_id, until="stored report: s3://"))
    for text in (
        logs,
        (tmp_path / "out" / "report.json").read_text(),
        (tmp_path / "pulled" / "manifest.json").read_text(),
    ):
        assert secret not in text


def test_a_missing_block_fails_the_run_with_the_fix(block_only, tiny_model, tmp_path):
    from flows.quantize import quantflow_run
    from quantflow.errors import QuantflowError

    raw = small_spec(tiny_model, tmp_path / "out", tmp_path / "cache", [{"method": "rtn", "group_size": 32}])
    raw["output"]["store"] = {"uri": "s3://nobody/team", "credentials_block": "aws-credentials/not-there"}
    with pytest.raises(QuantflowError, match="block 'aws-credentials/not-there' does not exist"):
        quantflow_run(parse_spec(raw))
    assert not (tmp_path / "out").exists()


async def flow_logs(flow_run_id, until: str, seconds: float = 30) -> str:
    """The run's log lines, once ``until`` has arrived (logs reach the server in batches, after the run returns)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        for _ in range(int(seconds)):
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            text = "\n".join(log.message for log in logs)
            if until in text:
                return text
            await asyncio.sleep(1)
    raise AssertionError(f"'{until}' never reached the run's logs:\n{text}")
