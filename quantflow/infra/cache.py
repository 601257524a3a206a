"""Content-addressed step results: a finished step is a folder whose name is the hash of its inputs.

A step writes into a temporary sibling folder and renames it into place only when it
finished, so a crashed run leaves nothing that a later run would mistake for a result,
and a re-run with the same inputs finds the folder and skips the work.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from quantflow.infra.atomic import atomic_files, atomic_folder
from quantflow.infra.home import quantflow_home

RESULT_FILE = "result.json"
T = TypeVar("T", bound=BaseModel)


def default_cache_root() -> Path:
    """``$QUANTFLOW_HOME/cache``, else ``~/.cache/quantflow/cache``."""
    return quantflow_home() / "cache"


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (Pydantic models are dumped first)."""
    normal = [part.model_dump(mode="json") if isinstance(part, BaseModel) else part for part in parts]
    blob = json.dumps(normal, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class StepCache:
    """Finished step folders under ``root/<step>/<key>/`` with a ``result.json`` record.

    A ``read_only`` cache only serves finished results: a run that gathers what other
    workers computed must fail loudly, not silently redo their work, when a result is missing.
    """

    def __init__(self, root: Path, read_only: bool = False) -> None:
        self.root = Path(root)
        self.read_only = read_only

    def folder(self, step: str, key: str) -> Path:
        return self.root / step / key

    def file_digest(self, path: Path) -> str:
        """sha256 of a file, remembered by its path, size, modification time and inode.

        Fingerprinting a local model reads all its weights (9.6 s for a 2.2 GB 1.1B model on an H200
        host, on every run); like git's index and rsync, a file whose size and nanosecond mtime are
        unchanged is taken as unchanged, so a re-run reads nothing.
        """
        stat = Path(path).stat()
        memo = (
            self.root / "digests" / content_key(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
        )
        if memo.is_file():
            return memo.read_text()
        digest = file_sha256(Path(path))
        with atomic_files(memo.parent) as scratch:
            (scratch / memo.name).write_text(digest)
        return digest

    def lookup(self, step: str, key: str, record: type[T]) -> T | None:
        result = self.folder(step, key) / RESULT_FILE
        if not result.is_file():
            return None
        return record.model_validate_json(result.read_text())

    @contextmanager
    def writing(self, step: str, key: str) -> Iterator[Path]:
        """Yield a scratch folder; on success it becomes the step's folder atomically.

        A concurrent run that finished the same work first keeps its folder (same inputs, same result).
        """
        with atomic_folder(self.folder(step, key), if_exists="keep") as scratch:
            yield scratch
            if not (scratch / RESULT_FILE).is_file():
                raise RuntimeError(f"step {step} finished without writing {RESULT_FILE}")

    @staticmethod
    def save(folder: Path, record: BaseModel) -> None:
        (folder / RESULT_FILE).write_text(record.model_dump_json(indent=2))
