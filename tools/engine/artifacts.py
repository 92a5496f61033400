"""Build directories: staged atomically, described by a manifest.

A build writes into a hidden sibling directory and renames it into place only when every
step succeeded, so a failed or interrupted build leaves nothing half-written. An existing
output directory is only ever replaced when it holds a previous build of this tool.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

from neodragon_npu.tools.engine.host import describe_host
from neodragon_npu.graphs.onnx_io import sha256

logger = logging.getLogger("neodragon_npu")

MANIFEST = "manifest.json"
TOOL = "neodragon-npu"


class OutputDirError(ValueError):
    pass


def _is_our_build(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("tool") == TOOL
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def check_output_dir(path: str | Path) -> Path:
    """Refuse an output directory that holds anything but a previous build of this tool."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output path {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not _is_our_build(path):
        raise OutputDirError(
            f"output directory {path} is not empty and holds no {TOOL} build; "
            "choose an empty or new directory"
        )
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def remove_leftovers(path: Path) -> list[tuple[Path, int]]:
    """Remove the staging directories that killed builds into ``path`` left behind (their
    process is gone); returns each with its size. A running build's is left alone."""
    removed = []
    for stage in path.parent.glob(f".{path.name}.partial-*"):
        pid = stage.name[len(f".{path.name}.partial-"):].split("-")[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        size = _tree_bytes(stage)
        shutil.rmtree(stage, ignore_errors=True)
        removed.append((stage, size))
    return removed


@contextlib.contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh staging directory; on success it replaces ``path`` atomically."""
    path = check_output_dir(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    for stage, size in remove_leftovers(path):
        logger.info("      removed %s, which a killed build left (%.2f GB; its finished steps are in the cache, "
                    "if it had one)", stage.name, size / 1e9)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-{os.getpid()}-", dir=path.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, old)
    os.rename(stage, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class Digests:
    """SHA-256 of files hashed ahead of the manifest, on one background thread (e.g. while
    the build waits for its last compile). A digest is used only if the file's size and
    modification time are still those seen before it was hashed; otherwise the manifest
    hashes the file again."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._pending: dict[Path, tuple[tuple[int, int], Future]] = {}

    def __enter__(self) -> "Digests":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def start(self, paths: Iterable[Path]) -> None:
        for path in paths:
            path = Path(path)
            if path not in self._pending:
                self._pending[path] = (_stamp(path), self._pool.submit(sha256, path))

    def record(self, path: Path, digest: str) -> None:
        """A digest known already (the step cache hashed the file as it stored or read it)."""
        done: Future = Future()
        done.set_result(digest)
        self._pending[Path(path)] = (_stamp(Path(path)), done)

    def get(self, path: Path) -> str | None:
        """The digest of ``path`` if it was hashed ahead and has not changed since. A hash
        still queued is cancelled (None): the caller hashes it, on all cores, instead of
        waiting for this one thread."""
        stamp, future = self._pending.get(Path(path), (None, None))
        if future is None or future.cancel() or future.exception() is not None or stamp != _stamp(path):
            return None
        return future.result()


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def file_entries(root: Path, digests: Digests | None = None) -> list[dict]:
    """Every file under ``root`` (but the manifest) with its size and SHA-256."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    known = {f: digests.get(f) for f in files} if digests is not None else {}
    todo = [f for f in files if known.get(f) is None]
    # hashlib releases the GIL on large reads: one thread per core (the manifest step of a
    # full-size build, 40 GB, took 66 s with one thread and 55 s with two, in two builds)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        known.update(zip(todo, pool.map(sha256, todo)))
    return [{"path": str(f.relative_to(root)), "bytes": f.stat().st_size, "sha256": known[f]} for f in files]


def write_manifest(root: Path, manifest: dict, digests: Digests | None = None) -> Path:
    """``manifest`` with the tool's name, the machine it ran on (unless it names one) and
    every file of ``root``."""
    host = manifest.get("host") or describe_host()  # the flows record theirs when they start
    manifest = {"tool": TOOL, "host": host, **manifest, "files": file_entries(root, digests)}
    out = root / MANIFEST
    out.write_text(json.dumps(manifest, indent=2) + "\n")
    return out
