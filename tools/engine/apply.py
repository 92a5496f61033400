"""Run an ordered list of passes on a model: FX passes on a traced graph, then ONNX passes.

The conversion from FX to ONNX happens once, where the first ONNX pass appears (or at the
end), so a pipeline reads top to bottom in the order the graph flows through the toolkit.
A model is an .onnx file or ``<model>:<config>:<graph>`` for any model of the spec table
(the graph by name or key: ``denoiser:tiny:2``, ``quicksrnet:small:x2``).
"""

from __future__ import annotations

import gc
import tempfile
from dataclasses import dataclass
from pathlib import Path

from neodragon_npu.graphs import onnx_io
from neodragon_npu.graphs.export import export_onnx
from neodragon_npu.graphs.verify import verify_fx, verify_onnx
from neodragon_npu.neodragon_models.spec import GraphSpec, LoadOptions, ModelSpec
from neodragon_npu.neodragon_models.specs import MODELS, get_model
from neodragon_npu.passes.base import Pass, PassManager, PassRecord
from neodragon_npu.tools.engine import steps

MODEL_SPEC_HELP = "an .onnx file, or <model>:<config>:<graph> (e.g. denoiser:tiny:2, quicksrnet:small:x2)"


@dataclass
class ApplyResult:
    output: Path
    records: list[PassRecord]


def parse_model_spec(text: str) -> tuple[ModelSpec, str, GraphSpec]:
    """``<model>:<config>:<graph>`` resolved through the model table."""
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"model {text!r} is neither an .onnx file nor {MODEL_SPEC_HELP}")
    if parts[0] not in MODELS:
        raise ValueError(f"model {text!r}: unknown model {parts[0]!r}; models: {', '.join(MODELS)}")
    spec, config, name = get_model(parts[0]), parts[1], parts[2]
    if config not in spec.configs():
        raise ValueError(f"model {text!r}: unknown {spec.name} config {config!r}; known: {', '.join(spec.configs())}")
    graphs = {g.name: g for g in spec.graphs(config)} | {g.manifest_key: g for g in spec.graphs(config)}
    if name not in graphs:
        keys = ", ".join(g.manifest_key for g in spec.graphs(config))
        raise ValueError(f"model {text!r}: {spec.name} has no graph {name!r}; its graphs: {keys}")
    return spec, config, graphs[name]


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
    if is_file and out.exists() and out.resolve() == Path(model).resolve():
        raise ValueError(f"-o {out} is the input model; write the result to another file")
    if is_file:
        onnx_io.load(model)  # a missing or malformed input is refused before any pass runs
    resolved = None if is_file else parse_model_spec(model)

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
            spec, config, graph = resolved
            options = {o.name: o.default for o in spec.options}
            loaded = spec.load(LoadOptions(config=config, checkpoint=None, seed=seed, options=options))
            gm, example = steps.trace(graph, loaded)
            if fx_passes:
                records += manager(fx_passes, verify_fx, "fx", lambda g: g.code)(gm).records
            exported = Path(tmp) / "exported.onnx"
            export_onnx(gm, example, exported, input_names=graph.input_names, output_names=graph.output_names)
            del gm, loaded
            gc.collect()
            onnx_model = onnx_io.load(exported)
        if onnx_passes:
            result = manager(onnx_passes, verify_onnx, "onnx", lambda m: str(m.graph))(onnx_model)
            onnx_model = result.model
            records += result.records
        onnx_io.save(onnx_model, out)
    return ApplyResult(out, records)
