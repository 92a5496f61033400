"""``neodragon-npu bench htp-activation``: does one large 16-bit activation fit the HTP?

The SDXL VAE decoder's largest activation is [1, 256, 640, 1024]. Whether the HTP takes a
tensor of that size decides whether the graph must be tiled spatially (which is not exact:
GroupNorm statistics and attention are global). This benchmark builds the smallest W8A16
graph that holds such a tensor, image -> Conv(3 -> C) -> Conv(C -> 3), compiles it for the
target, runs the context binary in the HTP simulator and compares it with the same QDQ graph
on the CPU. The compiler and simulator are what run here; a phone's memory limits are not.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_ACTIVATION_RANGES = {"x": (-1.0, 1.0), "a": (-4.0, 4.0), "y": (-30.0, 30.0)}


def activation_graph(channels: int, height: int, width: int, *, seed: int = 0) -> onnx.ModelProto:
    """Image [1, 3, H, W] -> Conv -> [1, C, H, W] -> Conv -> [1, 3, H, W], int8 per-tensor
    weights and uint16 activations in QDQ form (what the engine's W8A16 graphs hold)."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def activation(name: str, out: str) -> None:
        lo, hi = _ACTIVATION_RANGES[name]
        scale = (hi - lo) / 65535
        inits.append(numpy_helper.from_array(np.array(scale, np.float32), f"{name}_scale"))
        inits.append(numpy_helper.from_array(np.array(round(-lo / scale), np.uint16), f"{name}_zero"))
        nodes.append(helper.make_node("QuantizeLinear", [name, f"{name}_scale", f"{name}_zero"], [f"{name}_q"]))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zero"], [out]))

    def weight(name: str, shape: tuple[int, ...]) -> None:
        w = rng.standard_normal(shape).astype(np.float32) / np.sqrt(np.prod(shape[1:]))
        scale = float(np.abs(w).max()) / 127
        inits.append(numpy_helper.from_array(np.clip(np.round(w / scale), -127, 127).astype(np.int8), f"{name}_q"))
        inits.append(numpy_helper.from_array(np.array(scale, np.float32), f"{name}_scale"))
        inits.append(numpy_helper.from_array(np.array(0, np.int8), f"{name}_zero"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zero"], [name]))

    activation("x", "x_dq")
    weight("w_in", (channels, 3, 3, 3))
    nodes.append(helper.make_node("Conv", ["x_dq", "w_in"], ["a"], pads=[1, 1, 1, 1]))
    activation("a", "a_dq")
    weight("w_out", (3, channels, 3, 3))
    nodes.append(helper.make_node("Conv", ["a_dq", "w_out"], ["y"], pads=[1, 1, 1, 1]))
    activation("y", "out")
    graph = helper.make_graph(
        nodes, "htp_activation",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, height, width])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, height, width])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def activation_benchmark(
    channels: int = 256, height: int = 640, width: int = 1024, *, target: str = "sm8750",
    run: bool = True, work_dir: str | Path | None = None,
) -> dict:
    """Compile (and with ``run``, run) the two-conv graph; returns the intermediate's bytes
    at 16 bit, the compile and run seconds, the context binary's size and the simulator's
    SQNR against the CPU QDQ graph (dB; None without ``run``)."""
    from neodragon_npu.graphs import qnn
    from neodragon_npu.graphs.targets import get_target
    from neodragon_npu.graphs.verify import pooled_sqnr

    from neodragon_npu.tools.engine.bench import work_root

    device = get_target(target)
    with work_root(work_dir) as root:
        qdq = root / "activation.onnx"
        onnx.save(activation_graph(channels, height, width), qdq)
        start = time.perf_counter()
        ctx = qnn.compile_context_binary(qdq, root / "activation_ctx.onnx", device)
        result = {"activation_bytes": channels * height * width * 2, "compile_s": time.perf_counter() - start,
                  "binary_bytes": ctx.binary.stat().st_size, "run_s": None, "sqnr_db": None}
        if run:
            x = np.random.default_rng(1).uniform(-1, 1, (1, 3, height, width)).astype(np.float32)
            session = qnn.htp_session(ctx.epcontext_model, device)
            start = time.perf_counter()
            (got,) = qnn.run(session, {"x": x})
            result["run_s"] = time.perf_counter() - start
            (want,) = qnn.run(qnn.cpu_session(qdq), {"x": x})
            result["sqnr_db"] = pooled_sqnr([(want, got)])
        return result


def format_activation(channels: int, height: int, width: int, target: str, r: dict) -> str:
    lines = [f"htp-activation: Conv(3 -> {channels}) -> Conv({channels} -> 3) at {height}x{width}, W8A16, {target}",
             f"  the [1, {channels}, {height}, {width}] activation at 16 bit   {r['activation_bytes'] / 1e6:10.1f} MB",
             f"  compiled in                                   {r['compile_s']:10.1f} s  "
             f"(context binary {r['binary_bytes'] / 1e6:.1f} MB)"]
    if r["sqnr_db"] is not None:
        lines.append(f"  ran in the HTP simulator in                   {r['run_s']:10.1f} s")
        lines.append(f"  HTP simulator against the CPU QDQ graph       {r['sqnr_db']:10.2f} dB SQNR")
    return "\n".join(lines)
