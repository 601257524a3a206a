"""Write a folder in full beside its final place, then rename it there: readers see all of it or none.

Every writer of a folder that a user or a later run reads (step results, delivered variants,
pulled artifacts, converted models) goes through ``atomic_folder``. Scratch names carry the
host and process id, so a later writer can remove what a killed process left behind: the
killed process itself gets no chance to clean up.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

IfExists = Literal["keep", "replace", "error"]


def host_tag() -> str:
    """This host's name as a short dash-free tag (host names may contain dashes; scratch names are split on them)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def scratch_path(target: Path) -> Path:
    """``.tmp-<name>-<host>-<pid>-<random>`` beside ``target``."""
    return target.parent / f".tmp-{target.name}-{host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_orphans(folder: Path) -> list[Path]:
    """Delete scratch folders left by dead processes of this host (other hosts' are left alone)."""
    removed, here = [], host_tag()
    for scratch in folder.glob(".tmp-*"):
        parts = scratch.name.rsplit("-", 3)  # .tmp-<name>-<host>-<pid>-<random>
        if len(parts) == 4 and parts[1] == here and parts[2].isdigit() and not _alive(int(parts[2])):
            shutil.rmtree(scratch, ignore_errors=True)
            removed.append(scratch)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def atomic_folder(target: Path, if_exists: IfExists = "error") -> Iterator[Path]:
    """Yield a scratch folder that becomes ``target`` when the block ends without an error.

    ``if_exists`` says what a finished block does when ``target`` is already there: ``keep`` it
    (a concurrent writer of the same content won), ``replace`` it (the old copy stays whole until
    the new one is in place), or raise ``FileExistsError``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(target.parent)
    scratch = scratch_path(target)
    scratch.mkdir()
    try:
        yield scratch
        _place(scratch, target, if_exists)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _place(scratch: Path, target: Path, if_exists: IfExists) -> None:
    if not target.exists():
        scratch.rename(target)
    elif if_exists == "error":
        raise FileExistsError(target)
    elif if_exists == "replace":
        old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
        target.rename(old)
        scratch.rename(target)
        shutil.rmtree(old)


@contextmanager
def atomic_files(folder: Path) -> Iterator[Path]:
    """Yield a scratch folder whose files replace their namesakes in ``folder``, each whole, when the block succeeds.

    For a set of files that live among others (a report beside the variant folders) rather
    than a folder of their own.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scratch = scratch_path(folder / "files")
    scratch.mkdir()
    try:
        yield scratch
        for path in sorted(scratch.iterdir()):
            path.replace(folder / path.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
