"""Annotate every node with its memory-bounded partition."""

from __future__ import annotations

from typing import Sequence

import onnx_ir as ir

from neodragon_npu.graphs import partition
from neodragon_npu.passes.base import Option, Pass, PassResult, PostconditionError


class PartitionGraphPass(Pass):
    """Cut a graph into sequential partitions under weight, op-output and live-activation budgets.

    Each node gets ``neodragon.partition = k`` in its metadata (``graphs.partition.split``
    then extracts one model per partition). Partitions are contiguous in a topological
    order, so the quotient graph is a chain; cuts minimise the activation bytes crossing
    them. With ``reference`` (each partition's weight names from another stage graph) the
    cuts follow it instead, so partition k of every stage holds the same weights::

        before: one graph, 6 GB of weights (a single offline graph fails past ~2 GiB)
        after:  partition 0 -> 1 -> ... -> K-1, each under ``max_weight_bytes``

    An impossible budget is an error naming the smallest budget that would work.
    """

    IR = "onnx"
    NAME = "partition_graph"
    LOOKS_FOR = "node whose partition changes"
    OPTIONS = {
        "max_weight_bytes": Option("int", "weight bytes one partition may hold", min=1),
        "max_live_bytes": Option("int", "live activation bytes any node may see", min=1, none_ok=True),
        "max_output_bytes": Option("int", "bytes one partition's ops may write per call", min=1, none_ok=True),
        "activation_bytes": Option("int", "bytes per float activation value when pricing", choices=(1, 2, 4)),
    }
    ENGINE_OPTIONS = ("reference",)

    def __init__(
        self,
        *,
        max_weight_bytes: int,
        max_live_bytes: int | None = None,
        max_output_bytes: int | None = None,
        activation_bytes: int = 2,
        reference: Sequence[Sequence[str]] | None = None,
    ) -> None:
        if max_weight_bytes <= 0:
            raise ValueError("partition_graph: max_weight_bytes must be positive")
        self.max_weight_bytes = max_weight_bytes
        self.max_live_bytes = max_live_bytes
        self.max_output_bytes = max_output_bytes
        self.activation_bytes = activation_bytes
        self.reference = [set(r) for r in reference] if reference is not None else None

    def call(self, model: ir.Model) -> PassResult:
        prof = partition.profile(partition.prepare(model), activation_bytes=self.activation_bytes)
        if self.reference is not None:
            parts = partition.align_parts(prof, self.reference)
        else:
            cuts = partition.plan_cuts(
                prof, max_weight_bytes=self.max_weight_bytes, max_live_bytes=self.max_live_bytes,
                max_output_bytes=self.max_output_bytes,
            )
            parts = partition.cuts_to_parts(prof, cuts)
        return PassResult(model, partition.annotate(model, prof, parts))

    def ensures(self, model: ir.Model) -> None:
        import networkx as nx

        if any(partition.partition_of(n) is None for n in model.graph):
            raise PostconditionError("partition_graph: a node has no partition")
        if not nx.is_directed_acyclic_graph(partition.quotient_graph(model)):
            raise PostconditionError("partition_graph: the quotient graph has a cycle")
