"""aimet-onnx, as every quantization step here creates and configures it.

aimet prints a banner, progress and an optional-dependency notice when it is imported and
used; :func:`quiet` keeps that off the build's output. Every QuantSim uses the HTP config
with per-channel weights for the target's Hexagon version (:func:`config_file`), and takes
the thread limit of :func:`neodragon_npu.graphs.qnn.thread_limit`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import onnx
import onnx_ir as ir

from neodragon_npu.graphs.onnx_edit import matches_any


def config_file(htp_arch: int) -> str:
    """aimet's HTP config with per-channel Linear weights for ``htp_arch`` (or the closest older)."""
    import aimet_onnx

    folder = Path(aimet_onnx.__file__).parent / "common" / "quantsim_config"
    available = sorted(
        int(p.name.split("_v")[1].split("_")[0])
        for p in folder.glob("htp_quantsim_config_v*_per_channel_linear.json")
    )
    usable = [a for a in available if a <= htp_arch] or available[:1]
    return str(folder / f"htp_quantsim_config_v{usable[-1]}_per_channel_linear.json")


def session_kwargs() -> dict:
    """aimet's session takes the thread limit of :func:`neodragon_npu.graphs.qnn.thread_limit`,
    and no CPU memory arena, like ours (:func:`neodragon_npu.graphs.qnn.cpu_session_options`:
    the calibration outputs handed on would keep the arena alive)."""
    from neodragon_npu.graphs.qnn import session_threads

    threads = session_threads()
    return {"enable_cpu_mem_arena": False, **({"intra_op_num_threads": threads} if threads else {})}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """aimet's prints, its Quant/Utils loggers below WARNING and its UserWarnings, silenced."""
    loggers = [logging.getLogger(n) for n in ("Quant", "Utils")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def quantsim(proto: onnx.ModelProto, *, htp_arch: int, quant_scheme: str = "min_max"):
    """A W8A16 QuantSim of ``proto``: int8 per-channel weights, int16 activations. Call it
    inside :func:`quiet`."""
    from aimet_onnx.quantsim import QuantizationSimModel

    return QuantizationSimModel(
        proto,
        param_type="int8",
        activation_type="int16",
        quant_scheme=quant_scheme,
        config_file=config_file(htp_arch),
        providers=["CPUExecutionProvider"],
        session_options_kwargs=session_kwargs(),
    )


def keep_at_16_bit(sim, model: ir.Model, patterns: Sequence[str]) -> list[str]:
    """Weights of nodes matching ``patterns`` (:func:`matches_any`) quantized at 16 bit;
    returns their names."""
    if not patterns:
        return []
    param_names = set(sim.param_names)
    kept = []
    for node in model.graph:
        params = [v.name for v in node.inputs if v is not None and v.name in param_names]
        if params and matches_any(node, patterns, param_names):
            for name in params:
                if name in sim.qc_quantize_op_dict:
                    sim.qc_quantize_op_dict[name].set_precision("int16")
                    kept.append(name)
    return kept
