import networkx as nx
import numpy as np
import pytest

from neodragon_npu.graphs import partition
from neodragon_npu.graphs.export import export_onnx
from neodragon_npu.graphs import onnx_io
from neodragon_npu.neodragon_models import pyramid
from neodragon_npu.passes.onnx.partition_graph import PartitionGraphPass
from tests.helpers import run_onnx


@pytest.fixture(scope="module")
def stage_models(tiny_denoiser, tiny_stage_inputs, tmp_path_factory):
    from neodragon_npu.graphs import fx as fx_utils
    from neodragon_npu.passes.base import PassManager
    from neodragon_npu.passes.pipelines import denoiser_fx, denoiser_onnx

    folder = tmp_path_factory.mktemp("part")
    models = {}
    for stage in (1, 2):
        example = [tiny_stage_inputs[stage][n] for n in pyramid.STAGE_INPUT_NAMES]
        gm = fx_utils.trace(tiny_denoiser.stage_module(stage), example)
        PassManager(denoiser_fx())(gm)
        export_onnx(gm, example, folder / f"s{stage}.onnx", input_names=pyramid.STAGE_INPUT_NAMES, output_names=["out"])
        model = onnx_io.load(folder / f"s{stage}.onnx")
        PassManager(denoiser_onnx())(model)
        models[stage] = model
    return models


def _chain(parts, feeds):
    """The partitions run in turn, as written (no fusions: they differ in their last bits
    with where a graph is cut, and the cut must not change a bit)."""
    env = dict(feeds)
    for part in parts:
        outs = run_onnx(part, {v.name: env[v.name] for v in part.graph.inputs}, optimize=False)
        env.update({v.name: o for v, o in zip(part.graph.outputs, outs)})
    return env


def test_partitions_fit_the_budget_and_chain_to_the_exact_output(stage_models, tiny_stage_inputs):
    model = stage_models[2]
    feeds = {k: v.numpy() for k, v in tiny_stage_inputs[2].items()}
    ref = run_onnx(model, feeds, optimize=False)[0]
    budget = 150_000
    result = PartitionGraphPass(max_weight_bytes=budget)(model)
    assert result.modified
    quotient = partition.quotient_graph(model)
    assert nx.is_directed_acyclic_graph(quotient) and quotient.number_of_nodes() >= 3
    parts = partition.split(model)
    assert sum(len(p.graph) for p in parts) == len(model.graph)  # every node exactly once
    for part in parts:  # small constants are copied where they are read and do not count
        assert sum(t.const_value.nbytes for t in part.graph.initializers.values()
                   if t.const_value.nbytes >= partition.OWNED_WEIGHT_BYTES) <= budget
    assert np.array_equal(_chain(parts, feeds)["out"], ref)
    assert not PartitionGraphPass(max_weight_bytes=budget)(model).modified
    # the same files every run: weights in the order the nodes first read them
    for part in parts:
        first_use = list(dict.fromkeys(v.name for n in part.graph for v in n.inputs
                                       if v is not None and v.name in part.graph.initializers))
        assert list(part.graph.initializers) == first_use


def test_other_stages_cut_at_the_same_weights(stage_models, tiny_stage_inputs):
    prof2 = partition.profile(partition.prepare(stage_models[2]))
    weights2 = partition.partition_weights(prof2, partition.plan_cuts(prof2, max_weight_bytes=150_000))
    model1 = stage_models[1]
    PartitionGraphPass(max_weight_bytes=150_000, reference=[sorted(w) for w in weights2])(model1)
    parts1 = partition.split(model1)
    counts = {}
    for names in weights2:
        for w in names:
            counts[w] = counts.get(w, 0) + 1
    owned = {w for w, c in counts.items() if c == 1 and prof2.weight_bytes[w] >= partition.OWNED_WEIGHT_BYTES}
    for k, part in enumerate(parts1):
        assert set(part.graph.initializers) & owned == weights2[k] & owned
    feeds = {k: v.numpy() for k, v in tiny_stage_inputs[1].items()}
    assert np.array_equal(_chain(parts1, feeds)["out"], run_onnx(model1, feeds, optimize=False)[0])
    # what is computed from the graph inputs alone (the mask slices) sits in the first
    # partition that reads it, not handed across cuts
    of = {n: partition.partition_of(n) for n in model1.graph}
    input_only, moved = set(), 0
    for node in model1.graph:
        if any(v is not None and v.name in owned for v in node.inputs):
            continue
        if all(v is None or v.producer() is None or v.producer() in input_only for v in node.inputs):
            input_only.add(node)
            readers = [of[u] for v in node.outputs for u, _ in v.uses()]
            if readers and not any(v.is_graph_output() for v in node.outputs):
                assert of[node] == min(readers)
                moved += of[node] > 0
    assert moved > 0  # the mask slices of later blocks left partition 0


def test_impossible_budget_names_the_smallest_that_works(stage_models):
    import re

    with pytest.raises(partition.PartitionBudgetError, match=r"smallest weight budget that works is \d+ bytes") as info:
        PartitionGraphPass(max_weight_bytes=1000)(stage_models[2])
    smallest = int(re.search(r"works is (\d+)", str(info.value)).group(1))
    PartitionGraphPass(max_weight_bytes=smallest)(stage_models[2])  # and that one works
    with pytest.raises(partition.PartitionBudgetError, match="smallest live-activation budget"):
        PartitionGraphPass(max_weight_bytes=10**9, max_live_bytes=10)(stage_models[2])


def test_at_the_smallest_budget_every_graph_has_every_partition_and_no_bias_leaves_its_matmul(stage_models):
    """Stage 1 follows stage 2's cuts. A partition without an owned weight would be empty in
    stage 1, and a cut between a MatMul and the small bias Add after it would keep the pair
    together in stage 1 only: aimet then sees the shared weight read by a MatMul in one graph
    and a fused MatMul + Add in the other, and refuses the merged partition."""
    import re

    with pytest.raises(partition.PartitionBudgetError) as info:
        PartitionGraphPass(max_weight_bytes=1000)(stage_models[2])
    smallest = int(re.search(r"works is (\d+)", str(info.value)).group(1))
    prof2 = partition.profile(partition.prepare(stage_models[2]))
    cuts = partition.plan_cuts(prof2, max_weight_bytes=smallest)
    assert len(cuts) > 10
    for p in cuts:
        node, before = prof2.nodes[p], prof2.nodes[p - 1]
        reads_before = any(v is not None and v.producer() is before for v in node.inputs)
        assert not (reads_before and node.op_type == "Add" and before.op_type in ("MatMul", "Gemm")), node.name
    weights2 = partition.partition_weights(prof2, cuts)
    prof1 = partition.profile(partition.prepare(stage_models[1]))
    assert set(partition.align_parts(prof1, weights2)) == set(range(len(cuts) + 1))


def test_an_op_output_budget_cuts_where_weights_alone_would_not(stage_models, tiny_stage_inputs):
    """The SDXL VAE decoder's weights fit one partition while its ops write 11 GB per call;
    the op-output budget alone must cut it, every partition under it, and the chain stays
    exact."""
    import re

    model = stage_models[2]
    feeds = {k: v.numpy() for k, v in tiny_stage_inputs[2].items()}
    ref = run_onnx(model, feeds, optimize=False)[0]
    prof = partition.profile(partition.prepare(model))
    total = int(prof.outputs.sum())
    assert total == sum(_written(n) for n in model.graph) > 0
    assert partition.plan_cuts(prof, max_weight_bytes=10**9) == []
    budget = total // 3
    PartitionGraphPass(max_weight_bytes=10**9, max_output_bytes=budget)(model)
    parts = partition.split(model)
    assert len(parts) >= 3
    for part in parts:
        assert sum(_written(n) for n in part.graph) <= budget
    assert np.array_equal(_chain(parts, feeds)["out"], ref)
    with pytest.raises(partition.PartitionBudgetError, match=r"op-output budget must be at least \d+") as info:
        partition.plan_cuts(prof, max_weight_bytes=10**9, max_output_bytes=1000)
    assert int(re.search(r"at least (\d+)", str(info.value)).group(1)) >= max(_written(n) for n in model.graph)


def _written(node) -> int:
    """Bytes a node writes per call, floats at 16 bit, from its output shapes."""
    return sum(int(np.prod([int(d) for d in v.shape])) * (2 if v.dtype.is_floating_point() else v.dtype.itemsize)
               for v in node.outputs)
