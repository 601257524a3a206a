"""Upload throughput of quantflow's store vs a plain ``boto3 upload_file`` with default settings.

Starts a local SeaweedFS, writes an artifact of ``--gb`` GiB of random safetensors-sized shards,
and times, in the same run and alternating order, (a) ``quantflow.delivery.store.upload`` (tuned parts
and concurrency, sha256 metadata, HEAD verification, manifest) and (b) ``upload_file`` of the
same files with boto3's defaults. Reports MB/s medians over ``--repeats``.

    .venv/bin/python bench/upload_throughput.py --gb 1 --repeats 3 --out bench/results/upload.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path


def write_artifact(folder: Path, gib: float, shard_mib: int = 256) -> int:
    folder.mkdir(parents=True)
    total, index = int(gib * 2**30), 0
    written = 0
    while written < total:
        size = min(shard_mib * 2**20, total - written)
        with (folder / f"model-{index:05d}.safetensors").open("wb") as handle:
            for _ in range(size // 2**20):
                handle.write(os.urandom(2**20))
            handle.write(os.urandom(size % 2**20))
        written, index = written + size, index + 1
    (folder / "config.json").write_text("{}")
    return written + 2


def main() -> None:
    from quantflow.delivery.store import upload
    from quantflow.devtools import s3server
    from quantflow.spec import StoreSpec

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/upload.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = s3server.start(tmp / "weed")
        os.environ.update(server.env())
        try:
            size = write_artifact(tmp / "artifact", args.gb)
            spec = StoreSpec(uri="s3://bench-quantflow", create_bucket=True)
            upload(tmp / "artifact", spec, "warmup/", {})
            times: dict[str, list[float]] = {"quantflow": [], "boto3_default": []}
            for repeat in range(args.repeats):
                order = ["quantflow", "boto3_default"] if repeat % 2 == 0 else ["boto3_default", "quantflow"]
                for name in order:
                    prefix = f"{name}-{uuid.uuid4().hex[:6]}/"
                    start = time.perf_counter()
                    if name == "quantflow":
                        upload(tmp / "artifact", spec, prefix, {})
                    else:
                        import boto3

                        plain = boto3.client("s3", endpoint_url=server.endpoint_url)
                        for path in sorted((tmp / "artifact").iterdir()):
                            plain.upload_file(str(path), spec.bucket, prefix + path.name)
                    times[name].append(time.perf_counter() - start)
        finally:
            s3server.stop(tmp / "weed")
    result = {
        "bytes": size,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        **{
            name: {
                "median_s": round(statistics.median(t), 2),
                "mb_per_s": round(size / 1e6 / statistics.median(t), 1),
                "runs_s": [round(x, 2) for x in t],
            }
            for name, t in times.items()
        },
    }
    result["speedup"] = round(result["boto3_default"]["median_s"] / result["quantflow"]["median_s"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{size / 2**30:.2f} GiB to local SeaweedFS, median of {args.repeats}:")
    for name in times:
        print(f"  {name:<14} {result[name]['mb_per_s']:>8.1f} MB/s  ({result[name]['median_s']} s)")
    print(f"  quantflow / boto3 default speed ratio: {result['speedup']}")


if __name__ == "__main__":
    main()
