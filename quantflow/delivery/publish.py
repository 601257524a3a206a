"""Delivery: variant folders with model cards in the output folder, then each variant and the report in the store.

Every variant folder is written whole beside its final place and renamed there, replacing an
older copy only once the new one is complete. Uploads return ``StoredArtifact`` records, and
the final report is built from them (``build_report(..., stored)``), never patched.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from quantflow.infra.atomic import atomic_files, atomic_folder
from quantflow.infra.cache import content_key
from quantflow.infra.progress import stage
from quantflow.inputs.sources import ModelRef
from quantflow.reporting.report import Report, StoredArtifact, VariantResult, model_card, write_report
from quantflow.spec import RunSpec

Progress = Callable[[str], None]


PUBLISHED_FROM = ".published-from"  # a dotfile: uploads and copies leave it out
NOT_PUBLISHED = ("result.json", ".*")


def publish_variants(report: Report, variants: list[VariantResult], out: Path) -> None:
    """Copy every variant's artifact from the cache to ``out/<name>`` with its model card.

    A folder that already holds a whole copy of the same cache entry keeps its files and gets only the new model
    card: a re-run into the same output folder would otherwise copy every artifact again (3.7 GB each for a 7B).
    """
    for variant in variants:
        if not variant.artifact:
            continue
        target, source, card = out / variant.name, Path(variant.artifact), model_card(report, variant.name)
        if is_copy_of(target, source):
            with atomic_files(target) as scratch:
                (scratch / "README.md").write_text(card)
            continue
        with atomic_folder(target, if_exists="replace") as scratch:
            shutil.copytree(source, scratch, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*NOT_PUBLISHED))
            (scratch / "README.md").write_text(card)
            (scratch / PUBLISHED_FROM).write_text(str(source.resolve()))


def is_copy_of(target: Path, source: Path) -> bool:
    """Whether ``target`` was published from ``source`` and still holds exactly its files, each with the size and
    modification time ``copytree`` gave it (a cache entry written again, or a copy changed since, fails this)."""
    try:
        if (target / PUBLISHED_FROM).read_text() != str(source.resolve()):
            return False
    except OSError:
        return False
    return published_files(source) == {k: v for k, v in published_files(target).items() if k != "README.md"}


def published_files(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime in ns) of every file of ``folder`` that publishing copies."""
    skipped = shutil.ignore_patterns(*NOT_PUBLISHED)
    files = {}
    for path in folder.rglob("*"):
        parts = path.relative_to(folder).parts
        if path.is_file() and not any(skipped("", [part]) for part in parts):
            stat = path.stat()
            files["/".join(parts)] = (stat.st_size, stat.st_mtime_ns)
    return files


def upload_variant(
    spec: RunSpec,
    model: ModelRef,
    report: Report,
    variant: VariantResult,
    out: Path,
    device: str,
    cache_root: Path,
    progress: Progress = print,
) -> StoredArtifact:
    """Upload ``out/<variant>`` under its content hash (and check its round trip when asked)."""
    from quantflow.delivery.roundtrip import roundtrip
    from quantflow.delivery.store import artifact_prefix, upload, upload_progress
    from quantflow.infra.environment import environment

    store = spec.output.store
    row = next(r for r in report.rows if r.name == variant.name)
    prefix = artifact_prefix(store, model.source, variant.name, Path(variant.artifact).name)
    meta = {
        "model": model.model_dump(),
        "variant": variant.name,
        "calibration_hash": report.calibration["hash"],
        "metrics": row.model_dump(exclude={"artifact_uri", "roundtrip"}),
        "spec": spec.model_dump(mode="json"),
        "environment": environment(),
    }
    with stage(f"upload {variant.name}") as shown:
        record = upload(out / variant.name, store, prefix, meta, upload_progress(progress))
        progress(
            f"stored {variant.name}: {record.uri} ({record.bytes_sent} bytes "
            f"sent{', already complete' if record.already_complete else ''})"
        )
        shown.outcome = "already complete" if record.already_complete else f"{record.bytes_sent / 2**20:.1f} MiB sent"
        check = None
        if store.roundtrip_windows:
            check = roundtrip(
                record.uri, store, out / variant.name, spec, device, cache_root / "roundtrip"
            ).model_dump()
            progress(
                f"round trip {variant.name}: pulled copy scores {check['perplexity_pulled']:.4f} on "
                f"{check['windows']} windows, as the local copy"
            )
            shown.outcome += ", round trip checked"
    return StoredArtifact(
        name=variant.name,
        uri=record.uri,
        bytes_sent=record.bytes_sent,
        already_complete=record.already_complete,
        roundtrip=check,
    )


def upload_report(spec: RunSpec, model: ModelRef, report: Report, out: Path, progress: Progress = print) -> str:
    """Upload report.json, report.md and the plots beside the variants, under the run's content hash."""
    from quantflow.delivery.store import artifact_prefix, upload

    run_hash = content_key(
        spec.model_dump(mode="json", exclude={"output"}), model.fingerprint, report.calibration["hash"]
    )
    prefix = artifact_prefix(spec.output.store, model.source, "reports", run_hash)
    with stage("upload report"), tempfile.TemporaryDirectory(prefix=".report-upload-", dir=out) as staging:
        write_report(report, Path(staging))  # the report's files only
        record = upload(Path(staging), spec.output.store, prefix, {"kind": "report"})
    progress(f"stored report: {record.uri}")
    return record.uri
