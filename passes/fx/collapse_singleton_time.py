"""Collapse a video graph run on one frame (T = 1) to 4-D: causal Conv3d -> Conv2d."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.passes.base import Pass, PassResult, PostconditionError

# Ops that act on each element (or each element and a scalar): on a 5-D tensor with a
# singleton axis they are the same op on the 4-D tensor without it.
_ELEMENTWISE_MODULES = (nn.SiLU, nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity)
_ELEMENTWISE_FUNCTIONS = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul,
                          torch.sub, torch.tanh, torch.sigmoid, F.silu, F.relu, F.gelu}
_ELEMENTWISE_METHODS = {"add", "mul", "sub", "div", "tanh", "sigmoid", "float", "type_as", "contiguous"}


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _singleton(node: fx.Node, axis: int | None = None) -> int | None:
    """The singleton axis of a 5-D node (the given one, else the time axis 2, else any)."""
    shape = _shape(node)
    if shape is None or len(shape) != 5:
        return None
    for a in ([axis] if axis is not None else [2, 1, 0, 3, 4]):
        if shape[a] == 1:
            return a
    return None


def _ints(args) -> list[int]:
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = args[0]
    return [int(a) for a in args]


class CollapseSingletonTimePass(Pass):
    """Rewrite a graph whose video tensors have one frame ([B, C, 1, H, W]) into 4-D ops::

        before: x5 = unsqueeze(img, 2); y = Conv3d_k(pad(x5, (w, w, h, h, k_t - 1, 0)))
        after:  y4 = Conv2d(img, W[:, :, k_t - 1], padding=(h, w))          (no 5-D tensor)

    A causal Conv3d pads k_t - 1 zero frames in front, so on one frame only its last
    temporal tap sees data: it is a Conv2d with that tap's weights, whatever its temporal
    stride (a temporal downsampler keeps one frame). A per-frame norm's
    ``(B T) C H W`` reshapes and permutes become no-ops; elementwise ops, adds and the
    final squeeze follow. On the 320x512 first frame this is 1071 -> 363 GMAC (the zero
    taps are not computed) and no 5-D tensor reaches the HTP. Exact: the dropped taps
    multiply zeros. The whole graph is rewritten or, if a 5-D tensor reaches an op this
    pass does not know, left alone with a note naming it.
    """

    IR = "fx"
    NAME = "collapse_singleton_time"
    LOOKS_FOR = "5-D tensor with a singleton time axis (a video model run on one frame)"

    def call(self, gm: fx.GraphModule) -> PassResult:
        fx_utils.propagate_shapes(gm)
        video = [n for n in gm.graph.nodes if n.op != "output" and _singleton(n) is not None]
        if not video:
            return PassResult(gm, False)
        blocker = next((b for n in video for b in (self._unlifted(n, video), self._blocker(gm, n)) if b), None)
        if blocker is not None:
            self.leave(blocker[0], blocker[1])
            return PassResult(gm, False)
        collapsed = self._rewrite(gm, video)
        fx_utils.erase_unused(gm, [n for n in gm.graph.nodes if not n.users])  # the 5-D chain, now unread
        gm.delete_all_unused_submodules()
        fx_utils.recompile(gm)
        fx_utils.propagate_shapes(gm)
        left = [n.name for n in gm.graph.nodes if len(_shape(n) or ()) == 5]
        if left:
            raise PostconditionError(f"collapse_singleton_time: 5-D tensors remain at {', '.join(left[:3])}")
        self.leave("graph", f"{collapsed} Conv3d collapsed to Conv2d")
        return PassResult(gm, True)

    @staticmethod
    def _is_lift(node: fx.Node) -> bool:
        """A 4-D tensor given a singleton axis (unsqueeze, or a reshape/view to the same
        dimensions plus a 1)."""
        if node.op != "call_method" or node.target not in ("unsqueeze", "reshape", "view"):
            return False
        source = _shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        kept = list(_shape(node))
        del kept[_singleton(node)]
        return source is not None and len(source) == 4 and list(source) == kept

    def _unlifted(self, node: fx.Node, video: list[fx.Node]) -> tuple[str, str] | None:
        """A 5-D node made from 4-D inputs only must be a lift; anything else (a 5-D
        constant, a graph input) cannot be collapsed."""
        if any(a in video for a in node.all_input_nodes) or self._is_lift(node):
            return None
        return node.name, f"{node.name} ({list(_shape(node))}) is made by {node.op} {node.target}, not from a 4-D " \
                          "tensor"

    # -- what each use of a 5-D node may be ----------------------------------------------
    def _blocker(self, gm: fx.GraphModule, node: fx.Node) -> tuple[str, str] | None:
        for user in node.users:
            kind = self._kind(gm, user, node)
            if kind is None:
                return user.name, f"{node.name} ({list(_shape(node))}) reaches {fx_utils.op_key(user, gm)}, " \
                                  "which this pass cannot collapse"
        return None

    def _kind(self, gm: fx.GraphModule, user: fx.Node, source: fx.Node) -> str | None:
        if user.op == "output":
            return None  # a 5-D graph output: the graph's interface would change
        if user.op == "call_module":
            module = gm.get_submodule(user.target)
            if isinstance(module, nn.Conv3d) and self._conv_tap(module, user, source) is not None:
                return "conv"
            return "elementwise" if isinstance(module, _ELEMENTWISE_MODULES) else None
        if user.op == "call_function":
            if user.target is F.pad:
                pads = user.args[1] if len(user.args) > 1 else user.kwargs.get("pad")
                conv_users = [u for u in user.users if u.op == "call_module"
                              and isinstance(gm.get_submodule(u.target), nn.Conv3d)]
                ok = (len(pads) == 6 and (user.kwargs.get("mode", "constant") == "constant")
                      and not user.kwargs.get("value") and len(conv_users) == len(user.users) > 0)
                return "pad" if ok and all(self._conv_tap(gm.get_submodule(u.target), u, user) is not None
                                           for u in conv_users) else None
            if user.target in _ELEMENTWISE_FUNCTIONS:
                return "elementwise" if self._same_layout(user, source) else None
            if user.target is operator.getitem:
                return "select" if self._is_select(user, source) else None
            return None
        if user.op == "call_method":
            if user.target in _ELEMENTWISE_METHODS:
                return "elementwise" if self._same_layout(user, source) else None
            if user.target in ("permute", "reshape", "view", "squeeze", "unsqueeze"):
                return user.target if self._shape_op_ok(user, source) else None
        return None

    @staticmethod
    def _same_layout(user: fx.Node, source: fx.Node) -> bool:
        """Every tensor operand is 5-D with the same shape as the output, or a scalar."""
        out = _shape(user)
        for arg in user.all_input_nodes:
            shape = _shape(arg)
            if shape is not None and shape != out:
                return False
        return out is not None and len(out) == 5

    @staticmethod
    def _is_select(user: fx.Node, source: fx.Node) -> bool:
        index = user.args[1]
        axis = _singleton(source)
        if not isinstance(index, tuple) or len(index) <= axis or index[axis] != 0:
            return False
        return all(i == slice(None) for j, i in enumerate(index) if j != axis)

    @staticmethod
    def _shape_op_ok(user: fx.Node, source: fx.Node) -> bool:
        out = _shape(user)
        if out is None:
            return False
        dropped = list(_shape(source))
        del dropped[_singleton(source)]
        if len(out) == 4:  # back to 4-D: must be the same tensor without the singleton
            return (user.target in ("reshape", "view", "squeeze")) and list(out) == dropped
        if len(out) == 5 and _singleton(user) is not None:
            kept = list(out)
            del kept[_singleton(user)]
            if user.target == "permute":
                perm = _ints(user.args[1:])
                axis = _singleton(source)
                rest = [p for p in perm if p != axis]
                return rest == sorted(rest)  # the other axes keep their order
            return kept == dropped
        return False

    @staticmethod
    def _conv_tap(module: nn.Conv3d, conv: fx.Node, source: fx.Node) -> int | None:
        """The temporal tap that sees the one frame, if the conv's output has one frame."""
        padded = source
        front = module.padding[0] if isinstance(module.padding, tuple) else 0
        if source.op == "call_function" and source.target is F.pad:
            pads = source.args[1] if len(source.args) > 1 else source.kwargs["pad"]
            front += pads[4]
            padded = source.args[0]
        if _singleton(padded) != 2 or module.dilation[0] != 1 or module.groups != 1:
            return None
        out = _shape(conv)
        if out is None or out[2] != 1 or front >= module.kernel_size[0]:
            return None
        return front

    # -- the rewrite ----------------------------------------------------------------------
    def _rewrite(self, gm: fx.GraphModule, video: list[fx.Node]) -> int:
        graph = gm.graph
        flat: dict[fx.Node, fx.Node] = {}  # 5-D node -> its 4-D equivalent
        spatial_pad: dict[fx.Node, tuple[int, int, int, int]] = {}
        collapsed = 0
        for node in list(graph.nodes):
            if node in video and self._is_lift(node):
                flat[node] = node.args[0]
                continue
            sources = [a for a in node.all_input_nodes if a in flat or a in spatial_pad]
            if not sources:
                continue
            source = sources[0]
            if node.op == "call_function" and node.target is F.pad:
                pads = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
                flat[node] = flat[source]
                spatial_pad[node] = tuple(pads[:4])
            elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Conv3d):
                module = gm.get_submodule(node.target)
                tap = self._conv_tap(module, node, source)
                pads = spatial_pad.get(source, (0, 0, 0, 0))
                conv2d = self._as_conv2d(module, tap, pads)
                name = f"{node.target.replace('.', '_')}_2d"
                gm.add_submodule(name, conv2d)
                with graph.inserting_before(node):
                    inp = flat[source]
                    if not conv2d.symmetric:
                        inp = graph.call_function(F.pad, (inp, pads))
                    flat[node] = graph.call_module(name, (inp,))
                collapsed += 1
            elif node.op == "call_method" and node.target in ("permute", "reshape", "view", "squeeze") \
                    and len(_shape(node) or ()) == 4:
                node.replace_all_uses_with(flat[source])
            elif node.op == "call_method" and node.target in ("permute", "reshape", "view", "unsqueeze"):
                flat[node] = flat[source]
            elif node.op == "call_function" and node.target is operator.getitem:
                node.replace_all_uses_with(flat[source])
            else:  # elementwise: the same op on the 4-D operands
                with graph.inserting_before(node):
                    args = fx.node.map_arg(node.args, lambda a: flat.get(a, a))
                    kwargs = fx.node.map_arg(node.kwargs, lambda a: flat.get(a, a))
                    flat[node] = graph.create_node(node.op, node.target, args, kwargs)
        return collapsed

    @staticmethod
    def _as_conv2d(module: nn.Conv3d, tap: int, pads: tuple[int, int, int, int]) -> nn.Conv2d:
        wl, wr, ht, hb = pads
        symmetric = wl == wr and ht == hb
        own = module.padding[1:] if isinstance(module.padding, tuple) else (0, 0)
        conv = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size[1:], stride=module.stride[1:],
                         padding=(own[0] + (ht if symmetric else 0), own[1] + (wl if symmetric else 0)),
                         bias=module.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(module.weight[:, :, tap])
            if module.bias is not None:
                conv.bias.copy_(module.bias)
        conv.requires_grad_(False)
        conv.symmetric = symmetric
        return conv
