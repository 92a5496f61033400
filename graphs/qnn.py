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

# The QNN HTP compiler allocates and frees small objects at a high rate (malloc and free are
# a large share of a compile's time under perf): the compile workers preload a faster
# allocator, which builds the same binary bit for bit (docs/measurements.md).
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
    here and the compile's one share two cores; measured, both finish sooner when this
    side runs on one thread (docs/measurements.md)."""
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
    # No CPU memory arena: an output array that session.run returns keeps the arena region it
    # lives in, and the engine keeps outputs (hand-offs between partitions) long after the
    # session is gone. A 640x1024 partition's arena is gigabytes, so each partition left one
    # behind; without the arena an output holds only its own bytes (docs/first-frame.md).
    so.enable_cpu_mem_arena = False
    threads = session_threads(threads)
    if threads:
        so.intra_op_num_threads = threads
    return so


def cpu_session_options(threads: int | None = None) -> ort.SessionOptions:
    """Options for running float and QDQ graphs on the CPU EP as written.

    onnxruntime's CPU EP otherwise fuses DequantizeLinear(int8 weight) -> MatMul into
    MatMulNBits at accuracy level 4, which quantizes the activation to int8 on the fly: a
    W8A16 graph then runs as W8A8 and no longer simulates what the NPU computes
    (docs/measurements.md)."""
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


def exit_with_parent(parent: int | None = None, interval: float = 1.0) -> None:
    """In a worker process: exit as soon as ``parent`` (default: the process that started
    it) is gone. A build killed with SIGKILL cannot stop its workers; without this a compile
    worker would finish its job (minutes, GBs of memory) for nobody, and a forked export
    would hold the model. Pools pass their own pid: a worker spawned while its pool's
    process was exiting starts with init as its parent already and would otherwise wait
    forever."""
    import threading

    parent = os.getppid() if parent is None else parent

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


HTP_MAX_RANK = 4


class UnsupportedGraphError(ValueError):
    """A graph the HTP cannot take, found before the QNN compiler runs."""


def check_for_htp(model_path: str | Path) -> None:
    """Refuse, naming the node, a graph the HTP cannot take: a tensor above rank 4 (tiling
    high-rank tensors made one compile take a day; facts 4.1) or a shape left dynamic. The
    QNN compiler's own error for these comes late and names neither."""
    import onnx

    path = Path(model_path)
    proto = onnx.load(str(path), load_external_data=False)
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - the declared shapes are checked as they are
        pass
    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    interface = {v.name for v in [*graph.input, *graph.output]}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        node = producer.get(value.name)
        where = f"{node.name or node.op_type} ({node.op_type})" if node is not None else "graph input"
        if len(dims) > HTP_MAX_RANK:
            raise UnsupportedGraphError(f"{path.name}: {where} makes {value.name!r} of rank {len(dims)}; the HTP takes "
                                        f"rank {HTP_MAX_RANK} at most (reshape it in the model or an FX pass)")
        if value.name in interface and any(not d.HasField("dim_value") for d in dims):
            raise UnsupportedGraphError(f"{path.name}: {where} makes {value.name!r} with a dynamic shape; the HTP "
                                        "takes static shapes (trace at a fixed shape, specialize_shapes)")


@dataclass(frozen=True)
class ContextBinary:
    epcontext_model: Path  # the ONNX file with the EPContext node
    binary: Path  # the QNN context binary it points at


def compile_context_binary(
    qdq_path: str | Path, ctx_path: str | Path, target: Target, *, share: bool = False, last_shared: bool = False,
    graph_dump_dir: str | Path | None = None,
) -> ContextBinary:
    """Prepare a QDQ model for ``target`` and write the EPContext model + context binary.

    With ``share``, successive calls add their graphs to one QNN context (weights with the
    same name and value stored once); the call with ``last_shared`` closes it, and every
    EPContext model of the group points at the binary the first call named. With
    ``graph_dump_dir``, the QNN graph the EP hands the HTP compiler is written there as JSON
    (:func:`qnn_graph_ops` reads it).
    """
    check_for_htp(qdq_path)
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
    options = qnn_provider_options(target)
    if graph_dump_dir is not None:
        Path(graph_dump_dir).mkdir(parents=True, exist_ok=True)
        options.update({"dump_json_qnn_graph": "1", "json_qnn_graph_dir": str(graph_dump_dir)})
    so.add_provider_for_devices(_qnn_devices(), options)
    with _native_stdout_silenced():
        session = ort.InferenceSession(str(qdq_path), sess_options=so)
    del session
    if not ctx_path.is_file():
        raise RuntimeError(f"QNN EP did not write {ctx_path}")
    binary = ctx_path.parent / _binary_of(ctx_path)
    if (last_shared or not share) and not binary.is_file():  # a shared binary is written at the end
        raise RuntimeError(f"QNN EP did not write the context binary {binary}")
    return ContextBinary(ctx_path, binary)


def qnn_graph_ops(dump_dir: str | Path) -> dict[str, int]:
    """Op types and counts of the QNN graph(s) dumped by :func:`compile_context_binary`."""
    import json
    from collections import Counter

    counts: Counter = Counter()
    files = [f for f in sorted(Path(dump_dir).glob("*.json")) if not f.name.endswith("_tensor_log.json")]
    if not files:
        raise RuntimeError(f"the QNN EP wrote no graph JSON into {dump_dir}")
    for f in files:
        counts.update(node["type"] for node in json.loads(f.read_text())["graph"]["nodes"].values())
    return dict(sorted(counts.items()))


def compile_shared_context(
    graphs: Sequence[tuple[str | Path, str | Path]], target_name: str
) -> tuple[list[ContextBinary], list[float]]:
    """Compile every (QDQ model, EPContext model path) of ``graphs``, in order, into one
    context binary that stores weights of the same name and value once. Returns the
    binaries and the seconds each graph took.

    Takes the target by name and needs nothing but this module: it is what a build's
    compile worker process runs, and such a process then starts in a fraction of a second,
    without the build's own imports."""
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

