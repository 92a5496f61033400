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
    _RecordingShapeProp(gm, fake_mode=mode).propagate(*fakes)
    return gm


def trace(
    module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], *, share_parameters: bool = False
) -> fx.GraphModule:
    """Symbolically trace ``module`` and annotate it at the shapes of ``example_inputs``.

    FX passes edit parameters in place (permuting, scaling, splitting them), so the graph
    gets its own copy of the module unless ``share_parameters`` is set -- which a build
    does for full-size models it drops right after tracing, to avoid a second 6 GB copy.
    """
    gm = fx.symbolic_trace(module if share_parameters else copy.deepcopy(module))
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(example_inputs):
        raise ValueError(
            f"{type(module).__name__} takes {len(placeholders)} inputs, "
            f"{len(example_inputs)} examples given"
        )
    for node, example in zip(placeholders, example_inputs):
        node.meta[INPUT_SPEC] = (tuple(example.shape), example.dtype)
    return propagate_shapes(gm)


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
        if node.graph is None or node.users or node.op in ("placeholder", "output"):
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
