"""Remove modules that are the identity at inference (Dropout, Identity)."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.passes.base import Pass, PassResult

_IDENTITY_TYPES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


class RemoveIdentityModulesPass(Pass):
    """Bypass Identity and Dropout modules: at inference y = x, so every use of y reads x.

    Exported as is they cost nothing on CPU but show up as Identity nodes that every later
    pattern match has to look through.
    """

    IR = "fx"
    NAME = "remove_identity_modules"
    LOOKS_FOR = "Dropout or Identity module"

    def call(self, gm: fx.GraphModule) -> PassResult:
        removed = 0
        for node in list(gm.graph.find_nodes(op="call_module")):
            module = gm.get_submodule(node.target)
            if not isinstance(module, _IDENTITY_TYPES) or len(node.args) != 1:
                continue
            if isinstance(module, nn.Identity) or not module.training or module.p == 0:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                removed += 1
        if removed:
            gm.delete_all_unused_submodules()
            fx_utils.recompile(gm)
        return PassResult(gm, removed > 0)
