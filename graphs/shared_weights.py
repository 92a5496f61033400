"""Graphs that share weights, merged into one model and split apart again.

The three stage graphs of a partition read the same weights (by name) at different
sequence lengths. Quantizing them as one model -- side by side, every non-weight name
tagged with its graph (``stage2::/blocks.0/Add_output_0``), weights stored once -- lets
aimet handle each weight once (one encoding, used by every stage by construction) while
every activation keeps its own stage's calibration::

    stage2: x2 -> MatMul(., W) -> y2          merged: stage2::x2 -> MatMul(., W) -> stage2::y2
    stage1: x1 -> MatMul(., W) -> y1    ->            stage1::x1 -> MatMul(., W) -> stage1::y1

:func:`split` cuts one graph back out (the nodes its outputs depend on, shared weight
Q/DQ nodes copied into each) and removes the tags, so it has its original interface.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnx_ir as ir

SEP = "::"


def tag(graph_tag: str, name: str) -> str:
    return f"{graph_tag}{SEP}{name}" if name else name


def untag(name: str) -> str:
    """The name without its graph tag (names without one are returned as they are)."""
    return name.split(SEP, 1)[1] if SEP in name else name


def _same_tensor(a: ir.Value, b: ir.Value) -> bool:
    ta, tb = a.const_value, b.const_value
    if ta is None or tb is None:
        return ta is tb
    if ta.dtype != tb.dtype or tuple(ta.shape) != tuple(tb.shape):
        return False
    if a.name.startswith("w_"):  # content-named (passes.onnx.name_weights_by_content)
        return True
    return ta.tobytes() == tb.tobytes()


def merge(models: dict[str, ir.Model]) -> ir.Model:
    """One model running every graph of ``models`` (tag -> model), which it consumes.

    Initializers with the same name and tensor are stored once (one with the name of
    another but different contents is tagged instead, and so not shared); every other
    value and node name is tagged. Graph inputs and outputs keep their order, graph by
    graph."""
    if not models:
        raise ValueError("merge: no models")
    first = next(iter(models.values()))
    shared: dict[str, ir.Value] = {}
    inputs, outputs, nodes = [], [], []
    opsets: dict[str, int] = {}
    for graph_tag, model in models.items():
        graph = model.graph
        if SEP in graph_tag:
            raise ValueError(f"merge: a graph tag may not contain {SEP!r}: {graph_tag!r}")
        for domain, version in graph.opset_imports.items():
            opsets[domain] = max(opsets.get(domain, version), version)
        for node in graph:
            for attr in node.attributes.values():
                if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                    raise ValueError(f"merge: {graph_tag} node {node.name} has a subgraph; not supported")
        for name, value in list(graph.initializers.items()):
            graph.initializers.pop(name)
            kept = shared.get(name)
            if kept is not None and _same_tensor(kept, value):
                value.replace_all_uses_with(kept)
                continue
            if kept is not None:
                value.name = tag(graph_tag, name)
            shared[value.name] = value
        graph_nodes = list(graph)
        for node in graph_nodes:
            node.name = tag(graph_tag, node.name or "")
            for value in node.outputs:
                value.name = tag(graph_tag, value.name or "")
        for value in graph.inputs:
            value.name = tag(graph_tag, value.name)
        graph.remove(graph_nodes)
        nodes += graph_nodes
        inputs += list(graph.inputs)
        outputs += list(graph.outputs)
        graph.inputs.clear()
        graph.outputs.clear()
    merged = ir.Graph(inputs, outputs, nodes=nodes, initializers=list(shared.values()),
                      opset_imports=opsets, name="merged")
    return ir.Model(merged, ir_version=first.ir_version, producer_name=first.producer_name)


def merged_feeds(merged: ir.Model, feeds: dict[str, list[dict]]) -> list[dict]:
    """Feeds for a merged model from each graph's own feeds (tag -> list of feeds): feed i
    holds feed i of every graph side by side. A graph with fewer feeds repeats its own
    (which leaves min-max calibration ranges unchanged)."""
    n = max(len(f) for f in feeds.values())
    out = []
    for i in range(n):
        feed = {}
        for value in merged.graph.inputs:
            graph_tag, name = value.name.split(SEP, 1)
            own = feeds[graph_tag]
            feed[value.name] = own[i % len(own)][name]
        out.append(feed)
    return out


def own_values(values: dict, graph_tag: str) -> dict:
    """The values (name -> value, e.g. a merged model's outputs for one feed) of the graph
    tagged ``graph_tag``, under the graph's own names."""
    prefix = graph_tag + SEP
    return {name[len(prefix):]: v for name, v in values.items() if name.startswith(prefix)}


def split(merged: onnx.ModelProto, graph_tag: str) -> onnx.ModelProto:
    """The graph tagged ``graph_tag``, cut out of a merged model (with the tags removed)."""
    g = merged.graph
    prefix = graph_tag + SEP

    def own(name: str) -> str:
        return name[len(prefix):] if name.startswith(prefix) else name

    producer = {out: i for i, node in enumerate(g.node) for out in node.output if out}
    initializers = {t.name: t for t in g.initializer}
    outputs = [o for o in g.output if o.name.startswith(prefix)]
    if not outputs:
        raise ValueError(f"split: the merged model has no outputs tagged {graph_tag!r}")
    keep, used, seen = set(), set(), set()
    todo = [o.name for o in outputs]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in initializers:
            used.add(name)
        elif name in producer and producer[name] not in keep:
            keep.add(producer[name])
            todo += [x for x in g.node[producer[name]].input if x]
    graph = onnx.GraphProto(name=own(g.name) if g.name else graph_tag)
    for i in sorted(keep):  # the merged order is topological
        node = graph.node.add()
        node.CopyFrom(g.node[i])
        node.name = own(node.name)
        node.input[:] = [own(x) for x in node.input]
        node.output[:] = [own(x) for x in node.output]
    for t in g.initializer:
        if t.name in used:
            copy = graph.initializer.add()
            copy.CopyFrom(t)
            copy.name = own(t.name)
    for source, target in ((g.input, graph.input), (g.output, graph.output)):
        for v in source:
            if v.name.startswith(prefix):
                copy = target.add()
                copy.CopyFrom(v)
                copy.name = own(v.name)
    for v in g.value_info:
        if v.name in seen:
            copy = graph.value_info.add()
            copy.CopyFrom(v)
            copy.name = own(v.name)
    model = onnx.helper.make_model(graph, opset_imports=list(merged.opset_import), ir_version=merged.ir_version)
    model.producer_name = merged.producer_name
    return model


def split_encodings(merged: str | Path, graph_tag: str, params: set[str], out: str | Path) -> Path:
    """The AIMET encodings of one graph: its tagged activations (tags removed), and the
    encodings of the initializers it reads (``params``): weights, and shared constants
    that aimet quantizes as activations."""
    data = json.loads(Path(merged).read_text())
    prefix = graph_tag + SEP
    acts = data.get("activation_encodings", [])
    weights = data.get("param_encodings", [])
    if isinstance(acts, dict) or isinstance(weights, dict):
        raise ValueError(f"{merged}: expected the AIMET 1.0 encodings layout (lists of named encodings)")
    data["activation_encodings"] = [
        {**e, "name": e["name"][len(prefix):]} if e["name"].startswith(prefix) else e
        for e in acts
        if e["name"].startswith(prefix) or e["name"] in params
    ]
    data["param_encodings"] = [e for e in weights if e["name"] in params]
    out = Path(out)
    out.write_text(json.dumps(data, indent=1) + "\n")
    return out
