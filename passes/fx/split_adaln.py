"""A Linear whose output is chunked into k parts becomes k Linears."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.graphs.fx import target_name
from neodragon_npu.passes.base import Pass, PassResult


def _chunk_sizes(node: fx.Node, width: int, rank: int) -> list[int] | None:
    """Sizes of the parts when ``node`` chunks/splits its input along the last dim."""
    name = target_name(node)
    args, kwargs = node.args, node.kwargs
    if name == "chunk":
        chunks = args[1] if len(args) > 1 else kwargs.get("chunks")
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        if dim % rank != rank - 1 or not isinstance(chunks, int) or width % chunks:
            return None
        return [width // chunks] * chunks
    if name == "split":
        size = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("split_size"))
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        if dim % rank != rank - 1:
            return None
        if isinstance(size, int):
            return [size] * (width // size) + ([width % size] if width % size else [])
        if isinstance(size, (list, tuple)) and sum(size) == width:
            return list(size)
    return None


class SplitAdaLNPass(Pass):
    """Split a Linear whose output is chunked along the features into one Linear per chunk.

    adaLN-Zero computes shift/scale/gate for attention and MLP with one Linear (D -> 6D)
    and chunks the result. Quantized as one tensor, all six parts share one encoding sized
    by the widest (ranges 1.7 to 18.4 in the real model), crushing shift/scale to 12-17 dB.
    As six Linears (same FLOPs, same weights) each part gets its own encoding::

        before: e = Linear(D, 6D)(c); a, b, ... = e.unsqueeze(1).chunk(6, -1)
        after:  a = Linear(D, D)[rows 0:D](c).unsqueeze(1); b = ...[rows D:2D] ...

    Matches any Linear followed (optionally through an unsqueeze) by chunk/split on the
    last dim whose parts are each used through ``getitem``.
    """

    IR = "fx"
    NAME = "split_adaln"
    LOOKS_FOR = "Linear whose output is chunked (x.chunk(k) / split)"

    def call(self, gm: fx.GraphModule) -> PassResult:
        split = 0
        for linear in list(gm.graph.find_nodes(op="call_module")):
            module = gm.get_submodule(linear.target)
            if not isinstance(module, nn.Linear) or len(linear.users) != 1:
                continue
            chunker = next(iter(linear.users))
            if target_name(chunker) not in ("unsqueeze", "chunk", "split"):
                continue
            unsqueeze = None
            if target_name(chunker) == "unsqueeze" and len(chunker.users) == 1:
                dim = chunker.args[1] if len(chunker.args) > 1 else chunker.kwargs.get("dim")
                out_rank = len(chunker.meta["tensor_meta"].shape)
                if dim % out_rank == out_rank - 1:
                    self.leave(linear.name, "unsqueezed on its last axis, so its chunks would not be features")
                    continue
                unsqueeze, chunker = chunker, next(iter(chunker.users))
            rank = len((unsqueeze or linear).meta["tensor_meta"].shape)
            sizes = _chunk_sizes(chunker, module.out_features, rank)
            users = list(chunker.users)
            if not sizes or len(sizes) < 2:
                self.leave(linear.name, f"{target_name(chunker)} does not cut the feature axis into two or more parts")
                continue
            if not all(u.target is operator.getitem for u in users):
                self.leave(linear.name, "a reader takes the chunks as a whole, not one by one")
                continue
            self._split(gm, linear, module, unsqueeze, chunker, sizes)
            split += 1
        if split:
            gm.graph.eliminate_dead_code()
            gm.delete_all_unused_submodules()
            fx_utils.recompile(gm)
            fx_utils.propagate_shapes(gm)
        return PassResult(gm, split > 0)

    @staticmethod
    def _split(gm, linear, module, unsqueeze, chunker, sizes) -> None:
        graph = gm.graph
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        for getitem in list(chunker.users):
            i = getitem.args[1]
            lo, hi = starts[i], starts[i] + sizes[i]
            part = nn.Linear(module.in_features, sizes[i], bias=module.bias is not None)
            part.weight = nn.Parameter(module.weight.detach()[lo:hi], requires_grad=False)
            if module.bias is not None:
                part.bias = nn.Parameter(module.bias.detach()[lo:hi], requires_grad=False)
            target = f"{linear.target}_chunk{i}"
            gm.add_submodule(target, part)
            with graph.inserting_before(getitem):
                new = graph.call_module(target, linear.args, linear.kwargs)
                if unsqueeze is not None:
                    new = graph.call_method("unsqueeze", (new, *unsqueeze.args[1:]), dict(unsqueeze.kwargs))
            getitem.replace_all_uses_with(new)
            graph.erase_node(getitem)
