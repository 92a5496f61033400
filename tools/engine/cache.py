"""The step cache: each build step's output files, kept under a key made of everything that
decides them, so an unchanged step is never run twice and a killed build resumes.

A key is the SHA-256 of the step's kind, its options, the keys of the steps it reads from
(which carry the content of every input file back to the first step: a checkpoint or
pipeline file is keyed by its bytes) and the fingerprint of the code: this package's
sources and the versions of the packages that compute anything. Keys are known before a
step runs, so a build sees at its start which steps it will skip.

An entry is a directory ``<cache>/<kind>/<key>/`` holding the step's files, its metadata
(``meta.pkl``) and ``entry.json``, which lists every file with its size and SHA-256. It is
assembled in a temporary directory and renamed into place last: a build killed at any
moment leaves either a whole entry or none. An entry is read only after every file has
been hashed again and found equal to ``entry.json``: a damaged entry is removed and its
step runs again. Files go between the build directory and the cache as hard links, so an
entry costs no disk beside the output it came from; editing an output file in place thus
damages its entry, which the next build notices and rebuilds.

One build at a time holds a cache (an advisory lock, released by the kernel even when the
process is killed). After a successful build, entries it did not use are removed, oldest
use first, until the cache is at most twice the size of the entries the build used (or
:data:`KEEP_AT_LEAST` bytes, whichever is more).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

from neodragon_npu.graphs.onnx_io import is_external_data, sha256

logger = logging.getLogger("neodragon_npu")

ENTRY = "entry.json"
META = "meta.pkl"
LOCK = "lock"
SUFFIX = ".cache"  # the default cache of output DIR is DIR.cache beside it
# Packages whose versions decide a step's result (the graph, the weights, the binary).
PACKAGES = ("torch", "onnx", "onnx-ir", "onnxscript", "onnxruntime-qnn", "onnxruntime", "aimet-onnx", "numpy",
            "transformers", "diffusers", "safetensors")
# A build reads this environment variable at the named points and kills itself there with
# SIGKILL: how the tests interrupt a build at an exact place without timing.
KILL_AT_ENV = "NEODRAGON_NPU_KILL_AT"
# Entries a build did not use are kept up to this size however small the build.
KEEP_AT_LEAST = 2 << 30


class CacheError(RuntimeError):
    pass


# the entries used so far by the builds of one command that makes several (a bundle)
_SHARED_RUN: contextvars.ContextVar[set | None] = contextvars.ContextVar("cache_shared_run", default=None)


@contextlib.contextmanager
def shared_run() -> Iterator[set]:
    """Builds run inside share the cache as one: none evicts the entries of another (the
    next build of a bundle would otherwise evict the one before, and a rerun would redo
    it). Yields the set of entries they used, which the caller evicts around once at the
    end (:meth:`StepCache.finish` with ``used``)."""
    used: set = set()
    token = _SHARED_RUN.set(used)
    try:
        yield used
    finally:
        _SHARED_RUN.reset(token)


def kill_point(name: str) -> None:
    """Die here, as ``kill -9`` would, if the test hook names this point."""
    if os.environ.get(KILL_AT_ENV) == name:
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def default_cache_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir).absolute()
    return out.with_name(out.name + SUFFIX)


_FINGERPRINT: str | None = None


def code_fingerprint() -> str:
    """SHA-256 of this package's Python sources, the Python version and :data:`PACKAGES`'
    versions. Any change to any of them invalidates every entry: coarse, and never stale."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        from importlib import metadata

        import neodragon_npu

        digest = hashlib.sha256(sys.version.encode())
        for name in PACKAGES:
            try:
                digest.update(f"{name}=={metadata.version(name)}\n".encode())
            except metadata.PackageNotFoundError:
                digest.update(f"{name} absent\n".encode())
        for root in sorted({Path(p).resolve() for p in neodragon_npu.__path__} | _subpackage_roots()):
            for path in sorted(root.rglob("*.py")):
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
        _FINGERPRINT = digest.hexdigest()
    return _FINGERPRINT


def _subpackage_roots() -> set[Path]:
    # the top-level folders install as neodragon_npu.<name> through package_dir, so they
    # are not under neodragon_npu's own folder
    import importlib

    roots = set()
    for name in ("passes", "kernels", "graphs", "neodragon_models", "tools"):
        module = importlib.import_module(f"neodragon_npu.{name}")
        roots.update(Path(p).resolve() for p in module.__path__)
    return roots


def _canonical(value: Any) -> Any:
    """``value`` as plain JSON, files replaced by their content's digest."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"@": type(value).__name__, **{f.name: _canonical(getattr(value, f.name))
                                             for f in dataclasses.fields(value)}}
    if isinstance(value, Path):
        if value.is_file():
            return {"file_sha256": sha256(value)}
        if value.is_dir():
            return {"dir": {str(p.relative_to(value)): sha256(p) for p in sorted(value.rglob("*")) if p.is_file()}}
        return {"path": str(value)}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise TypeError(f"cannot key a step on a {type(value).__name__}")


def step_key(kind: str, **parts: Any) -> str:
    """The key of a step of ``kind`` whose result depends on ``parts`` (options, upstream
    keys, input files as :class:`Path`) and on the code."""
    text = json.dumps({"kind": kind, "code": code_fingerprint(), **_canonical(parts)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _place(src: Path, dst: Path) -> None:
    """``dst`` becomes the same file as ``src``: a hard link, or a copy across file systems.
    An ONNX external-data file is always copied: onnx and onnx_ir refuse to read one with
    several links (they take it for a hard-link attack). Models are saved with inline weights
    up to ``onnx_io.INLINE_LIMIT_BYTES``, so only models larger than that are copied."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    if is_external_data(src):
        shutil.copyfile(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _hash_all(paths: list[Path]) -> list[str]:
    # hashlib releases the GIL on large blocks: one thread per core
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(sha256, paths))


@dataclasses.dataclass
class Entry:
    kind: str
    key: str
    path: Path
    files: dict[str, tuple[int, str]]  # relative path -> (bytes, sha256)
    meta: Any

    @property
    def bytes(self) -> int:
        return sum(size for size, _ in self.files.values())

    def place(self, work: Path, digests=None) -> None:
        """Link the entry's files into ``work`` under their relative paths."""
        for rel, (_, digest) in self.files.items():
            _place(self.path / rel, work / rel)
            if digests is not None:
                digests.record(work / rel, digest)


class StepCache:
    """Entries under ``root`` (see the module docstring). With ``root=None`` nothing is
    stored or found, and the build runs every step as before."""

    def __init__(self, root: str | Path | None, digests=None) -> None:
        self.root = Path(root).absolute() if root is not None else None
        self.digests = digests
        self.used: set[tuple[str, str]] = set()  # (kind, key) of the entries this build read or wrote
        self.hits: dict[tuple[str, str], None] = {}  # entries this build took from the cache, in order
        self._lock_file = None
        self._sealer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-seal")

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def __enter__(self) -> "StepCache":
        if self.enabled:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.root / LOCK, "a+")
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock_file.close()
                raise CacheError(f"another build is using the cache {self.root}; wait for it, or give "
                                 "--cache-dir another directory") from None
            self._remove_debris()
        return self

    def __exit__(self, *exc) -> None:
        self._sealer.shutdown(wait=True)
        if self._lock_file is not None:
            # a build that failed before finishing any step leaves no empty cache behind
            if not list_entries(self.root):
                shutil.rmtree(self.root, ignore_errors=True)
            self._lock_file.close()

    def _remove_debris(self) -> None:
        # entries a killed build was assembling: never renamed into place, never valid
        for tmp in self.root.glob("*/.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def _dir(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    # reading --------------------------------------------------------------------------
    def has(self, kind: str, key: str) -> bool:
        """Whether a finished entry exists, unchecked: to decide what to prepare (a model to
        load). The step itself takes the entry with :meth:`get`, which checks it."""
        return self.enabled and (self._dir(kind, key) / ENTRY).is_file()

    def get(self, kind: str, key: str) -> Entry | None:
        """The finished entry for (``kind``, ``key``) with every file checked, or None."""
        if not self.enabled:
            return None
        path = self._dir(kind, key)
        try:
            record = json.loads((path / ENTRY).read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as err:
            return self._damaged(kind, key, f"its {ENTRY} is unreadable ({err})")
        files = {rel: (size, digest) for rel, (size, digest) in record["files"].items()}
        paths = [path / rel for rel in files]
        for rel, p in zip(files, paths):
            if not p.is_file() or p.stat().st_size != files[rel][0]:
                return self._damaged(kind, key, f"{rel} is missing or has the wrong size")
        for rel, digest in zip(files, _hash_all(paths)):
            if digest != files[rel][1]:
                return self._damaged(kind, key, f"{rel} has changed since it was stored")
        meta = pickle.loads((path / META).read_bytes()) if (path / META).is_file() else None
        os.utime(path)  # its last use, for the eviction order
        self.used.add((kind, key))
        self.hits[kind, key] = None
        return Entry(kind, key, path, {rel: tuple(v) for rel, v in files.items() if rel != META}, meta)

    def _damaged(self, kind: str, key: str, why: str) -> None:
        logger.warning("      the cached %s step %s is damaged (%s): removed, the step runs again", kind, key[:12], why)
        shutil.rmtree(self._dir(kind, key), ignore_errors=True)
        return None

    # writing --------------------------------------------------------------------------
    def put(self, kind: str, key: str, work: Path, files: Iterable[str | Path], meta: Any = None,
            background: bool = False):
        """Store ``files`` (paths inside ``work``, or relative to it) and ``meta`` as the
        finished entry (``kind``, ``key``). With ``background``, the hashing and the rename
        happen on a thread (the files must not change meanwhile); returns its future."""
        rels = [str(Path(f).relative_to(work) if Path(f).is_absolute() else Path(f)) for f in files]
        if not self.enabled:
            if self.digests is not None:
                self.digests.start(work / rel for rel in rels)
            return None
        staging = self.root / kind
        staging.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=staging))
        for rel in rels:
            _place(work / rel, tmp / rel)
        (tmp / META).write_bytes(pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL))
        self.used.add((kind, key))
        if background:
            return self._sealer.submit(self._seal, kind, key, tmp, work, rels)
        self._seal(kind, key, tmp, work, rels)
        return None

    def _seal(self, kind: str, key: str, tmp: Path, work: Path, rels: list[str]) -> None:
        every = rels + [META]
        digests = _hash_all([tmp / rel for rel in every])
        record = {"kind": kind, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "files": {rel: [(tmp / rel).stat().st_size, d] for rel, d in zip(every, digests)}}
        (tmp / ENTRY).write_text(json.dumps(record, indent=1) + "\n")
        kill_point(f"sealing:{kind}")
        final = self._dir(kind, key)
        if final.exists():  # an entry a damaged-check removed concurrently, or the same result again
            shutil.rmtree(final)
        os.rename(tmp, final)
        if self.digests is not None:
            for rel, digest in zip(rels, digests):
                self.digests.record(work / rel, digest)
        kill_point(f"sealed:{kind}")

    def reuse(self, entry: Entry, work: Path, what: str = "") -> Entry:
        """Place ``entry``'s files in ``work`` (their digests go to the manifest's) and say so."""
        entry.place(work, self.digests)
        logger.info("      %s: reused from the cache (%s, %s)", what or entry.kind, entry.key[:12], _size(entry.bytes))
        return entry

    def take(self, kind: str, key: str, work: Path, what: str = "") -> Entry | None:
        """:meth:`get`, then :meth:`reuse` if found."""
        entry = self.get(kind, key)
        return None if entry is None else self.reuse(entry, work, what)

    def run(self, kind: str, key: str, work: Path, compute, what: str = ""):
        """The step (``kind``, ``key``): its files placed in ``work`` and its metadata from
        the cache, or ``compute()`` -> (files, metadata) run and stored. Returns the metadata."""
        entry = self.take(kind, key, work, what)
        if entry is not None:
            return entry.meta
        files, meta = compute()
        self.put(kind, key, work, files, meta)
        return meta

    def drop(self, kind: str, key: str, after_pending: bool = False) -> None:
        """Remove an entry; with ``after_pending``, once the entries handed to the
        background before this call are stored."""
        if not self.enabled:
            return
        if after_pending:
            self._sealer.submit(self.drop, kind, key)
            return
        self.used.discard((kind, key))
        shutil.rmtree(self._dir(kind, key), ignore_errors=True)

    def wait(self) -> None:
        """Until every entry handed to the background is stored."""
        self._sealer.submit(lambda: None).result()

    # housekeeping --------------------------------------------------------------------
    def summary(self) -> dict:
        """What this build took from the cache, for the manifest."""
        reused: dict[str, int] = {}
        for kind, _ in self.hits:
            reused[kind] = reused.get(kind, 0) + 1
        return {"dir": str(self.root), "reused": reused} if self.enabled else {"dir": None}

    def finish(self, used: set | None = None) -> str:
        """After a successful build: evict (see :meth:`evict_unused`; ``used``: entries
        other builds of the same command used too) and say where the cache stands, in one
        line. Inside :func:`shared_run`, only note what this build used."""
        if not self.enabled:
            return "no step cache (--no-cache)"
        self.wait()
        shared = _SHARED_RUN.get()
        if shared is not None:
            shared |= self.used
            return f"step cache {self.root}: {len(self.hits)} step(s) reused"
        self.used |= used or set()
        total, removed = self.evict_unused()
        line = (f"step cache {self.root}: {_size(total)}, {len(self.hits)} step(s) reused"
                + (f"; removed {_size(removed)} of entries this build did not use" if removed else ""))
        return line + " (`neodragon-npu cache clean` empties it)"

    def evict_unused(self, keep_at_least: int = KEEP_AT_LEAST) -> tuple[int, int]:
        """Remove entries this build did not use, oldest use first, while the cache is over
        twice the size of those it used and over ``keep_at_least``. Returns (bytes kept,
        bytes removed)."""
        if not self.enabled:
            return 0, 0
        entries = list_entries(self.root)
        used = sum(e["bytes"] for e in entries if (e["kind"], e["key"]) in self.used)
        total, removed = sum(e["bytes"] for e in entries), 0
        for e in sorted(entries, key=lambda e: e["last_used"]):
            if total <= max(2 * used, keep_at_least):
                break
            if (e["kind"], e["key"]) in self.used:
                continue
            shutil.rmtree(self._dir(e["kind"], e["key"]), ignore_errors=True)
            total -= e["bytes"]
            removed += e["bytes"]
        return total, removed


def list_entries(root: str | Path) -> list[dict]:
    """Every finished entry under ``root``: kind, key, bytes, files, last use (epoch s)."""
    rows = []
    for path in sorted(Path(root).glob("*/*")):
        if path.name.startswith(".") or not (path / ENTRY).is_file():
            continue
        try:
            record = json.loads((path / ENTRY).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        rows.append({"kind": path.parent.name, "key": path.name, "files": len(record["files"]),
                     "bytes": sum(size for size, _ in record["files"].values()),
                     "last_used": path.stat().st_mtime})
    return rows


def is_cache(root: Path) -> bool:
    return (root / LOCK).exists()


def cache_bytes(root: str | Path) -> int:
    """The bytes of every finished entry under ``root``."""
    return sum(r["bytes"] for r in list_entries(root))


def describe(root: str | Path) -> str:
    """A readable size report of the cache at ``root``."""
    root = Path(root)
    rows = list_entries(root)
    by_kind: dict[str, list[dict]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    lines = [f"cache {root}: {len(rows)} entries, {_size(sum(r['bytes'] for r in rows))}"]
    for kind, group in sorted(by_kind.items()):
        newest = max(r["last_used"] for r in group)
        lines.append(f"  {kind:<14} {len(group):4d} entries {_size(sum(r['bytes'] for r in group)):>10}   "
                     f"last used {time.strftime('%Y-%m-%d %H:%M', time.localtime(newest))}")
    lines.append("  (files shared with a build directory by hard links count in both; "
                 "`neodragon-npu cache clean` empties it)")
    return "\n".join(lines)


def clean(root: str | Path) -> int:
    """Remove every entry under ``root`` (refused while a build holds it); bytes freed."""
    root = Path(root)
    if not is_cache(root):
        raise CacheError(f"{root} is not a neodragon-npu cache (it has no {LOCK} file)")
    freed = sum(r["bytes"] for r in list_entries(root))
    with open(root / LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(f"a build is using the cache {root}; clean it when the build has ended") from None
        for path in root.iterdir():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
    return freed


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def cache_root(out_dir: str | Path, cache_dir: str | Path | None, enabled: bool) -> Path | None:
    """Where a build into ``out_dir`` keeps its cache: ``cache_dir`` if given, else
    ``<out_dir>.cache`` beside it; None without a cache."""
    if not enabled:
        return None
    return Path(cache_dir).absolute() if cache_dir is not None else default_cache_dir(out_dir)
