"""Pushing a last-dimension transform of a tensor up an FX graph into parameters.

Several rewrites need a tensor ``t`` to come out of the graph transformed along its last
dimension: permuted (RoPE half-split needs Q/K head dims in evens-then-odds order) or
scaled (folding 1/sqrt(d) into Q). Instead of inserting an op, the transform is pushed up
through the ops that commute with it until it lands in parameters (Linear rows, norm
weights), so the rewritten graph costs nothing extra::

    to_q (Linear) -> view [B,N,H,Dh] -> RMSNorm (* weight) -> cat -> transpose -> t
    permute t's Dh  ==  permute each head's rows of to_q.weight/bias and the norm weight

:func:`plan_push_up` returns a :class:`PushPlan` or, when some op on the way does not
commute, a reason string (it never raises and never edits); :func:`apply_plan` edits.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from neodragon_npu.kernels.rope import rope_full_tables, rope_half_split, rope_interleaved


@dataclass(frozen=True)
class Permute:
    """new[..., j] = old[..., index[j]]."""

    index: tuple[int, ...]

    def lift_heads(self, heads: int) -> "Permute":
        d = len(self.index)
        return Permute(tuple(h * d + i for h in range(heads) for i in self.index))

    def size(self) -> int:
        return len(self.index)


@dataclass(frozen=True)
class Scale:
    factor: float


Transform = Permute | Scale


@dataclass
class ParamEdit:
    target: str  # get_attr / module parameter path in the GraphModule
    transform: Transform
    rows: bool  # True: transform dim 0 (Linear weight rows); False: the last dim


@dataclass
class PushPlan:
    edits: list[ParamEdit] = field(default_factory=list)
    nodes: dict[fx.Node, Transform] = field(default_factory=dict)  # outputs that change


# Functions that are linear in their first argument and act on its last dim elementwise
# per position (their other arguments are tables): a Scale passes straight through.
LINEAR_IN_FIRST_ARG: set[Callable] = {rope_interleaved, rope_half_split, rope_full_tables}

_DATA_MOVEMENT_METHODS = {"contiguous", "clone"}
_SCALE_TRANSPARENT = {"stack", "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "repeat"}
_REDUCTIONS = {"mean", "sum"}


def _meta_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _is_param(gm: fx.GraphModule, node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _depends_on_params(node: fx.Node, cache: dict) -> bool:
    """True when ``node`` reads a parameter or module (not only graph inputs/constants)."""
    if node in cache:
        return cache[node]
    if node.op in ("get_attr", "call_module"):
        result = True
    elif node.op == "placeholder":
        result = False
    else:
        result = any(_depends_on_params(a, cache) for a in node.all_input_nodes)
    cache[node] = result
    return result


def _last_dim_untouched_by_index(index, rank: int) -> bool:
    """Whether ``x[index]`` keeps x's last dim whole and last (no None, no last-dim slice)."""
    index = index if isinstance(index, tuple) else (index,)
    if any(i is None for i in index):
        return False
    if Ellipsis in index:
        after = index[index.index(Ellipsis) + 1 :]
        return not after or after[-1] == slice(None)
    if len(index) < rank:
        return True
    return len(index) == rank and index[-1] == slice(None)


def _normalize_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def plan_push_up(gm: fx.GraphModule, start: fx.Node, transform: Transform) -> PushPlan | str:
    """Plan parameter edits that make ``start``'s output come out transformed."""
    plan = PushPlan()
    deps: dict = {}
    work: list[tuple[fx.Node, Transform]] = [(start, transform)]

    def need(node, t: Transform) -> str | None:
        if not isinstance(node, fx.Node):
            return "a constant operand cannot carry the transform"
        work.append((node, t))
        return None

    while work:
        node, t = work.pop()
        if node in plan.nodes:
            if plan.nodes[node] != t:
                return f"{node.name} would need two different transforms"
            continue
        plan.nodes[node] = t
        shape = _meta_shape(node)
        if shape is None:
            return f"{node.name} has no recorded shape"
        rank = len(shape)
        if isinstance(t, Permute) and shape[-1] != t.size():
            return f"{node.name}: last dim {shape[-1]} does not match the permutation ({t.size()})"

        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, torch.nn.Linear):
                plan.edits.append(ParamEdit(f"{node.target}.weight", t, rows=True))
                if module.bias is not None:
                    plan.edits.append(ParamEdit(f"{node.target}.bias", t, rows=False))
                continue
            return f"cannot push through module {type(module).__name__} ({node.name})"
        if node.op in ("placeholder", "get_attr"):
            return f"{node.name} is a graph input or constant, not a parameterised op"

        target, args = node.target, node.args
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))

        if target in LINEAR_IN_FIRST_ARG and isinstance(t, Scale):
            if (reason := need(args[0], t)) is not None:
                return reason
        elif name in _DATA_MOVEMENT_METHODS or target is torch.neg or name == "neg":
            if (reason := need(args[0], t)) is not None:
                return reason
        elif isinstance(t, Scale) and name in _SCALE_TRANSPARENT:
            for operand in node.all_input_nodes:  # pure data movement: every element scales
                need(operand, t)
        elif name in ("unsqueeze", "squeeze") and isinstance(args[1] if len(args) > 1 else None, int) and (
            _normalize_dim(args[1], rank if name == "unsqueeze" else rank + 1) < (rank - 1 if name == "unsqueeze" else rank)
        ):
            need(args[0], t)
        elif name == "transpose":
            dims = {_normalize_dim(d, rank) for d in args[1:3]}
            if isinstance(t, Permute) and rank - 1 in dims:
                return f"{node.name} moves the last dim"
            need(args[0], t)
        elif name == "permute":
            dims = args[1] if isinstance(args[1], (tuple, list)) else args[1:]
            if isinstance(t, Permute) and _normalize_dim(dims[-1], rank) != rank - 1:
                return f"{node.name} moves the last dim"
            need(args[0], t)
        elif target is operator.getitem:
            src_shape = _meta_shape(args[0])
            keeps_last = src_shape is not None and _last_dim_untouched_by_index(args[1], len(src_shape))
            if isinstance(t, Permute) and not keeps_last:
                return f"{node.name} slices the last dim"
            need(args[0], t)
        elif target is torch.cat:
            tensors = args[0]
            dim = node.kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if isinstance(t, Permute) and _normalize_dim(dim, rank) == rank - 1:
                return f"{node.name} concatenates along the last dim"
            for tensor in tensors:
                if (reason := need(tensor, t)) is not None:
                    return reason
        elif name in ("view", "reshape"):
            src = args[0]
            src_shape = _meta_shape(src)
            if src_shape is None:
                return f"{src.name} has no recorded shape"
            if src_shape[-1] == shape[-1]:
                need(src, t)
            elif isinstance(t, Scale):
                need(src, t)
            elif rank >= 2 and src_shape[-1] == shape[-1] * shape[-2]:
                need(src, t.lift_heads(shape[-2]))  # [.., H*Dh] -> [.., H, Dh]
            else:
                return f"{node.name} reshapes the last dim {src_shape[-1]} -> {shape[-1]}"
        elif target in (operator.mul, torch.mul) or name == "mul":
            reason = _push_mul(gm, node, t, plan, need, deps)
            if reason:
                return reason
        elif target in (operator.add, torch.add, operator.sub, torch.sub) or name in ("add", "sub"):
            for operand in args[:2]:
                if isinstance(operand, fx.Node):
                    if _is_param(gm, operand):
                        plan.edits.append(ParamEdit(operand.target, t, rows=False))
                    elif (reason := need(operand, t)) is not None:
                        return reason
                elif isinstance(t, Scale):
                    return f"{node.name} adds a constant, which does not scale"
        else:
            return f"cannot push through {name} ({node.name})"

    return _check_users(plan, start)


def _push_mul(gm, node, t, plan, need, deps) -> str | None:
    a, b = node.args[:2]
    shape = _meta_shape(node)
    for x, y in ((a, b), (b, a)):
        if not isinstance(y, fx.Node):  # python scalar
            need(x, t)
            return None
        if _is_param(gm, y) and isinstance(x, fx.Node):
            p_shape = _meta_shape(y)
            if p_shape is not None and len(p_shape) == 1 and p_shape[0] == shape[-1]:
                plan.edits.append(ParamEdit(y.target, t, rows=False))
                if isinstance(t, Permute):
                    need(x, t)
                return None
    for x, y in ((a, b), (b, a)):
        y_shape = _meta_shape(y)
        if y_shape is None:
            continue
        if isinstance(t, Permute) and y_shape[-1] == 1:
            need(x, t)  # y is broadcast over the last dim; _check_users verifies invariance
            return None
        if isinstance(t, Scale) and not _depends_on_params(y, deps):
            need(x, t)  # y is a host table: the product scales with x
            return None
    return f"cannot push through the product {node.name}"


def _check_users(plan: PushPlan, start: fx.Node) -> PushPlan | str:
    """Every changed output may only feed changed nodes (or, for a permutation, reductions
    over the last dim, which do not see it)."""
    changed = plan.nodes
    for node, t in changed.items():
        if node is start:
            continue
        for user in node.users:
            if user in changed:
                continue
            if _reads_shape_only(user) or (isinstance(t, Permute) and _invariant_consumer(user)):
                continue
            return f"{node.name} also feeds {user.name}, which would see the transformed values"
    return plan


def _reads_shape_only(user: fx.Node) -> bool:
    """x.shape / x.size() / x.dim() do not see values."""
    if user.target is getattr and len(user.args) > 1 and user.args[1] in ("shape", "dtype", "device"):
        return True
    return user.op == "call_method" and user.target in ("size", "dim")


def _invariant_consumer(user: fx.Node) -> bool:
    """pow/abs/square elementwise followed only by last-dim reductions (RMSNorm statistics)."""
    name = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", "")
    if name in _REDUCTIONS:
        dim = user.kwargs.get("dim", user.args[1] if len(user.args) > 1 else None)
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        return dims == (-1,)
    if name in ("pow", "abs", "square"):
        return all(_invariant_consumer(u) for u in user.users)
    return False


def _transformed(value: torch.Tensor, t: Transform, rows: bool) -> torch.Tensor:
    if isinstance(t, Scale):
        return value * t.factor
    index = torch.tensor(t.index, dtype=torch.long)
    return value.index_select(0 if rows else value.dim() - 1, index)


def apply_plan(gm: fx.GraphModule, plan: PushPlan) -> None:
    """Edit the parameters (in place, keeping Parameter objects and their names)."""
    seen: dict[str, Transform] = {}
    for edit in plan.edits:
        if edit.target in seen:
            continue
        seen[edit.target] = edit.transform
        owner_path, _, attr = edit.target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        value = getattr(owner, attr)
        with torch.no_grad():
            value.copy_(_transformed(value.detach().clone(), edit.transform, edit.rows))
