"""Artifact store on S3-compatible storage: verified uploads with a manifest committed last.

Layout: ``s3://<bucket>/<prefix>/<model-slug>/<variant-slug>/<content-hash>/`` holding the
artifact's files and ``manifest.json`` (every file's size and sha256, the spec, metrics,
calibration hash, model source, environment). Readers treat a variant as existing only when
its manifest does, and the manifest is written only after every file it names has been
uploaded and checked (size and sha256 from the object's metadata). So an interrupted upload
is invisible, a repeat upload of identical bytes transfers nothing (a file counts as already
there only when the sha256 of the bytes the server returns matches), an abandoned multipart
upload is aborted by the next attempt, and ``pull`` refuses any file whose bytes differ from
the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from quantflow.errors import QuantflowError, TransientError
from quantflow.infra import progress as events
from quantflow.infra.atomic import atomic_folder
from quantflow.infra.cache import file_sha256
from quantflow.spec import StoreSpec, slug

MANIFEST = "manifest.json"
MANIFEST_VERSION = "1.0"
SHA_META = "sha256"


class TransferRecord(BaseModel):
    """What an upload did: ``files_skipped`` were found whole in the store (their bytes' sha256) and not sent again."""

    uri: str
    files: int
    bytes_sent: int
    files_skipped: int
    already_complete: bool
    repaired: list[str] = []


Progress = Callable[[str, int, int], None]


class S3Credentials(BaseModel):
    """Credentials handed in by a caller (e.g. from a Prefect AwsCredentials block) instead of the AWS chain.

    Secrets are ``SecretStr``: they print as '**********' in logs, reprs and tracebacks.
    """

    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None


_CREDENTIALS: ContextVar[S3Credentials | None] = ContextVar("quantflow_s3_credentials", default=None)


@contextmanager
def using_credentials(credentials: S3Credentials | None) -> Iterator[None]:
    """Make every store call inside the block use ``credentials`` (None: the standard AWS chain)."""
    token = _CREDENTIALS.set(credentials)
    try:
        yield
    finally:
        _CREDENTIALS.reset(token)


def endpoint(spec: StoreSpec) -> str | None:
    """The spec's endpoint, else the handed-in credentials', else AWS_ENDPOINT_URL_S3 (None: AWS itself)."""
    given = _CREDENTIALS.get()
    return spec.endpoint_url or (given.endpoint_url if given else None) or os.environ.get("AWS_ENDPOINT_URL_S3")


def _session(spec: StoreSpec):
    import boto3

    given = _CREDENTIALS.get()
    profile = spec.profile or (given.profile if given else None)
    if given is None or given.access_key_id is None:
        return boto3.session.Session(profile_name=profile) if profile else boto3.session.Session()
    return boto3.session.Session(
        aws_access_key_id=given.access_key_id,
        aws_secret_access_key=given.secret_access_key.get_secret_value() if given.secret_access_key else None,
        aws_session_token=given.session_token.get_secret_value() if given.session_token else None,
    )


def client(spec: StoreSpec):
    from botocore.config import Config

    given = _CREDENTIALS.get()
    config = Config(
        s3={"addressing_style": "path" if spec.path_style else "auto"},
        retries={"max_attempts": spec.max_attempts, "mode": "adaptive"},
        connect_timeout=5,
        read_timeout=60,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    region = spec.region or (given.region if given else None) or "us-east-1"
    return _session(spec).client("s3", endpoint_url=endpoint(spec), region_name=region, config=config)


def _explain(error: Exception, spec: StoreSpec) -> QuantflowError:
    """Turn botocore failures into messages that name the fix and never echo a secret."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = f"{spec.uri} at {endpoint(spec) or 'AWS'}"
    if isinstance(error, NoCredentialsError):
        return QuantflowError(
            f"no S3 credentials found for {where}", "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile"
        )
    if isinstance(error, EndpointConnectionError):
        return TransientError(
            f"cannot reach the S3 endpoint for {where}",
            "check endpoint_url and that the server is running (`quantflow storage up`)",
        )
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return QuantflowError(
                f"S3 refused the credentials for {where} ({code})",
                "check the access key and secret (AWS_* variables or profile)",
            )
        if code in ("NoSuchBucket", "404"):
            return QuantflowError(
                f"bucket '{spec.bucket}' does not exist at {where}",
                "create it, or set create_bucket: true to let quantflow create it",
            )
        return TransientError(f"S3 error {code} for {where}", "see the server's logs")
    detail = str(error).splitlines()[0][:200] if str(error) else ""
    return TransientError(
        f"S3 transfer to {where} failed ({type(error).__name__}: {detail})", "retry; check the server and its logs"
    )


def artifact_prefix(spec: StoreSpec, model: str, variant: str, content_hash: str) -> str:
    """Key prefix of one artifact; every user-given segment is slugged so no key escapes the prefix."""
    parts = [spec.prefix, slug(model), slug(variant), slug(content_hash)]
    return "/".join(p for p in parts if p) + "/"


def build_manifest(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))
    return {
        "manifest_version": MANIFEST_VERSION,
        "files": [
            {"name": str(p.relative_to(folder)), "size": p.stat().st_size, "sha256": file_sha256(p)} for p in files
        ],
        **meta,
    }


def _remote_manifest(s3, spec: StoreSpec, prefix: str) -> bytes | None:
    """The stored manifest's raw bytes, None when there is none (the artifact does not exist)."""
    from botocore.exceptions import ClientError

    try:
        return s3.get_object(Bucket=spec.bucket, Key=prefix + MANIFEST)["Body"].read()
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise


class ManifestFile(BaseModel):
    """One file a manifest lists, as pull trusts it: a plain relative name, a size and a sha256."""

    model_config = ConfigDict(strict=True, extra="ignore")
    name: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern="^[0-9a-f]{64}$")

    @field_validator("name")
    @classmethod
    def inside_the_artifact(cls, name: str) -> str:
        """Only names that land inside the destination and nowhere else: no absolute or drive paths ('/x', 'C:x'),
        no '..', '.', empty or doubled segments, backslashes or control characters, not the manifest itself."""
        parts = name.split("/")
        if (
            any(part in ("", ".", "..") for part in parts)
            or any(char in name for char in ":\\")
            or not name.isprintable()
            or name == MANIFEST
        ):
            raise ValueError(f"{name!r} is not a plain file name inside the artifact")
        return name


class Manifest(BaseModel):
    """The fields pull reads from a manifest; the rest (spec, metrics, ...) pass through untouched."""

    files: list[ManifestFile]

    @field_validator("files")
    @classmethod
    def one_file_per_path(cls, files: list[ManifestFile]) -> list[ManifestFile]:
        """Two entries for one name, or a name that is also another's folder ('sub' and 'sub/x'), can't both be
        written: the later would overwrite the earlier or fail half-way."""
        names = [f.name for f in files]
        folders = {"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 1)}
        clash = sorted({n for n in names if names.count(n) > 1} | (set(names) & folders))
        if clash:
            raise ValueError(f"{clash[0]!r} is listed twice, or as a file and as a folder")
        return files


def _first_problem(error: ValidationError) -> str:
    """'files.0.size: Field required': where in the manifest, and what is wrong there."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


def read_manifest(body: bytes, uri: str) -> dict:
    """The stored manifest, refused whole with one error unless it is JSON whose file list pull can write safely."""
    try:
        manifest = json.loads(body)
        Manifest.model_validate(manifest)
    except (ValueError, ValidationError) as error:
        reason = _first_problem(error) if isinstance(error, ValidationError) else "it is not JSON"
        raise QuantflowError(
            f"the manifest under {uri} is not one quantflow wrote ({reason})",
            "do not use this artifact; re-upload it from its source",
        ) from None
    return manifest


def _remote_matches(s3, spec: StoreSpec, key: str, entry: dict) -> bool:
    from botocore.exceptions import ClientError

    try:
        head = s3.head_object(Bucket=spec.bucket, Key=key)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return False
        raise
    return head["ContentLength"] == entry["size"] and head.get("Metadata", {}).get(SHA_META) == entry["sha256"]


def _remote_sha256(s3, spec: StoreSpec, key: str) -> str:
    """The sha256 of the bytes the server returns for ``key``, streamed (metadata can be copied onto other bytes)."""
    digest = hashlib.sha256()
    for chunk in s3.get_object(Bucket=spec.bucket, Key=key)["Body"].iter_chunks(2**20):
        digest.update(chunk)
    return digest.hexdigest()


def _remote_whole(s3, spec: StoreSpec, key: str, entry: dict) -> bool:
    """Whether the object holds exactly the entry's bytes: a cheap HEAD first, then the bytes themselves hashed."""
    return _remote_matches(s3, spec, key, entry) and _remote_sha256(s3, spec, key) == entry["sha256"]


def abort_incomplete_uploads(s3, spec: StoreSpec, prefix: str) -> list[str]:
    """Abort every multipart upload under ``prefix`` begun and never finished (a killed uploader, a server lost
    mid-file): their parts are invisible but stay stored, and billed, until aborted. Returns the keys aborted."""
    aborted = []
    for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=spec.bucket, Prefix=prefix):
        for upload in page.get("Uploads", []):
            s3.abort_multipart_upload(Bucket=spec.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            aborted.append(upload["Key"])
    return aborted


def _listed_files(body: bytes) -> list | None:
    """The file list of a stored manifest, None when it has none (then the upload writes a fresh one)."""
    try:
        return json.loads(body).get("files")
    except (ValueError, AttributeError):
        return None


def ensure_bucket(s3, spec: StoreSpec) -> None:
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=spec.bucket)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket") and spec.create_bucket:
            s3.create_bucket(Bucket=spec.bucket)
        else:
            raise


def check_access(spec: StoreSpec) -> None:
    """Reach the store with the run's credentials before any heavy work: wrong keys or a missing bucket fail at plan
    time."""
    from botocore.exceptions import ClientError

    try:
        client(spec).head_bucket(Bucket=spec.bucket)
    except ClientError as error:
        if not (error.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket") and spec.create_bucket):
            raise _explain(error, spec) from None
    except Exception as error:
        raise _explain(error, spec) from None


LARGE_FILE = 256 * 2**20  # files at least this big also log each quarter; smaller ones take seconds and log once


def upload_progress(say: Callable[[str], None], every_pct: int = 25, large: int = LARGE_FILE) -> Progress:
    """A boto3-callback adapter that logs one line per file sent, and each quarter of a large file as it passes."""
    import threading

    sent: dict[str, int] = {}
    lock = threading.Lock()  # boto3 calls back from its transfer threads

    def report(name: str, chunk: int, size: int) -> None:
        with lock:
            before = sent.get(name, 0)
            sent[name] = now = before + chunk
        if now >= size > before:
            say(f"uploaded {name} ({size / 2**20:.1f} MiB)")
        elif size >= large and now * 100 // size // every_pct > before * 100 // size // every_pct:
            say(f"uploading {name}: {now * 100 // size // every_pct * every_pct}% of {size / 2**20:.1f} MiB")

    return report


def upload(
    folder: Path, spec: StoreSpec, prefix: str, meta: dict[str, Any], progress: Progress | None = None
) -> TransferRecord:
    """Upload ``folder`` under ``prefix``: data files (skipping identical ones), a check, then the manifest."""
    from boto3.s3.transfer import TransferConfig

    manifest = build_manifest(folder, meta)
    uri = f"s3://{spec.bucket}/{prefix}"
    transfer = TransferConfig(
        multipart_threshold=spec.part_size_mb * 2**20,
        multipart_chunksize=spec.part_size_mb * 2**20,
        max_concurrency=spec.concurrency,
    )
    s3 = client(spec)
    try:
        ensure_bucket(s3, spec)
        remote = _remote_manifest(s3, spec, prefix)
        # a manifest only says the upload once finished: objects can be deleted or overwritten behind it, so every
        # object it lists is checked (size and sha256 metadata by HEAD, then the sha256 of the bytes the server
        # returns) before the artifact counts as whole
        finished = remote is not None and _listed_files(remote) == manifest["files"]
        whole = {e["name"] for e in manifest["files"] if _remote_whole(s3, spec, prefix + e["name"], e)}
        # an earlier attempt killed mid-file left its multipart upload open; this attempt sends that file again
        abort_incomplete_uploads(s3, spec, prefix)
        if finished and len(whole) == len(manifest["files"]):
            return TransferRecord(
                uri=uri, files=len(whole), bytes_sent=0, files_skipped=len(whole), already_complete=True
            )
        uploaded: list[dict] = []
        for done, entry in enumerate(manifest["files"]):
            events.advance(done, len(manifest["files"]), "files")
            key = prefix + entry["name"]
            if entry["name"] in whole:
                continue
            s3.upload_file(
                str(folder / entry["name"]),
                spec.bucket,
                key,
                Config=transfer,
                ExtraArgs={"Metadata": {SHA_META: entry["sha256"]}},
                Callback=(lambda n, name=entry["name"], size=entry["size"]: progress(name, n, size))
                if progress
                else None,
            )
            uploaded.append(entry)
        # files skipped above were just verified by the same HEAD check; only fresh uploads need it
        missing = [e["name"] for e in uploaded if not _remote_matches(s3, spec, prefix + e["name"], e)]
        if missing:
            raise TransientError(
                f"after upload, {len(missing)} objects under {uri} do not match their local files: {missing[:3]}",
                "retry the upload",
            )
        events.advance(len(manifest["files"]), len(manifest["files"]), "files")
        s3.put_object(
            Bucket=spec.bucket,
            Key=prefix + MANIFEST,
            Body=json.dumps(manifest, indent=2).encode(),
            ContentType="application/json",
        )
    except QuantflowError:
        raise
    except Exception as error:
        raise _explain(error, spec) from None
    return TransferRecord(
        uri=uri,
        files=len(manifest["files"]),
        bytes_sent=sum(e["size"] for e in uploaded),
        files_skipped=len(manifest["files"]) - len(uploaded),
        already_complete=False,
        repaired=[e["name"] for e in uploaded] if finished else [],
    )


def parse_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise QuantflowError(f"'{uri}' is not an artifact URI", "pass s3://bucket/prefix/model/variant/hash")
    bucket, key = uri[5:].split("/", 1)
    return bucket, key.rstrip("/") + "/"


def pull(uri: str, dest: Path, spec: StoreSpec | None = None) -> dict:
    """Download an artifact into ``dest``, verifying every file against the manifest; all or nothing."""
    bucket, prefix = parse_uri(uri)
    spec = spec or StoreSpec(uri=f"s3://{bucket}")
    s3 = client(spec)
    dest = Path(dest)
    if dest.is_symlink():
        raise QuantflowError(f"{dest} is a link", "pull into a new folder that is not a link")
    if dest.exists():
        raise QuantflowError(f"{dest} already exists", "pull into a new folder")
    try:
        body = _remote_manifest(s3, spec, prefix)
        if body is None:
            raise QuantflowError(
                f"no manifest.json under {uri}: the artifact does not exist or its upload never finished",
                "check the URI, or re-run the upload",
            )
        manifest = read_manifest(body, uri)
        _check_objects(s3, spec, prefix, manifest, uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        need, free = sum(e["size"] for e in manifest["files"]), shutil.disk_usage(dest.parent).free
        if need > free:
            raise QuantflowError(
                f"{uri} needs {need / 2**20:.1f} MiB but {dest.parent} has {free / 2**20:.1f} MiB free",
                "free disk space or pull into a folder on a bigger disk",
            )
        with atomic_folder(dest) as scratch:
            _download(s3, bucket, prefix, manifest, scratch, uri)
        return manifest
    except QuantflowError:
        raise
    except FileExistsError:
        raise QuantflowError(f"{dest} appeared while pulling into it", "pull into a new folder") from None
    except OSError as error:
        raise QuantflowError(
            f"writing {dest} failed: {error.strerror or error}", "free disk space or choose another folder"
        ) from None
    except Exception as error:
        raise _explain(error, spec) from None


def _download(s3, bucket: str, prefix: str, manifest: dict, folder: Path, uri: str) -> None:
    """Every listed file into ``folder``, each checked against its manifest entry, then the manifest itself."""
    for entry in manifest["files"]:
        target = folder / entry["name"]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, prefix + entry["name"], str(target))
        if target.stat().st_size != entry["size"] or file_sha256(target) != entry["sha256"]:
            raise QuantflowError(
                f"{entry['name']} under {uri} does not match its manifest (corrupted or tampered)",
                "re-upload the artifact from its source",
            )
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _check_objects(s3, spec: StoreSpec, prefix: str, manifest: dict, uri: str) -> None:
    """Every object the manifest lists must be in the store with its size and checksum, before anything is
    downloaded."""
    bad = [e["name"] for e in manifest["files"] if not _remote_matches(s3, spec, prefix + e["name"], e)]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise QuantflowError(
            f"{uri}: {len(bad)} of the {len(manifest['files'])} files its manifest lists are missing from the store "
            f"or differ from it: {shown}",
            "re-upload the artifact from its source (an upload repairs what is missing)",
        )


def content_hash_of(manifest_files: list[dict]) -> str:
    """A short hash of the artifact's file list (names, sizes, sha256)."""
    return hashlib.sha256(json.dumps(manifest_files, sort_keys=True).encode()).hexdigest()[:16]


LINK_EXPIRES_S = 7 * 24 * 3600  # SigV4's longest


def presigned_url(spec: StoreSpec, uri: str, name: str, expires_s: int = LINK_EXPIRES_S) -> str:
    """An https link to ``name`` under artifact ``uri`` that a browser opens without keys (signed locally, for a
    week)."""
    bucket, prefix = parse_uri(uri)
    try:
        return client(spec).generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": prefix + name}, ExpiresIn=expires_s
        )
    except Exception as error:
        raise _explain(error, spec) from None
