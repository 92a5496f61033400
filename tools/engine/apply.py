"""Run an ordered list of passes on a model: FX passes on a traced model, then ONNX passes.

The conversion from FX to ONNX happens once, where the first ONNX pass appears (or at the
end), so a pipeline reads top to bottom in the order the graph flows through the toolkit.
"""

from __future__ import annotations

import gc
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.graphs import onnx_io
from neodragon_npu.graphs.export import export_onnx
from neodragon_npu.graphs.verify import verify_fx, verify_onnx
from neodragon_npu.neodragon_models import pyramid
from neodragon_npu.neodragon_models.configs import get_denoiser_config
from neodragon_npu.neodragon_models.denoiser import build_denoiser
from neodragon_npu.neodragon_models.sampling import example_stage_inputs
from neodragon_npu.passes.base import Pass, PassManager, PassRecord

logger = logging.getLogger("neodragon_npu")

MODEL_SPEC_HELP = "an .onnx file, or denoiser:<config>:<stage> (e.g. denoiser:tiny:2)"


@dataclass
class ApplyResult:
    output: Path
    records: list[PassRecord]


def parse_model_spec(spec: str) -> tuple[str, str, int]:
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] != "denoiser" or not parts[2].isdigit():
        raise ValueError(f"model {spec!r} is neither an .onnx file nor {MODEL_SPEC_HELP}")
    get_denoiser_config(parts[1])
    return parts[0], parts[1], int(parts[2])


def _split(passes: list[Pass]) -> tuple[list[Pass], list[Pass]]:
    irs = [p.IR for p in passes]
    first_onnx = irs.index("onnx") if "onnx" in irs else len(passes)
    late_fx = [p.pass_name() for p in passes[first_onnx:] if p.IR == "fx"]
    if late_fx:
        raise ValueError(f"FX passes {late_fx} come after an ONNX pass; put FX passes first")
    return passes[:first_onnx], passes[first_onnx:]


def apply_pipeline(
    passes: list[Pass],
    model: str,
    out: str | Path,
    *,
    verify_each_pass: bool = False,
    dump_dir: str | Path | None = None,
    seed: int = 0,
) -> ApplyResult:
    """Apply ``passes`` to ``model`` (an .onnx path or a model spec) and save ONNX to ``out``."""
    fx_passes, onnx_passes = _split(passes)
    out = Path(out)
    if out.suffix != ".onnx":
        raise ValueError(f"output {out} must be an .onnx file")
    is_file = model.endswith(".onnx")
    if is_file and fx_passes:
        names = [p.pass_name() for p in fx_passes]
        raise ValueError(f"FX passes {names} need a traced model, not {model}; give {MODEL_SPEC_HELP}")
    spec = None if is_file else parse_model_spec(model)

    def manager(group: list[Pass], check, sub: str, dump) -> PassManager:
        return PassManager(
            group,
            check=check if verify_each_pass else None,
            dump_dir=Path(dump_dir) / sub if dump_dir else None,
            dump=dump,
        )

    records: list[PassRecord] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    # The exported model streams its weights from this directory until the final save.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".apply-") as tmp:
        if is_file:
            onnx_model = onnx_io.load(model)
        else:
            _, config, stage = spec
            denoiser = build_denoiser(get_denoiser_config(config), seed=seed)
            example = example_stage_inputs(denoiser, stage, seed)
            example_list = [example[n] for n in pyramid.STAGE_INPUT_NAMES]
            gm = fx_utils.trace(denoiser.stage_module(stage), example_list, share_parameters=True)
            if fx_passes:
                records += manager(fx_passes, verify_fx, "fx", lambda g: g.code)(gm).records
            exported = Path(tmp) / "exported.onnx"
            export_onnx(gm, example_list, exported, input_names=pyramid.STAGE_INPUT_NAMES, output_names=["noise_pred"])
            del gm, denoiser
            gc.collect()
            onnx_model = onnx_io.load(exported)
        if onnx_passes:
            result = manager(onnx_passes, verify_onnx, "onnx", lambda m: str(m.graph))(onnx_model)
            onnx_model = result.model
            records += result.records
        onnx_io.save(onnx_model, out)
    return ApplyResult(out, records)
