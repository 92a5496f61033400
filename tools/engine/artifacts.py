"""Output directories: staged atomically, described by a manifest, owned file by file.

A command writes into a hidden sibling directory and renames it into place only when every
step succeeded, so a failed or interrupted command leaves nothing half-written. An existing
output directory is replaced only when this tool wrote it for the same kind of output (a
build, an importance run), and then only the files its manifest lists: files a user added
are carried over. Anything else is refused before the work starts (``--force`` writes into
it anyway, still keeping the files this tool did not write). A command never writes over its
own inputs.
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
from typing import Iterable, Iterator, Mapping

from neodragon_npu.tools.engine.host import describe_host
from neodragon_npu.graphs.onnx_io import sha256

logger = logging.getLogger("neodragon_npu")

MANIFEST = "manifest.json"
TOOL = "neodragon-npu"
KEPT_SUFFIX = ".kept"  # a file a user added whose name a new output now takes
KINDS = {"build": "a build", "importance": "an importance run", "bundle": "a bundle"}  # outputs, as messages name them


class OutputDirError(ValueError):
    pass


def read_manifest(path: Path) -> dict | None:
    """The manifest of an output of this tool in ``path``, or None."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("tool") == TOOL else None


def output_kind(manifest: dict) -> str:
    """What an output directory holds: "build" or "importance" (manifests from before the
    kind was recorded are told apart by their pipeline)."""
    return manifest.get("output") or ("importance" if manifest.get("pipeline") == "importance" else "build")


def within(inner: str | Path, outer: str | Path) -> bool:
    """``inner`` is ``outer`` or lies inside it (symlinks resolved)."""
    inner, outer = Path(inner).resolve(), Path(outer).resolve()
    return inner == outer or outer in inner.parents


def check_output_dir(path: str | Path, kind: str = "build", *, inputs: Mapping[str, object] | None = None,
                     force: bool = False, flag: str = "-o") -> Path:
    """Refuse, before any work, an output directory this command may not replace: a file, the
    current directory (or one holding it), a directory holding one of ``inputs`` (flag ->
    path) or, unless ``force``, a non-empty directory that holds no output of this tool of
    the same ``kind``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{flag} {path} is a file, not a directory; choose another {flag}")
    if within(Path.cwd(), path):
        raise OutputDirError(f"{flag} {path} is the current directory or holds it, and the output directory is "
                             f"replaced when the command succeeds; choose a new directory, e.g. {flag} "
                             f"{Path(path) / 'out'}")
    for name, value in (inputs or {}).items():
        if value is not None and within(Path(str(value)), path):
            raise OutputDirError(f"{name} {value} lies inside the output directory {path}, which this command "
                                 f"replaces; move it or choose another {flag}")
    if path.is_dir() and any(path.iterdir()) and not force:
        manifest = read_manifest(path)
        if manifest is None:
            raise OutputDirError(f"{flag} {path} is not empty and holds no {TOOL} output; choose a new or empty "
                                 f"directory, or add --force to write into it (its files are kept)")
        if output_kind(manifest) != kind:
            found = KINDS.get(output_kind(manifest), output_kind(manifest))
            raise OutputDirError(f"{flag} {path} holds {found} of {TOOL}, not {KINDS.get(kind, kind)}; "
                                 f"choose another {flag}, or add --force to replace it (files it did not write "
                                 f"are kept)")
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


def _dead_siblings(path: Path, tag: str) -> Iterator[Path]:
    """``.NAME.<tag>-PID-*`` siblings of ``path`` whose process is gone."""
    prefix = f".{path.name}.{tag}-"
    for found in sorted(path.parent.glob(prefix + "*")):
        pid = found.name[len(prefix):].split("-")[0]
        if not (pid.isdigit() and _alive(int(pid))):
            yield found


def remove_leftovers(path: Path) -> list[tuple[Path, int]]:
    """Clean up after commands killed while writing ``path``: their staging directories are
    removed (returned with their sizes); a previous output a command was killed while
    replacing is put back if nothing took its place, else removed (the files a user added
    were linked into the new output before the swap). A running command's are left alone."""
    removed = []
    for stage in _dead_siblings(path, "partial"):
        size = _tree_bytes(stage)
        shutil.rmtree(stage, ignore_errors=True)
        removed.append((stage, size))
    for old in _dead_siblings(path, "old"):
        if not path.exists():
            os.rename(old, path)
            logger.warning("restored %s, which a command killed while replacing it had set aside", path)
        else:
            shutil.rmtree(old, ignore_errors=True)
    return removed


def _user_files(path: Path) -> list[Path]:
    """Files under ``path`` its manifest does not list (the manifest itself aside): what a
    user added. Every file, if no manifest of this tool is there."""
    if not path.is_dir():
        return []
    manifest = read_manifest(path) or {}
    ours = {MANIFEST} | {f.get("path") for f in manifest.get("files", []) if isinstance(f, dict)}
    return sorted(p for p in path.rglob("*") if (p.is_file() or p.is_symlink())
                  and str(p.relative_to(path)) not in ours)


def _carry_over(path: Path, stage: Path) -> list[str]:
    """Link the files a user added to ``path`` into ``stage`` (a name the new output took
    gets KEPT_SUFFIX); returns their relative paths as placed."""
    placed = []
    for src in _user_files(path):
        dst = stage / src.relative_to(path)
        while dst.exists() or dst.is_symlink():
            dst = dst.with_name(dst.name + KEPT_SUFFIX)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            shutil.copy2(src, dst, follow_symlinks=False)
        placed.append(str(dst.relative_to(stage)))
    return placed


@contextlib.contextmanager
def staged_dir(path: str | Path, kind: str = "build", *, inputs: Mapping[str, object] | None = None,
               force: bool = False) -> Iterator[Path]:
    """Yield a fresh staging directory; on success it replaces ``path`` atomically, with the
    files a user had added to ``path`` carried over (see :func:`check_output_dir`)."""
    path = check_output_dir(path, kind, inputs=inputs, force=force).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    for stage, size in remove_leftovers(path):
        logger.info("      removed %s, which a killed command left (%.2f GB; a build's finished steps are in "
                    "its cache, if it had one)", stage.name, size / 1e9)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-{os.getpid()}-", dir=path.parent))
    try:
        yield stage
        kept = _carry_over(path, stage)
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
    if kept:
        shown = ", ".join(kept[:5]) + (f" (+{len(kept) - 5} more)" if len(kept) > 5 else "")
        logger.info("      kept %d file(s) this tool did not write in %s: %s", len(kept), path, shown)


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


def write_manifest(root: Path, manifest: dict, digests: Digests | None = None, *, kind: str = "build") -> Path:
    """``manifest`` with the tool's name, the kind of output, the machine it ran on (unless
    it names one) and every file of ``root`` (the files this tool owns there)."""
    host = manifest.get("host") or describe_host()  # the flows record theirs when they start
    manifest = {"tool": TOOL, "output": kind, "host": host, **manifest, "files": file_entries(root, digests)}
    out = root / MANIFEST
    out.write_text(json.dumps(manifest, indent=2) + "\n")
    return out
