"""Remove transformer blocks from a traced graph and renumber the rest."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch.fx as fx
from torch import nn

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.passes.base import Option, Pass, PassResult, PreconditionError

ORIGIN = "_origin_block_index"  # set on every block module: its index in the unpruned model


def _block_list_path(gm: fx.GraphModule) -> str:
    """The indexed module list (``<path>.<i>`` children of one class) that most ops were
    traced in -- the transformer blocks -- from the nodes' ``nn_module_stack``."""
    indexed = re.compile(r"^(.*)\.(\d+)$")
    nodes: Counter = Counter()
    for node in gm.graph.nodes:
        for path, (_, cls) in node.meta.get("nn_module_stack", {}).items():
            match = indexed.match(path)
            if match:
                nodes[(match.group(1), cls)] += 1
    return max(nodes, key=lambda k: nodes[k])[0] if nodes else ""


def _children(container: nn.Module) -> list[nn.Module]:
    return [container.get_submodule(str(i)) for i in range(len(container._modules))]


def _block_of(node: fx.Node, prefix: str) -> int | None:
    """Index of the block (current numbering) a node was traced inside, from nn_module_stack."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)$")
    for path in node.meta.get("nn_module_stack", {}):
        match = pattern.match(path)
        if match:
            return int(match.group(1))
    return None


class RemoveBlocksPass(Pass):
    """Remove blocks of a transformer's block list, given by their indices.

    A removed block's residual streams are rewired: every use of a block output reads the
    block input of the same shape (image stream to image stream, text to text). Removing
    the last (context-pre-only) block leaves the new last block's text output unused, so
    its post-attention text path is dead code and goes; what remains computes exactly
    what ``neodragon_models.pruning.prune_blocks`` builds::

        before: h1, c1 = block_k(h0, c0);  h2, c2 = block_k+1(h1, c1)
        after:  h2, c2 = block_k+1(h0, c0)        (then blocks renumbered 0..n-k-1)

    Choosing blocks from importance scores (a count or a threshold) is the build's business
    (``neodragon_models.pruning.select_blocks``); the pass takes indices. Indices always
    refer to the unpruned model (each block module remembers its original
    index), so running the pass again with the same selection changes nothing. The old ->
    new index map goes to ``gm.meta["block_mapping"]`` and to ``mapping_path``.
    """

    IR = "fx"
    NAME = "remove_blocks"
    LOOKS_FOR = "block list"
    OPTIONS = {
        "blocks": Option("int list", "indices of the MMDiT blocks to remove", min=0),
        "blocks_path": Option("str", "attribute path of the block list (default: found by structure)", none_ok=True),
        "mapping_path": Option("path", "write the old -> new block index mapping to this JSON file", none_ok=True),
    }

    def __init__(
        self,
        *,
        blocks: Sequence[int],
        blocks_path: str | None = None,
        mapping_path: str | Path | None = None,
    ) -> None:
        blocks = list(blocks)
        if not blocks or any(not isinstance(b, int) or b < 0 for b in blocks):
            raise ValueError(f"remove_blocks: blocks must be a non-empty list of block indices, got {blocks!r}")
        self.blocks = sorted(set(blocks))
        self.blocks_path = blocks_path
        self.mapping_path = mapping_path

    def _selection(self, n_original: int) -> list[int]:
        bad = [b for b in self.blocks if b >= n_original]
        if bad:
            raise PreconditionError(f"remove_blocks: blocks {bad} do not exist; the model has blocks 0..{n_original - 1}")
        if len(self.blocks) >= n_original:
            raise PreconditionError(f"remove_blocks: removing {len(self.blocks)} of {n_original} blocks leaves none")
        return self.blocks

    def call(self, gm: fx.GraphModule) -> PassResult:
        prefix = self.blocks_path or gm.meta.get("block_list_path") or _block_list_path(gm)
        if not prefix:
            raise PreconditionError("remove_blocks: no block list (nn.ModuleList) found in the graph")
        owner_path, _, attr = prefix.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        blocks = _children(getattr(owner, attr))
        for i, block in enumerate(blocks):
            if not hasattr(block, ORIGIN):
                setattr(block, ORIGIN, i)
        origins = [getattr(b, ORIGIN) for b in blocks]
        n_original = gm.meta.get("original_block_count", len(blocks))
        remove_now = [origins.index(o) for o in self._selection(n_original) if o in origins]
        if not remove_now:
            self.leave(prefix, f"blocks {self.blocks} are already removed")
            return PassResult(gm, False)
        if len(remove_now) == len(blocks):
            raise PreconditionError("remove_blocks: that would remove every block")

        for index in sorted(remove_now, reverse=True):
            self._bypass(gm, prefix, index)
        gm.graph.eliminate_dead_code()
        keep = [i for i in range(len(blocks)) if i not in remove_now]
        self._renumber(gm, prefix, owner, attr, blocks, keep)
        gm.delete_all_unused_submodules()
        fx_utils.recompile(gm)
        fx_utils.propagate_shapes(gm)

        gm.meta["original_block_count"] = n_original
        gm.meta["block_list_path"] = prefix
        mapping = {getattr(b, ORIGIN): new for new, b in enumerate(_children(getattr(owner, attr)))}
        gm.meta["block_mapping"] = mapping
        if self.mapping_path is not None:
            Path(self.mapping_path).write_text(
                json.dumps({"original_blocks": n_original, "old_to_new": {str(k): v for k, v in mapping.items()}}, indent=2)
                + "\n"
            )
        return PassResult(gm, True)

    @staticmethod
    def _bypass(gm: fx.GraphModule, prefix: str, index: int) -> None:
        inside = [n for n in gm.graph.nodes if _block_of(n, prefix) == index]
        members = set(inside)
        inputs = []
        for node in inside:
            for arg in node.all_input_nodes:
                if arg not in members and arg not in inputs:
                    inputs.append(arg)
        outputs = [n for n in inside if any(u not in members for u in n.users)]
        for out in outputs:
            shape = out.meta.get("tensor_meta") and tuple(out.meta["tensor_meta"].shape)
            same = [i for i in inputs if i.meta.get("tensor_meta") is not None
                    and hasattr(i.meta["tensor_meta"], "shape") and tuple(i.meta["tensor_meta"].shape) == shape]
            if len(same) != 1:
                raise PreconditionError(
                    f"remove_blocks: cannot tell which input of block {index} output {out.name} "
                    f"{list(shape or ())} continues ({len(same)} inputs of that shape)"
                )
            for user in [u for u in out.users if u not in members]:
                user.replace_input_with(out, same[0])

    @staticmethod
    def _renumber(gm, prefix: str, owner, attr: str, blocks, keep: list[int]) -> None:
        new_index = {old: new for new, old in enumerate(keep)}
        container = nn.Module()
        for new, old in enumerate(keep):
            container.add_module(str(new), blocks[old])
        setattr(owner, attr, container)
        pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)(\.|$)")

        def rename(path: str) -> str:
            match = pattern.match(path)
            if not match:
                return path
            return f"{prefix}.{new_index[int(match.group(1))]}{path[match.end(1):]}"

        for node in gm.graph.nodes:
            if node.op in ("call_module", "get_attr"):
                node.target = rename(node.target)
            stack = node.meta.get("nn_module_stack")
            if stack:
                node.meta["nn_module_stack"] = type(stack)((rename(k), (rename(v[0]), v[1])) for k, v in stack.items())
