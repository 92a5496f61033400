"""torch.fx helpers: tracing at a static shape, shape propagation, small edits.

Shapes are propagated with fake tensors, so annotating a full-size graph costs no
activation memory and no FLOPs.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

# Key under which a node's Python (non-tensor) value is recorded: ints, shapes, tuples.
STATIC_VALUE = "static_value"
# Key of the example-input spec (shape, dtype) recorded on placeholders by ``trace``.
INPUT_SPEC = "input_spec"


class _RecordingShapeProp(ShapeProp):
    """ShapeProp that also records plain Python results (shape queries) per node."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if _is_static(result):
            n.meta[STATIC_VALUE] = result
        else:
            n.meta.pop(STATIC_VALUE, None)
        return result


def _is_static(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str, torch.Size, type(None))):
        return True
    if isinstance(value, (tuple, list)):
        return all(_is_static(v) for v in value)
    return False


def input_specs(gm: fx.GraphModule) -> list[tuple[tuple[int, ...], torch.dtype]]:
    specs = []
    for node in gm.graph.find_nodes(op="placeholder"):
        if INPUT_SPEC not in node.meta:
            raise ValueError(
                f"placeholder {node.name!r} has no recorded input shape; trace the module "
                "with graphs.fx.trace(module, example_inputs)"
            )
        specs.append(node.meta[INPUT_SPEC])
    return specs


def propagate_shapes(gm: fx.GraphModule) -> fx.GraphModule:
    """Annotate every node with ``tensor_meta`` (tensors) or ``static_value`` (Python values)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fakes = [torch.empty(shape, dtype=dtype) for shape, dtype in input_specs(gm)]
    try:
        _RecordingShapeProp(gm, fake_mode=mode).propagate(*fakes)
    except RuntimeError:
        # a leaf module branching on its input's values cannot run on fake tensors: run the
        # graph once on real zeros of the traced shapes instead
        with torch.no_grad():
            _RecordingShapeProp(gm).propagate(*[torch.zeros(s, dtype=d) for s, d in input_specs(gm)])
    return gm


TRACING_METHODS = ("symbolic", "export")


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer that keeps modules of the named classes whole (``call_module``)."""

    def __init__(self, leaf_classes: Sequence[str]) -> None:
        super().__init__()
        self.leaf_classes = set(leaf_classes)

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return type(m).__name__ in self.leaf_classes or super().is_leaf_module(m, module_qualified_name)


def trace(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    *,
    share_parameters: bool = False,
    method: str = "symbolic",
    leaf_modules: Sequence[str] = (),
) -> fx.GraphModule:
    """Trace ``module`` and annotate it at the shapes of ``example_inputs``.

    ``method="symbolic"`` is torch.fx's symbolic tracer: modules stay ``call_module`` nodes,
    which the module-level FX passes match; ``leaf_modules`` (class names) are kept whole,
    for embedders whose Python control flow the tracer cannot follow. ``method="export"``
    traces with torch.export to ATen ops, which follows any Python the module runs at these
    shapes; the module-level passes then find nothing to match (they say so).

    FX passes edit parameters in place (permuting, scaling, splitting them), so the graph
    gets its own copy of the module unless ``share_parameters`` is set -- which a build
    does for full-size models it drops right after tracing, to avoid a second copy.
    """
    if method not in TRACING_METHODS:
        raise ValueError(f"unknown tracing method {method!r}; expected one of {TRACING_METHODS}")
    root = module if share_parameters else copy.deepcopy(module)
    if method == "export":
        if leaf_modules:
            raise ValueError("leaf modules apply to symbolic tracing, not to torch.export")
        with torch.no_grad():
            unlifted = torch.export.export(root.eval(), tuple(example_inputs), strict=False).module()
        # a plain GraphModule of the same graph: the exported program's own module refuses
        # train(), which the ONNX exporter calls
        gm = fx.GraphModule(unlifted, unlifted.graph)
    elif leaf_modules:
        tracer = _LeafTracer(leaf_modules)
        gm = fx.GraphModule(root, tracer.trace(root), type(root).__name__)
    else:
        gm = fx.symbolic_trace(root)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(example_inputs):
        raise ValueError(
            f"{type(module).__name__} takes {len(placeholders)} inputs, "
            f"{len(example_inputs)} examples given"
        )
    for node, example in zip(placeholders, example_inputs):
        node.meta[INPUT_SPEC] = (tuple(example.shape), example.dtype)
    return propagate_shapes(gm)


def target_name(node: fx.Node) -> str:
    """What a node calls, by name: ``"chunk"``, ``"linear"``, ``"getattr"``, a module path."""
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def placeholder_names(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.find_nodes(op="placeholder")]


def op_key(node: fx.Node, gm: fx.GraphModule | None = None) -> str:
    """A readable op name: module class for call_module, function/method name otherwise."""
    if node.op == "call_module" and gm is not None:
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return str(node.target)
    return node.op


def op_counts(gm: fx.GraphModule) -> Counter:
    return Counter(
        op_key(n, gm) for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")
    )


def erase_unused(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> int:
    """Erase nodes (and then their now-dead producers) that have no users; returns the count."""
    erased = 0
    pending = list(nodes)
    while pending:
        node = pending.pop()
        if node.graph is None or getattr(node, "_erased", False) or node.users or node.op in ("placeholder", "output"):
            continue
        producers = [a for a in node.all_input_nodes]
        gm.graph.erase_node(node)
        erased += 1
        pending.extend(producers)
    return erased


def recompile(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.lint()
    gm.recompile()
    return gm
