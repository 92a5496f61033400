"""GroupNorm on [N, C, H, W] as per-channel means and 1x1 group averages: no reshape."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.passes.base import Pass, PassResult


def group_average(channels: int, groups: int) -> torch.Tensor:
    """[C, C, 1, 1]: a 1x1 convolution that replaces each channel's value by the mean of its
    group's channels."""
    per = channels // groups
    weight = torch.zeros(channels, channels)
    for g in range(groups):
        weight[g * per:(g + 1) * per, g * per:(g + 1) * per] = 1.0 / per
    return weight[:, :, None, None]


class DecomposedGroupNorm(nn.Module):
    """``GroupNorm(G, C)`` on [N, C, H, W] without reshaping to [N, G, -1]::

        m = A * mean_hw(x);  d = x - m;  v = A * mean_hw(d^2);  y = d * (w / sqrt(v + eps)) + b

    ``A`` is a fixed 1x1 convolution averaging each group's channels (equal-sized groups, so
    the mean of channel means is the group mean). Every op is per channel or per position,
    which an NHWC HTP lays out directly; the [N, G, C/G*H*W] reshape of the usual export
    is a relayout of the whole activation."""

    def __init__(self, norm_groups: int, channels: int, eps: float, weight: torch.Tensor | None,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("average", group_average(channels, norm_groups))
        self.weight = nn.Parameter(weight.detach().clone().reshape(1, channels, 1, 1), requires_grad=False) \
            if weight is not None else None
        self.bias = nn.Parameter(bias.detach().clone().reshape(1, channels, 1, 1), requires_grad=False) \
            if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = F.conv2d(x.mean(dim=(2, 3), keepdim=True), self.average)
        centred = x - mean
        var = F.conv2d((centred * centred).mean(dim=(2, 3), keepdim=True), self.average)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        out = centred * scale
        return out + self.bias if self.bias is not None else out


class DecomposeGroupNormPass(Pass):
    """Replace each GroupNorm on a 4-D tensor by :class:`DecomposedGroupNorm` (exact up to
    float rounding)::

        before: y = group_norm(x, G, w, b, eps)    exported: Reshape -> InstanceNorm -> Reshape
        after:  per-channel means, 1x1 group averages, x - m, * w / sqrt(v + eps), + b

    In a W8A16 graph the exported form, InstanceNormalization between two reshapes to and
    from [N, G, C/G*H*W], gave wrong results in the HTP simulator for the causal VAE encoder
    (docs/causal-vae.md); the decomposed ops each have a quantized HTP kernel. Matches the
    ``group_norm`` function and ``nn.GroupNorm`` modules with affine parameters or none.
    """

    IR = "fx"
    NAME = "decompose_group_norm"
    LOOKS_FOR = "group_norm on a 4-D tensor"

    def call(self, gm: fx.GraphModule) -> PassResult:
        fx_utils.propagate_shapes(gm)
        replaced = 0
        for node in list(gm.graph.nodes):
            found = self._match(gm, node)
            if found is None:
                continue
            x, groups, weight, bias, eps = found
            shape = node.meta.get("tensor_meta")
            if shape is None or len(shape.shape) != 4:
                self.leave(node.name, "not on a 4-D tensor")
                continue
            channels = int(shape.shape[1])
            module = DecomposedGroupNorm(groups, channels, eps, weight, bias)
            name = f"{node.name}_decomposed"
            gm.add_submodule(name, module)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (x,))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            replaced += 1
        if replaced:
            fx_utils.erase_unused(gm, [n for n in gm.graph.nodes if not n.users])
            gm.delete_all_unused_submodules()
            fx_utils.recompile(gm)
        return PassResult(gm, replaced > 0)

    @staticmethod
    def _match(gm: fx.GraphModule, node: fx.Node):
        """(x, groups, weight, bias, eps) of a group norm node, weights as tensors."""
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if type(module) is not nn.GroupNorm:
                return None
            return node.args[0], module.num_groups, module.weight, module.bias, module.eps
        if node.op != "call_function" or node.target is not F.group_norm:
            return None
        args = list(node.args) + [None] * (5 - len(node.args))
        x, groups, weight, bias, eps = args[:5]
        groups = node.kwargs.get("num_groups", groups)
        weight, bias = node.kwargs.get("weight", weight), node.kwargs.get("bias", bias)
        eps = node.kwargs.get("eps", 1e-5 if eps is None else eps)

        def tensor(arg):
            if arg is None:
                return None
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                return operator.attrgetter(arg.target)(gm)
            raise ValueError

        try:
            return x, int(groups), tensor(weight), tensor(bias), float(eps)
        except (ValueError, TypeError):
            return None

