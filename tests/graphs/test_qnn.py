"""The real onnxruntime-qnn HTP compiler and x86 simulator on a small QDQ graph."""

import os

import numpy as np
import onnxruntime as ort
import pytest
import torch

from neodragon_npu.graphs import onnx_io, qnn
from neodragon_npu.graphs.export import export_onnx
from neodragon_npu.graphs.targets import get_target
from neodragon_npu.graphs.verify import sqnr_db
from neodragon_npu.passes.onnx.quantize_w8a16 import QuantizeW8A16Pass

from tests.helpers import small_mlp_qdq

MIN_SQNR_DB = 35.0


@pytest.fixture(scope="module")
def qdq_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qnn")
    module, _ = small_mlp_qdq(folder, 16, 16)
    return folder, module


@pytest.mark.parametrize("target_name", ["sm8750", "x-elite"])
def test_context_binary_round_trip_in_the_simulator(qdq_model, target_name):
    folder, module = qdq_model
    target = get_target(target_name)
    ctx = qnn.compile_context_binary(folder / "q.onnx", folder / f"{target_name}_ctx.onnx", target)
    assert ctx.binary.stat().st_size > 0 and ctx.epcontext_model.is_file()
    assert {n.op_type for n in onnx_io.load(ctx.epcontext_model).graph} == {"EPContext"}
    session = qnn.htp_session(ctx.epcontext_model, target)
    x = np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)
    out = qnn.run(session, {"x": x})[0]
    ref = module(torch.from_numpy(x)).detach().numpy()
    assert sqnr_db(ref, out) >= MIN_SQNR_DB
    sig = qnn.io_signature(session)
    assert sig["inputs"][0]["name"] == "x" and sig["outputs"][0]["shape"] == [1, 8]


def test_binaries_differ_between_archs(qdq_model):
    folder, _ = qdq_model
    a = qnn.compile_context_binary(folder / "q.onnx", folder / "a" / "v79_ctx.onnx", get_target("sm8750"))
    b = qnn.compile_context_binary(folder / "q.onnx", folder / "b" / "v73_ctx.onnx", get_target("x-elite"))
    assert a.binary.read_bytes() != b.binary.read_bytes()


def test_graphs_compiled_into_one_shared_context(qdq_model, tmp_path):
    """The same weights at two shapes (like the three stage graphs): one binary that both
    EPContext models name. (The x86 simulator refuses to load a shared context,
    QNN_COMMON_ERROR_NOT_SUPPORTED: the builds run non-shared binaries of the same graphs.)"""
    folder, module = qdq_model
    export_onnx(module, [torch.zeros(4, 16)], tmp_path / "f4.onnx", input_names=["x"], output_names=["y"])
    rng = np.random.default_rng(2)
    cal = [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(4)]
    onnx_io.save(QuantizeW8A16Pass(calibration=cal)(onnx_io.load(tmp_path / "f4.onnx")).model, tmp_path / "q4.onnx")
    graphs = [(tmp_path / "q4.onnx", tmp_path / "out" / "four_ctx.onnx"), (folder / "q.onnx", tmp_path / "out" / "one_ctx.onnx")]
    built, seconds = qnn.compile_shared_context(graphs, "sm8750")
    assert len(seconds) == 2 and all(sec > 0 for sec in seconds)
    assert built[0].binary == built[1].binary and built[0].binary.is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(["four_ctx.onnx", "one_ctx.onnx", built[0].binary.name])
    for ctx in built:
        nodes = list(onnx_io.load(ctx.epcontext_model).graph)
        assert [n.op_type for n in nodes] == ["EPContext"]
        assert nodes[0].attributes["ep_cache_context"].value == built[0].binary.name


def test_the_compile_module_stays_light():
    """A build's compile workers import only graphs.qnn: no PyTorch, so they start fast."""
    import subprocess
    import sys

    code = "import sys, graphs.qnn; print(sorted(m for m in ('torch', 'aimet_onnx', 'onnx_ir') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_feed_is_named(qdq_model):
    folder, _ = qdq_model
    session = qnn.cpu_session(folder / "q.onnx")
    with pytest.raises(ValueError, match=r"missing inputs: \['x'\]"):
        qnn.run(session, {})


def _w8a16_matmul(k: int = 256, n: int = 64) -> tuple[bytes, np.ndarray, np.ndarray]:
    """x -> Q/DQ int16 -> MatMul(DQ(int8 per-channel weight)): the W8A16 node unit."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w_scale = (np.abs(w).max(0) / 127).astype(np.float32)
    w_int = np.clip(np.round(w / w_scale), -128, 127).astype(np.int8)
    x_scale = np.float32(8.0 / 32767)
    inits = [
        numpy_helper.from_array(w_int, "w_q"), numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(n, np.int8), "w_zp"), numpy_helper.from_array(np.array(x_scale), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int16), "x_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], axis=1),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "w8a16", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, n])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = rng.standard_normal((16, k)).astype(np.float32)
    x_dq = np.clip(np.round(x / x_scale), -32768, 32767).astype(np.float64) * x_scale
    expected = x_dq @ (w_int.astype(np.float64) * w_scale)
    return model.SerializeToString(), x, expected


def test_cpu_sessions_run_a_w8a16_matmul_with_its_16_bit_activation():
    # onnxruntime's default CPU optimisations fuse this into MatMulNBits, which quantizes
    # the activation to int8 on the fly; our CPU sessions must compute what the graph says.
    model, x, expected = _w8a16_matmul()
    ours = qnn.cpu_session(model).run(None, {"x": x})[0]
    assert sqnr_db(expected, ours) > 100.0
    fused = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert sqnr_db(expected, fused) < 60.0  # what the CPU EP does without our options


def test_thread_limit_holds_torch_the_blas_and_new_sessions_and_is_undone(qdq_model):
    from threadpoolctl import threadpool_info

    from neodragon_npu.graphs.quant.aimet import session_kwargs as _session_kwargs

    model = qdq_model[0] / "q.onnx"

    def blas_threads():
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    torch_before, blas_before = torch.get_num_threads(), blas_threads()
    with qnn.thread_limit(1):
        assert torch.get_num_threads() == 1
        assert blas_threads() == {1}
        assert qnn.cpu_session(str(model)).get_session_options().intra_op_num_threads == 1
        assert qnn.cpu_session(str(model), threads=2).get_session_options().intra_op_num_threads == 2
        assert _session_kwargs() == {"enable_cpu_mem_arena": False, "intra_op_num_threads": 1}  # aimet's session
    assert torch.get_num_threads() == torch_before and blas_threads() == blas_before
    assert qnn.cpu_session(str(model)).get_session_options().intra_op_num_threads == 0  # onnxruntime's default
    assert _session_kwargs() == {"enable_cpu_mem_arena": False}
    with qnn.thread_limit(None):  # no limit: nothing changes
        assert torch.get_num_threads() == torch_before and qnn.session_threads() is None


def test_compile_allocator_comes_from_the_environment_variable_the_venv_or_the_system(tmp_path, monkeypatch):
    library = tmp_path / "libfast.so"
    library.write_bytes(b"")
    monkeypatch.setenv(qnn.ALLOCATOR_ENV, str(library))
    assert qnn.compile_allocator() == str(library)
    monkeypatch.setenv(qnn.ALLOCATOR_ENV, "glibc")
    assert qnn.compile_allocator() is None
    monkeypatch.setenv(qnn.ALLOCATOR_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(ValueError, match="no such file"):
        qnn.compile_allocator()
    # what make setup unpacks into the environment comes before the system's
    monkeypatch.delenv(qnn.ALLOCATOR_ENV)
    unpacked = tmp_path / "jemalloc" / "usr" / "lib" / "x86_64-linux-gnu" / "libjemalloc.so.2"
    unpacked.parent.mkdir(parents=True)
    unpacked.write_bytes(b"")
    monkeypatch.setattr(qnn.sys, "prefix", str(tmp_path))
    assert qnn.compile_allocator() == str(unpacked)


def test_preloading_sets_and_restores_ld_preload(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    with qnn.preloaded_in_new_processes("/x/libjemalloc.so.2"):
        assert os.environ["LD_PRELOAD"] == "/x/libjemalloc.so.2 libother.so"
    assert os.environ["LD_PRELOAD"] == "libother.so"
    monkeypatch.delenv("LD_PRELOAD")
    with qnn.preloaded_in_new_processes("/x/libjemalloc.so.2"):
        assert os.environ["LD_PRELOAD"] == "/x/libjemalloc.so.2"
    assert "LD_PRELOAD" not in os.environ
    with qnn.preloaded_in_new_processes(None):
        assert "LD_PRELOAD" not in os.environ


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (reaped, or a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, seconds: float = 30.0) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return False


def test_a_worker_exits_when_the_process_that_started_it_is_killed(tmp_path):
    """A middle process starts a worker watching it, then is SIGKILLed: the worker exits
    on its own (it is not killed by anyone)."""
    import signal
    import subprocess
    import sys

    worker = ("import sys, time; from neodragon_npu.graphs.qnn import exit_with_parent; "
              "exit_with_parent(interval=0.05); print('watching', flush=True); time.sleep(600)")
    middle = ("import subprocess, sys, time; "
              f"w = subprocess.Popen([sys.executable, '-c', {worker!r}], stdout=subprocess.PIPE, text=True); "
              "assert w.stdout.readline().strip() == 'watching'; print(w.pid, flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", middle], stdout=subprocess.PIPE, text=True)
    worker_pid = int(proc.stdout.readline())
    assert not _gone(worker_pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _wait_gone(worker_pid), "the worker outlived the process that started it"


def test_a_worker_started_after_its_pool_died_exits_at_once():
    """A worker given its pool's pid exits even when that process was gone before the
    worker started (its parent is already init: watching getppid alone never fires)."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    code = ("import time; from neodragon_npu.graphs.qnn import exit_with_parent; "
            f"exit_with_parent({dead.pid}, interval=0.05); time.sleep(600)")
    worker = subprocess.Popen([sys.executable, "-c", code])
    assert worker.wait(timeout=60) == 1


def test_an_output_kept_after_its_session_holds_only_its_own_bytes(tmp_path):
    """The engine keeps partition outputs long after their session is gone: they must not
    keep the session's working memory (with onnxruntime's CPU arena, an output pins the
    arena region it was allocated in)."""
    import psutil
    from onnx import TensorProto, helper

    from neodragon_npu.tools.engine.progress import release_memory
    from tests.helpers import onnx_model

    n = 16 << 20  # 64 MB of fp32 per tensor
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Mul", ["c", "a"], ["d"]),
             helper.make_node("Sub", ["d", "b"], ["y"])]
    model = onnx_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])], [])
    onnx_io.save(model, tmp_path / "m.onnx")
    x = np.ones(n, dtype=np.float32)
    session = qnn.cpu_session(tmp_path / "m.onnx")
    assert session.get_session_options().enable_cpu_mem_arena is False
    process = psutil.Process()
    release_memory()
    before = process.memory_info().rss
    (kept,) = session.run(None, {"x": x})
    del session
    release_memory()
    held = process.memory_info().rss - before
    np.testing.assert_array_equal(kept[:4], [1.0, 1.0, 1.0, 1.0])  # (1 - 1) * 1 - (-1)
    assert held < 1.5 * kept.nbytes, held / kept.nbytes
