"""The artifact store against a real SeaweedFS process: upload, idempotence, pull, tampering, faults."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

from quantflow.delivery.store import MANIFEST, StoreSpec, artifact_prefix, client, pull, upload
from quantflow.devtools import s3server
from quantflow.errors import QuantflowError

pytestmark = pytest.mark.integration


def bucket_spec(**extra) -> StoreSpec:
    return StoreSpec(uri=f"s3://qf-{uuid.uuid4().hex[:10]}/team/models", create_bucket=True, **extra)


def artifact(tmp_path, sizes=(1000, 2_000_000)):
    folder = tmp_path / "artifact"
    folder.mkdir(parents=True)
    for i, size in enumerate(sizes):
        (folder / f"model-{i:05d}.safetensors").write_bytes(os.urandom(size))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def keys(spec: StoreSpec) -> list[str]:
    listing = client(spec).list_objects_v2(Bucket=spec.bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_upload_list_pull_verify_and_idempotent_reupload(s3_env, tmp_path):
    spec = bucket_spec(part_size_mb=5)
    folder = artifact(tmp_path, sizes=(1000, 12 * 2**20))  # the big file goes multipart
    prefix = artifact_prefix(spec, "HuggingFaceTB/SmolLM2-135M", "gptq", "abc123")
    first = upload(folder, spec, prefix, {"metrics": {"perplexity": 17.9}})
    assert first.bytes_sent == sum(p.stat().st_size for p in folder.iterdir()) and not first.already_complete
    assert keys(spec) == sorted(
        prefix + n for n in ["config.json", MANIFEST, "model-00000.safetensors", "model-00001.safetensors"]
    )
    again = upload(folder, spec, prefix, {"metrics": {"perplexity": 17.9}})
    assert again.already_complete and again.bytes_sent == 0
    manifest = pull(f"s3://{spec.bucket}/{prefix}", tmp_path / "pulled", spec)
    assert manifest["metrics"]["perplexity"] == 17.9
    for entry in manifest["files"]:
        assert (tmp_path / "pulled" / entry["name"]).read_bytes() == (folder / entry["name"]).read_bytes()


def test_flipped_byte_is_detected_at_pull(s3_env, tmp_path):
    spec = bucket_spec()
    folder = artifact(tmp_path)
    prefix = artifact_prefix(spec, "m", "v", "h")
    upload(folder, spec, prefix, {})
    data = bytearray((folder / "model-00001.safetensors").read_bytes())
    data[12345] ^= 0x01
    client(spec).put_object(Bucket=spec.bucket, Key=prefix + "model-00001.safetensors", Body=bytes(data))
    with pytest.raises(
        QuantflowError, match="1 of the 3 files its manifest lists are missing from the store or differ"
    ):
        pull(f"s3://{spec.bucket}/{prefix}", tmp_path / "pulled", spec)
    assert not (tmp_path / "pulled").exists() and not list(tmp_path.glob(".tmp-*"))


def test_flipped_byte_behind_intact_metadata_is_caught_by_the_download_checksum(s3_env, tmp_path):
    spec = bucket_spec()
    folder = artifact(tmp_path)
    prefix = artifact_prefix(spec, "m", "v", "h")
    upload(folder, spec, prefix, {})
    s3 = client(spec)
    key = prefix + "model-00001.safetensors"
    data = bytearray((folder / "model-00001.safetensors").read_bytes())
    data[12345] ^= 0x01
    metadata = s3.head_object(Bucket=spec.bucket, Key=key)["Metadata"]  # same size, the old checksum copied over
    s3.put_object(Bucket=spec.bucket, Key=key, Body=bytes(data), Metadata=metadata)
    with pytest.raises(QuantflowError, match="does not match its manifest"):
        pull(f"s3://{spec.bucket}/{prefix}", tmp_path / "pulled", spec)
    assert not (tmp_path / "pulled").exists() and not list(tmp_path.glob(".tmp-*"))


def test_upload_behind_a_finished_manifest_repairs_a_deleted_or_short_shard(s3_env, tmp_path):
    spec = bucket_spec()
    folder = artifact(tmp_path, sizes=(1000, 2_000_000, 300_000))
    prefix = artifact_prefix(spec, "m", "v", "h")
    upload(folder, spec, prefix, {})
    s3 = client(spec)
    s3.delete_object(Bucket=spec.bucket, Key=prefix + "model-00001.safetensors")
    short = (folder / "model-00002.safetensors").read_bytes()[:1000]
    metadata = s3.head_object(Bucket=spec.bucket, Key=prefix + "model-00002.safetensors")["Metadata"]
    s3.put_object(Bucket=spec.bucket, Key=prefix + "model-00002.safetensors", Body=short, Metadata=metadata)
    repaired = upload(folder, spec, prefix, {})
    assert not repaired.already_complete
    assert repaired.repaired == ["model-00001.safetensors", "model-00002.safetensors"]
    assert repaired.bytes_sent == 2_300_000 and repaired.files_skipped == 2  # config.json and the first shard
    assert upload(folder, spec, prefix, {}).already_complete
    pull(f"s3://{spec.bucket}/{prefix}", tmp_path / "pulled", spec)
    assert (tmp_path / "pulled" / "model-00002.safetensors").read_bytes() == (
        folder / "model-00002.safetensors"
    ).read_bytes()


def test_same_size_object_with_copied_metadata_but_other_bytes_is_not_already_uploaded(s3_env, tmp_path):
    """Size and the sha256 kept in metadata can be copied onto any bytes: only the bytes the server returns count."""
    spec = bucket_spec()
    folder = artifact(tmp_path, sizes=(1000, 2_000_000))
    prefix = artifact_prefix(spec, "m", "v", "h")
    upload(folder, spec, prefix, {})
    s3 = client(spec)
    key = prefix + "model-00001.safetensors"
    metadata = s3.head_object(Bucket=spec.bucket, Key=key)["Metadata"]
    s3.put_object(Bucket=spec.bucket, Key=key, Body=os.urandom(2_000_000), Metadata=metadata)
    again = upload(folder, spec, prefix, {})
    assert not again.already_complete and again.repaired == ["model-00001.safetensors"]
    assert again.bytes_sent == 2_000_000 and again.files_skipped == 2
    body = s3.get_object(Bucket=spec.bucket, Key=key)["Body"].read()
    assert body == (folder / "model-00001.safetensors").read_bytes()


def incomplete_uploads(spec: StoreSpec) -> list[str]:
    """Keys of multipart uploads begun and never completed or aborted anywhere in the bucket."""
    listing = client(spec).list_multipart_uploads(Bucket=spec.bucket)
    return [u["Key"] for u in listing.get("Uploads", [])]


KILL_UPLOADER = """
import os, signal, sys
from pathlib import Path
from quantflow.delivery.store import StoreSpec, upload

sent = 0

def die_midway(name, chunk, size):
    global sent
    if name == "model-00001.safetensors":
        sent += chunk
        if sent >= 12 * 2**20:  # three 5 MiB parts of the 30 MiB shard went through
            os.kill(os.getpid(), signal.SIGKILL)

spec = StoreSpec(uri=sys.argv[2], create_bucket=True, part_size_mb=5, concurrency=1)
upload(Path(sys.argv[1]), spec, sys.argv[3], {}, progress=die_midway)
"""


def test_uploader_killed_mid_multipart_leaves_no_incomplete_upload_after_the_resume(s3_env, tmp_path):
    import subprocess
    import sys

    spec = bucket_spec()
    folder = artifact(tmp_path, sizes=(1000, 30 * 2**20))
    prefix = artifact_prefix(spec, "m", "v", "h")
    killed = subprocess.run(
        [sys.executable, "-c", KILL_UPLOADER, str(folder), spec.uri, prefix], capture_output=True, timeout=300
    )
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert incomplete_uploads(spec) == [prefix + "model-00001.safetensors"]  # the kill left one behind
    assert MANIFEST not in " ".join(keys(spec))
    result = upload(folder, spec, prefix, {})
    assert not result.already_complete and incomplete_uploads(spec) == []
    pull(f"s3://{spec.bucket}/{prefix}", tmp_path / "pulled", spec)
    assert (tmp_path / "pulled" / "model-00001.safetensors").read_bytes() == (
        folder / "model-00001.safetensors"
    ).read_bytes()


PAYLOAD = b"payload"
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def entries(*names: str) -> bytes:
    files = [{"name": name, "size": len(PAYLOAD), "sha256": PAYLOAD_SHA} for name in names]
    return json.dumps({"manifest_version": "1.0", "files": files}).encode()


HOSTILE_MANIFESTS = {
    "parent": entries("../escaped.txt"),
    "absolute": entries("/tmp/absolute.txt"),
    "parent inside": entries("sub/../../escaped.txt"),
    "backslash": entries("..\\escaped.txt"),
    "windows drive": entries("C:x"),
    "windows absolute": entries("C:\\escaped.txt"),
    "empty name": entries(""),
    "dot": entries("."),
    "a name that is a folder": entries("sub", "sub/x"),
    "a folder name": entries("sub/"),
    "doubled slash": entries("sub//x"),
    "duplicate name": entries("x", "x"),
    "the manifest itself": entries("manifest.json"),
    "control character": entries("x\n.txt"),
    "not JSON": b"{not json",
    "JSON but no object": b"[]",
    "no file list": json.dumps({"manifest_version": "1.0"}).encode(),
    "missing size": json.dumps({"files": [{"name": "x", "sha256": PAYLOAD_SHA}]}).encode(),
    "size not a number": json.dumps({"files": [{"name": "x", "size": "7", "sha256": PAYLOAD_SHA}]}).encode(),
    "negative size": json.dumps({"files": [{"name": "x", "size": -1, "sha256": PAYLOAD_SHA}]}).encode(),
    "sha256 not hex": json.dumps({"files": [{"name": "x", "size": 7, "sha256": "z" * 64}]}).encode(),
    "name not a string": json.dumps({"files": [{"name": 7, "size": 7, "sha256": PAYLOAD_SHA}]}).encode(),
}


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("case", HOSTILE_MANIFESTS)
def test_pull_refuses_a_hostile_or_malformed_manifest_with_one_error_and_writes_nothing(s3_env, tmp_path, case):
    """Every object the manifest could name is in the store, whole: only the manifest's checks stand in the way."""
    spec = bucket_spec()
    prefix = artifact_prefix(spec, "m", "v", "h")
    s3 = client(spec)
    s3.create_bucket(Bucket=spec.bucket)
    for name in ["x", "sub", "sub/x", "escaped.txt"]:
        s3.put_object(Bucket=spec.bucket, Key=prefix + name, Body=PAYLOAD, Metadata={"sha256": PAYLOAD_SHA})
    s3.put_object(Bucket=spec.bucket, Key=prefix + MANIFEST, Body=HOSTILE_MANIFESTS[case])
    (tmp_path / "work").mkdir()
    before = tree(tmp_path)
    with pytest.raises(QuantflowError) as refused:
        pull(f"s3://{spec.bucket}/{prefix}", tmp_path / "work" / "landing" / "pulled", spec)
    assert refused.type is QuantflowError and "\n" not in refused.value.problem
    assert refused.value.problem.startswith(f"the manifest under s3://{spec.bucket}/{prefix} ")
    assert tree(tmp_path) == before and not Path("/tmp/absolute.txt").exists()


@pytest.mark.parametrize("link_to", ["outside", "missing"])
def test_pull_refuses_a_destination_that_is_a_link(s3_env, tmp_path, link_to):
    """A link at the destination would send the files wherever it points (or fail after the whole download)."""
    spec = bucket_spec()
    prefix = artifact_prefix(spec, "m", "v", "h")
    upload(artifact(tmp_path), spec, prefix, {})
    (tmp_path / "outside").mkdir()
    dest = tmp_path / "pulled"
    dest.symlink_to(tmp_path / link_to)
    with pytest.raises(QuantflowError, match="is a link"):
        pull(f"s3://{spec.bucket}/{prefix}", dest, spec)
    assert list((tmp_path / "outside").iterdir()) == [] and not list(tmp_path.glob(".tmp-*"))


def test_pull_refuses_a_manifest_that_lists_a_missing_object(s3_env, tmp_path):
    spec = bucket_spec()
    prefix = artifact_prefix(spec, "m", "v", "h")
    upload(artifact(tmp_path), spec, prefix, {})
    client(spec).delete_object(Bucket=spec.bucket, Key=prefix + "model-00001.safetensors")
    with pytest.raises(QuantflowError, match="missing from the store or differ from it: model-00001.safetensors"):
        pull(f"s3://{spec.bucket}/{prefix}", tmp_path / "landing" / "pulled", spec)
    assert not (tmp_path / "landing").exists()


def _small_disk() -> None:
    """In the child: any file beyond 1 MiB fails with EFBIG, as a full disk fails writes (ENOSPC)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))


def test_disk_full_while_pulling_fails_clearly_and_leaves_nothing(s3_env, tmp_path):
    import subprocess
    import sys

    spec = bucket_spec()
    prefix = artifact_prefix(spec, "m", "v", "h")
    upload(artifact(tmp_path), spec, prefix, {})  # holds a 2 MB shard
    dest = tmp_path / "landing" / "pulled"
    result = subprocess.run(
        [sys.executable, "-m", "deployments.cli", "pull", f"s3://{spec.bucket}/{prefix}", str(dest)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_small_disk,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "writing" in result.stderr and "free disk space" in result.stderr and "Traceback" not in result.stderr
    assert not dest.exists() and not list(dest.parent.glob(".tmp-*"))


def test_pull_refuses_up_front_when_the_disk_is_too_small(s3_env, tmp_path, monkeypatch):
    import shutil

    spec = bucket_spec()
    prefix = artifact_prefix(spec, "m", "v", "h")
    upload(artifact(tmp_path), spec, prefix, {})
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6)
    )  # 1 MB free
    with pytest.raises(QuantflowError, match="needs 1.9 MiB but .* has 1.0 MiB free"):
        pull(f"s3://{spec.bucket}/{prefix}", tmp_path / "pulled", spec)
    assert not (tmp_path / "pulled").exists()


def test_without_manifest_the_artifact_does_not_exist(s3_env, tmp_path):
    spec = bucket_spec()
    prefix = artifact_prefix(spec, "m", "v", "h")
    upload(artifact(tmp_path), spec, prefix, {})
    client(spec).delete_object(Bucket=spec.bucket, Key=prefix + MANIFEST)
    with pytest.raises(QuantflowError, match="no manifest.json"):
        pull(f"s3://{spec.bucket}/{prefix}", tmp_path / "pulled", spec)


def test_wrong_keys_are_rejected_without_leaking_them(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-0123456789")
    with pytest.raises(QuantflowError, match="refused the credentials") as info:
        upload(artifact(tmp_path), bucket_spec(), "p/", {})
    assert "not-the-secret" not in str(info.value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWN")
    with pytest.raises(QuantflowError, match="refused the credentials"):
        upload(artifact(tmp_path / "b"), bucket_spec(), "p/", {})


def test_missing_bucket_is_created_only_when_told(s3_env, tmp_path):
    spec = bucket_spec().model_copy(update={"create_bucket": False})
    with pytest.raises(QuantflowError, match="does not exist.*\n.*create_bucket"):
        upload(artifact(tmp_path), spec, "p/", {})


def test_unreachable_endpoint(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    with pytest.raises(QuantflowError, match="cannot reach the S3 endpoint"):
        upload(artifact(tmp_path), bucket_spec(max_attempts=2), "p/", {})


@pytest.mark.parametrize("model, variant", [("../../x", "gptq"), ("m", "../../../etc"), ("/abs/path", "..")])
def test_names_cannot_escape_the_prefix(model, variant):
    spec = StoreSpec(uri="s3://bucket/team/models")
    prefix = artifact_prefix(spec, model, variant, "hash")
    assert prefix.startswith("team/models/") and ".." not in prefix.split("/") and "//" not in prefix


def test_server_killed_mid_upload_then_restarted_resumes(tmp_path, monkeypatch):
    data = tmp_path / "weed"
    server = s3server.start(data)
    try:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        spec = bucket_spec(part_size_mb=5, concurrency=1, max_attempts=2)
        folder = artifact(tmp_path, sizes=(3 * 2**20, 80 * 2**20, 20 * 2**20))
        prefix = artifact_prefix(spec, "m", "v", "h")
        sent = {"model-00001.safetensors": 0}

        def kill_midway(name: str, chunk: int, size: int) -> None:
            """SIGKILL the server once 20 MiB of the big shard went through (deterministic, unlike a timer)."""
            if name in sent:
                sent[name] += chunk
                if sent[name] >= 20 * 2**20 and s3server.running(data):
                    s3server.stop(data, server)

        error = _catch(lambda: upload(folder, spec, prefix, {}, progress=kill_midway))
        assert isinstance(error, QuantflowError) and sent["model-00001.safetensors"] < 80 * 2**20
        server = s3server.start(data, ports=server.ports)
        assert MANIFEST not in " ".join(keys(spec))
        assert incomplete_uploads(spec) == [prefix + "model-00001.safetensors"]  # its abort never reached the server
        result = upload(folder, spec, prefix, {})  # resumes: files already whole in the store are not sent again
        assert incomplete_uploads(spec) == []
        total = sum(p.stat().st_size for p in folder.iterdir())
        assert not result.already_complete and result.files_skipped >= 2  # config.json and the 3 MiB shard
        assert result.bytes_sent == total - 3 * 2**20 - (folder / "config.json").stat().st_size < total
        pull(f"s3://{spec.bucket}/{prefix}", tmp_path / "pulled", spec)
    finally:
        s3server.stop(data)


def test_each_new_bucket_takes_one_volume_so_many_buckets_fit(tmp_path, monkeypatch):
    """A store that had made ~35 buckets on a disk with a few GB free answered 500 to every write into the next one:
    SeaweedFS gave each bucket 7 volumes and derived its volume count from free disk. Capped at 8 volumes, 8 buckets
    must each take an artifact."""
    monkeypatch.setattr(s3server, "MAX_VOLUMES", 8)
    data = tmp_path / "weed"
    server = s3server.start(data)
    try:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        folder = artifact(tmp_path, sizes=(1000,))
        for _ in range(8):
            spec = bucket_spec(max_attempts=2)
            upload(folder, spec, "p/", {})
            assert MANIFEST in " ".join(keys(spec))
    finally:
        s3server.stop(data)


def test_a_store_on_a_nearly_full_disk_is_refused_at_start(tmp_path, monkeypatch):
    """On a disk under SeaweedFS's free-space floor the store answered connections but stalled every write (a test
    session hung until its CI limit): start refuses it instead, naming the free space, and leaves no server behind."""
    monkeypatch.setattr(s3server, "MIN_FREE_BYTES", shutil.disk_usage(tmp_path).free)
    data = tmp_path / "weed"
    with pytest.raises(QuantflowError, match=r"MiB free; the local store needs at least") as raised:
        s3server.start(data)
    assert "--data" in raised.value.fix and s3server.running(data) is None and not (data / "weed.log").exists()
    assert not data.exists()  # nothing of the store's written


def _catch(action):
    try:
        action()
    except Exception as error:  # the test inspects whatever the interrupted upload raised
        return error
    return None


def test_pipeline_stores_a_quantized_tiny_model_and_pull_reloads_it(s3_env, tiny_model, tmp_path):
    from quantflow import pipeline
    from quantflow.reporting.report import load_report
    from quantflow.spec import parse_spec
    from tests.conftest import small_spec

    raw = small_spec(tiny_model, tmp_path / "out", tmp_path / "cache", [{"method": "rtn", "group_size": 32}])
    raw["output"]["store"] = {"uri": f"s3://qf-{uuid.uuid4().hex[:8]}/team", "create_bucket": True}
    raw["output"]["store"]["roundtrip_windows"] = 2
    raw["evaluation"]["speed"] = None
    said = []
    out = pipeline.run(parse_spec(raw), progress=said.append)
    row = next(r for r in load_report(out / "report.json").rows if r.name == "rtn")
    assert row.artifact_uri.startswith(raw["output"]["store"]["uri"] + "/")
    assert any(m.startswith("uploaded model.safetensors (") for m in said), said
    assert not any(m.startswith("uploading ") for m in said), said  # small files log once, without percentages
    assert row.roundtrip["windows"] == 2 and row.roundtrip["perplexity_pulled"] == row.roundtrip["perplexity_local"] > 1
    spec = StoreSpec(**raw["output"]["store"])
    stored = keys(spec)
    assert any(k.endswith("/reports/" + k.split("/reports/")[-1]) and k.endswith("report.json") for k in stored)
    manifest = pull(row.artifact_uri, tmp_path / "pulled", spec)
    assert manifest["metrics"]["perplexity"] == row.perplexity and manifest["calibration_hash"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pulled")
    assert model.config.quantization_config is not None
    from quantflow.infra.cache import StepCache
    from quantflow.inputs.sources import resolve_model
    from quantflow.spec import ModelSpec

    ref = resolve_model(ModelSpec(source=row.artifact_uri), StepCache(tmp_path / "c2"))
    assert ref.fingerprint.startswith("s3-") and (Path(ref.path) / "model.safetensors").is_file()
    assert resolve_model(ModelSpec(source=row.artifact_uri), StepCache(tmp_path / "c2")) == ref
