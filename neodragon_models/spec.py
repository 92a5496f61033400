"""A model as the build engine sees it: data plus a few functions.

A :class:`ModelSpec` says how to load a model (config, seed, checkpoint), which graphs to
cut out of it (each a :class:`GraphSpec`: module, static example inputs, input and output
names, FX and ONNX pipelines), where its calibration and check samples come from, its
precision and its fidelity floor. The engine (``neodragon_npu.tools.engine``) builds any
spec; nothing in it names a model. Specs themselves live in
:mod:`neodragon_npu.neodragon_models.specs`; adding a model is a PyTorch module plus a spec
(see docs/adding-a-model.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

Feed = dict[str, np.ndarray]
REFERENCE_SUFFIX = "_fp32"  # a check feed holds each output's fp32 reference under <output>_fp32


@dataclass(frozen=True)
class Tracing:
    """How a graph's module becomes an FX graph (:func:`neodragon_npu.graphs.fx.trace`).

    ``symbolic`` (torch.fx's tracer) keeps ``call_module`` nodes, which the module-level FX
    passes (adaLN split, RoPE rewrite, attention split) match; modules listed in
    ``leaf_modules`` (class names) are kept whole, for control flow the tracer cannot follow.
    ``export`` (torch.export) traces any module, data-dependent Python included, to ATen ops:
    the passes that match ops (shape specialization, identity removal) and every ONNX pass
    apply to it, the module-level ones find nothing."""

    method: str = "symbolic"
    leaf_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class GraphSpec:
    """One static graph cut out of a loaded model.

    ``name`` names its files (``<model>_<name>_float.onnx``, ``<name>_part<k>_...``); ``key``
    names it in manifests (the denoiser's stage graphs are keyed "0", "1", "2").
    ``fx_passes(model, target, pipeline)`` and ``onnx_passes(pipeline)`` give the named
    pipeline's passes (``pipeline`` is one of the spec's :attr:`ModelSpec.pipelines`)."""

    name: str
    module: Callable[[Any], nn.Module]
    example_inputs: Callable[[Any], Mapping[str, torch.Tensor]]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    fx_passes: Callable[[Any, Any, str], list]
    onnx_passes: Callable[[str], list]
    key: str = ""
    describe: Mapping[str, Any] = field(default_factory=dict)  # this graph's manifest fields
    tracing: Tracing = Tracing()
    # QNN op type -> how many the compiled graph must hold (checked after the compile)
    expected_qnn_ops: Mapping[str, int] = field(default_factory=dict)

    @property
    def manifest_key(self) -> str:
        return self.key or self.name


@dataclass(frozen=True)
class SamplePlan:
    """How many samples a build asks a spec for. ``None`` counts take the spec's default for
    the kind of build: one graph (``family=False``) or a family of graphs. ``check_groups``
    asks for the check calls to come from that many independent draws (prompts, videos)."""

    calibration: int | None = None
    check: int | None = None
    family: bool = False
    check_groups: int | None = None
    first_check_seed: int = 2000


@dataclass
class Samples:
    """Feeds per graph name. Check feeds also hold each output's fp32 reference under
    ``<output>_fp32``. Calibration feeds come in groups of ``calls_per_group`` (a prompt's
    calls): the engine picks GPTQ's feeds across groups."""

    calibration: dict[str, list[Feed]]
    check: dict[str, list[Feed]]
    check_labels: dict[str, list[str]] = field(default_factory=dict)
    calls_per_group: int = 1


@dataclass(frozen=True)
class ModelOption:
    """An option only this model takes (``--<name>`` on the command line): its type, default,
    help and, if it applies to one kind of build only, which (``"single"`` or ``"family"``)."""

    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    applies_to: str | None = None
    check: Callable[[Any], None] | None = None  # raises ValueError for a bad value
    sets_precision: bool = False  # it chooses weights kept at 16 bit (--high-precision none excludes it)


def load_description(load: "LoadOptions", **more: Any) -> dict:
    """What a manifest says of a loaded model: its config, checkpoint and seed, and ``more``."""
    return {"config": load.config, "checkpoint": str(load.checkpoint) if load.checkpoint else None,
            "seed": load.seed, **more}


def fp32_weight_bytes(model: nn.Module) -> int:
    """The bytes of a module's parameters at fp32."""
    return sum(p.numel() * 4 for p in model.parameters())


def meta_shapes(module: nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of a module (on the meta device: no memory)."""
    return {prefix + name: tuple(p.shape) for name, p in module.named_parameters()}


@dataclass(frozen=True)
class LoadOptions:
    config: str
    checkpoint: Path | None
    seed: int
    options: Mapping[str, Any]  # the spec's ModelOption values


@dataclass(frozen=True)
class ModelSpec:
    """Everything the engine needs to build a model's graphs (see the module docstring).

    ``graphs(config)`` lists the graphs in their natural order (the denoiser's stages 0, 1,
    2); a family build takes the last one first: it sets the partition cuts the others
    follow, so list the largest last. ``precision(model, options)`` returns a
    :mod:`neodragon_npu.passes.pipelines` precision (``W8A16`` or ``FP16``) with the model's
    defaults, which a build's options then adjust."""

    name: str
    summary: str
    configs: Callable[[], Sequence[str]]
    default_config: str
    load: Callable[[LoadOptions], Any]
    graphs: Callable[[str], Sequence[GraphSpec]]
    samples: Callable[[Any, Sequence[GraphSpec], SamplePlan], Samples]
    precision: Callable[[Mapping[str, Any]], Any]
    describe: Callable[[Any, LoadOptions], dict]
    weight_bytes: Callable[[Any], int]
    min_sqnr_db: float = 30.0
    family_min_sqnr_db: float = 25.0
    options: tuple[ModelOption, ...] = ()
    pipelines: tuple[str, ...] = ("optimized",)
    default_graph: str | None = None  # the graph a one-graph build takes (None: the last)
    family_label: str = "all-graphs"  # the manifest's "mode" for a family build
    graph_flags: tuple[str, str] = ("graph", "all-graphs")  # how the CLI selects graphs
    checkpoint_help: str = "a folder holding the released weights"
    artifacts: Callable[[Any], dict[str, str]] | None = None  # extra files: name -> text
    reference_note: str = ""  # what the fp32 reference is, for the manifest
    # The shape of every weight the loaded model will hold, found cheaply (modules on the
    # meta device; a checkpoint's config and tensor headers, no tensor): it reads and checks
    # everything the load depends on, so a bad checkpoint or model option is refused, and
    # the partition budget and disk space are checked, before any work.
    weight_shapes: Callable[[LoadOptions], Mapping[str, tuple[int, ...]]] | None = None
    # the ONNX exporter a build uses unless --exporter says otherwise
    exporter: str = "legacy"
    # Set by a caller that hands the spec samples recorded elsewhere (a bundle build's float
    # pipeline run end to end, through ``samples``): their digest, which the samples step's
    # cache key then holds, since the code alone no longer decides them.
    samples_key: str = ""

    def preflight(self, load: LoadOptions) -> dict[str, tuple[int, ...]]:
        """:attr:`weight_shapes` (empty if the spec has none)."""
        return dict(self.weight_shapes(load)) if self.weight_shapes is not None else {}

    def option(self, name: str) -> ModelOption:
        for opt in self.options:
            if opt.name == name:
                return opt
        raise KeyError(name)
