"""onnxruntime sessions: float CPU reference, the QNN HTP compiler and the x86 HTP simulator.

onnxruntime-qnn is a plugin execution provider: its library is registered once per process
and attached to a session through an EP device. Every HTP session here disables the CPU
fallback, so a graph either runs entirely through the HTP path or fails loudly.

A context binary is written by creating a session with ``ep.context_enable=1``: the QNN EP
prepares (compiles) the graph for the target's HTP arch and SoC and writes
``<name>_ctx.onnx`` (one EPContext node) plus ``<name>_ctx_qnn.bin``. Loading that
EPContext model back on the simulator needs the same ``htp_arch``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from neodragon_npu.graphs.targets import Target, get_target

_QNN_EP = "QNNExecutionProvider"
_registered = False
_thread_limit: int | None = None  # set by thread_limit()

# The QNN HTP compiler allocates and frees small objects at a high rate: under perf, malloc
# and free took about a fifth of a compile's samples. Preloading jemalloc into the compile
# workers, a 2-block full-width partition's three stage graphs compiled in 48.0 and 49.8 s
# against 60.4 and 64.9 s with glibc's malloc (tcmalloc 47.2 s, TBB's malloc 59-60 s), into
# the same binary bit for bit.
ALLOCATOR_ENV = "NEODRAGON_NPU_COMPILE_MALLOC"
_SYSTEM_ALLOCATORS = ("jemalloc", "tcmalloc_minimal")


def _qnn_devices():
    global _registered
    import onnxruntime_qnn

    if not _registered:
        try:
            ort.register_execution_provider_library(_QNN_EP, onnxruntime_qnn.get_library_path())
        except Exception as exc:  # already registered by someone else in this process
            if "already registered" not in str(exc).lower():
                raise
        _registered = True
    devices = [d for d in ort.get_ep_devices() if d.ep_name == _QNN_EP]
    if not devices:
        raise RuntimeError("onnxruntime-qnn is installed but exposes no QNN EP device")
    return devices


def qnn_provider_options(target: Target) -> dict[str, str]:
    import onnxruntime_qnn

    return {
        "backend_path": onnxruntime_qnn.get_qnn_htp_path(),
        "htp_arch": str(target.htp_arch),
        "soc_model": str(target.soc_model),
        "htp_graph_finalization_optimization_mode": "3",
    }


@contextlib.contextmanager
def _native_stdout_silenced():
    """The QNN libraries print a banner on the process's stdout when a backend loads."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def thread_limit(threads: int | None):
    """At most ``threads`` threads for this process's numerical work meanwhile: torch, the
    BLAS behind numpy and scipy, and the onnxruntime sessions created (aimet's through
    :func:`session_threads`). ``None`` changes nothing.

    For work beside a QNN compile in a worker process, which is single-threaded: two threads
    here and the compile's one share two cores. A full-size stage-2 partition
    compiled in 88.6 s alone, 141.4 s beside aimet's calibration of a merged partition on
    two threads (114.7 s) and 119.5 s beside the same on one thread (107.0 s; 76.9 s alone on
    two): on one thread both finished sooner. (In the full-size build the gain did not show
    against this machine's hour-to-hour variation; the quantize step's peak fell from
    15.08 to 13.88 GB.)"""
    global _thread_limit
    if threads is None:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    saved = _thread_limit, torch.get_num_threads()
    _thread_limit = threads
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        _thread_limit = saved[0]
        torch.set_num_threads(saved[1])


def session_threads(threads: int | None = None) -> int | None:
    """The intra-op thread count for a new onnxruntime session: ``threads`` if given, else the
    :func:`thread_limit` in force (None: onnxruntime's default, one per core)."""
    return threads or _thread_limit


def _session_options(threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3  # warnings from the EP about Windows-only features are noise here
    threads = session_threads(threads)
    if threads:
        so.intra_op_num_threads = threads
    return so


def cpu_session_options(threads: int | None = None) -> ort.SessionOptions:
    """Options for running float and QDQ graphs on the CPU EP as written.

    onnxruntime's CPU EP otherwise fuses DequantizeLinear(int8 weight) -> MatMul into
    MatMulNBits at accuracy level 4, which quantizes the activation to int8 on the fly: a
    W8A16 graph then runs as W8A8 and no longer simulates what the NPU computes. Measured on
    the first transformer partition of the full-size stage 0: 34.2 dB fused against 36.7 dB
    as written; the full 18-block chain 31.65 / 31.44 / 31.02 dB against
    32.57 / 32.31 / 31.73 dB (stages 0 / 1 / 2); that partition ran in 0.7 s against 0.6 s."""
    so = _session_options(threads)
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    return so


def cpu_session(path: str | Path | bytes, *, threads: int | None = None) -> ort.InferenceSession:
    """Session on the CPU EP: the float reference, or aimet's QDQ simulation of a quantized
    graph (see :func:`cpu_session_options`). ``path`` may also be a serialized model."""
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=cpu_session_options(threads), providers=["CPUExecutionProvider"])


def htp_session(path: str | Path, target: Target) -> ort.InferenceSession:
    """Session on the HTP (the x86 simulator here) with CPU fallback disabled."""
    so = _session_options()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.add_provider_for_devices(_qnn_devices(), qnn_provider_options(target))
    with _native_stdout_silenced():
        return ort.InferenceSession(str(path), sess_options=so)


def compile_allocator() -> str | None:
    """The malloc library compile workers preload (see :data:`ALLOCATOR_ENV`): the path in
    ``$NEODRAGON_NPU_COMPILE_MALLOC`` ("glibc": none), else the jemalloc ``make setup`` unpacks
    into the environment (``<venv>/jemalloc``), else a jemalloc or tcmalloc installed on the
    system; None when there is none (glibc's malloc: the same binaries, compiled slower)."""
    choice = os.environ.get(ALLOCATOR_ENV, "").strip()
    if choice == "glibc":
        return None
    if choice:
        if not Path(choice).is_file():
            raise ValueError(f"{ALLOCATOR_ENV}={choice}: no such file (give a malloc library's path, or 'glibc')")
        return choice
    unpacked = sorted(Path(sys.prefix, "jemalloc").glob("usr/lib/*/libjemalloc.so.2"))
    if unpacked:
        return str(unpacked[0])
    import ctypes.util

    for name in _SYSTEM_ALLOCATORS:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


@contextlib.contextmanager
def preloaded_in_new_processes(library: str | None):
    """Processes started meanwhile by executing a program (a ``spawn`` process pool's
    workers, whenever the pool starts them) preload ``library``; forked ones and this
    process are unaffected. Sets ``LD_PRELOAD`` in this process's environment for the
    duration (ahead of what it held) and restores it. ``None`` changes nothing."""
    if library is None:
        yield
        return
    saved = os.environ.get("LD_PRELOAD")
    os.environ["LD_PRELOAD"] = f"{library} {saved}" if saved else library
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = saved


@dataclass(frozen=True)
class ContextBinary:
    epcontext_model: Path  # the ONNX file with the EPContext node
    binary: Path  # the QNN context binary it points at


def compile_context_binary(
    qdq_path: str | Path, ctx_path: str | Path, target: Target, *, share: bool = False, last_shared: bool = False
) -> ContextBinary:
    """Prepare a QDQ model for ``target`` and write the EPContext model + context binary.

    With ``share``, successive calls add their graphs to one QNN context (weights with the
    same name and value stored once); the call with ``last_shared`` closes it, and every
    EPContext model of the group points at the binary the first call named.
    """
    ctx_path = Path(ctx_path)
    ctx_path.parent.mkdir(parents=True, exist_ok=True)
    so = _session_options()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.add_session_config_entry("ep.context_enable", "1")
    so.add_session_config_entry("ep.context_embed_mode", "0")
    so.add_session_config_entry("ep.context_file_path", str(ctx_path))
    if share:
        so.add_session_config_entry("ep.share_ep_contexts", "1")
        if last_shared:
            so.add_session_config_entry("ep.stop_share_ep_contexts", "1")
    so.add_provider_for_devices(_qnn_devices(), qnn_provider_options(target))
    with _native_stdout_silenced():
        session = ort.InferenceSession(str(qdq_path), sess_options=so)
    del session
    if not ctx_path.is_file():
        raise RuntimeError(f"QNN EP did not write {ctx_path}")
    binary = ctx_path.parent / _binary_of(ctx_path)
    if (last_shared or not share) and not binary.is_file():  # a shared binary is written at the end
        raise RuntimeError(f"QNN EP did not write the context binary {binary}")
    return ContextBinary(ctx_path, binary)


def compile_shared_context(
    graphs: Sequence[tuple[str | Path, str | Path]], target_name: str
) -> tuple[list[ContextBinary], list[float]]:
    """Compile every (QDQ model, EPContext model path) of ``graphs``, in order, into one
    context binary that stores weights of the same name and value once. Returns the
    binaries and the seconds each graph took.

    Takes the target by name and needs nothing but this module: it is what a build's
    compile worker process runs, and such a process then starts in a fraction of a second
    (47 MB, 0.2 s to import here, against 341 MB and 3.5 s for the build's own module)."""
    target = get_target(target_name)
    built, seconds = [], []
    for i, (qdq_path, ctx_path) in enumerate(graphs):
        start = time.perf_counter()
        built.append(compile_context_binary(qdq_path, ctx_path, target, share=True, last_shared=i == len(graphs) - 1))
        seconds.append(time.perf_counter() - start)
    if len({b.binary for b in built}) != 1:
        raise RuntimeError(f"{', '.join(Path(q).name for q, _ in graphs)}: the graphs did not share one context binary")
    return built, seconds


def _binary_of(epcontext_model: Path) -> str:
    """The binary an EPContext model points at (its ``ep_cache_context`` attribute)."""
    import onnx

    model = onnx.load(str(epcontext_model), load_external_data=False)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name == "ep_cache_context":
                return attr.s.decode()
    raise RuntimeError(f"{epcontext_model} has no EPContext node")


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(uint16)": np.uint16}


def run(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run with inputs cast to what the session expects; a missing input is named."""
    inputs = session.get_inputs()
    missing = {i.name for i in inputs} - set(feeds)
    if missing:
        raise ValueError(f"missing inputs: {sorted(missing)}")
    return session.run(
        None, {i.name: np.ascontiguousarray(feeds[i.name], dtype=_NUMPY_TYPES.get(i.type, np.float32)) for i in inputs}
    )


def io_signature(session: ort.InferenceSession) -> dict[str, list[dict]]:
    """Input/output names, shapes and dtypes as the runtime sees them."""

    def describe(args) -> list[dict]:
        return [{"name": a.name, "shape": list(a.shape), "dtype": a.type} for a in args]

    return {"inputs": describe(session.get_inputs()), "outputs": describe(session.get_outputs())}

