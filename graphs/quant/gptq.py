"""Data-aware rounding of int8 per-channel weights (GPTQ, Frantar et al. 2023).

Round-to-nearest int8 per-channel weights lose a few dB per Linear, and a deep model chains
hundreds of them. GPTQ keeps the grid that
round-to-nearest would use (symmetric, one scale per output channel, set by the channel's
extreme value) and chooses the integers column by column, pushing each rounding error onto
the input channels not yet rounded through the inverse Hessian H = sum(X^T X) of the layer's
calibration inputs. The weights it returns lie exactly on that grid, so aimet's min-max
per-channel encodings reproduce it bit for bit and nothing downstream changes.

Layers whose calibration inputs hold too few rows for their width (the adaLN Linears see
one conditioning vector per call) gain nothing and are left to round-to-nearest. With few
calibration calls GPTQ fits its own rows; the damping below counters that. Its gains, per
layer and per setting, are in docs/quantization.md. Conv weights take the same path: each
output position's input patch is one row, the weight reshaped to [C * kh * kw, O].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import scipy.linalg
import torch

from neodragon_npu.graphs import qnn
from neodragon_npu.graphs.onnx_edit import const_array, matches_any
from neodragon_npu.graphs.quant.layerwise import MAX_EXPOSED_BYTES, expose, exposure_batches

QMIN, QMAX = -128, 127  # aimet's symmetric int8 grid: scale * {-128 .. 127}, zero point 0
# Rows (tokens, or conv output positions) taken from each calibration feed: every token of
# the denoiser's largest stage (1728); fewer left an FF2 input (K = 6144) with fewer rows
# than columns.
DEFAULT_ROWS_PER_FEED = 2048
# Diagonal damping, as a fraction of the mean of diag(H). GPTQ's paper uses 0.01 with 128 x
# 2048 rows per layer; here an image-stream Linear gets 4800 rows from its 6 calls (3x K,
# 0.8x for the FF down projection's K = 6144), a context one 768 (0.5x K), many of them
# repeats (padding tokens; the same 128 prompt tokens in every call of a prompt), and 0.01
# fits them too closely (docs/quantization.md).
DEFAULT_DAMP = 0.1


def channel_scales(w_kn: np.ndarray) -> np.ndarray:
    """Per-output-channel scale of a [K, N] weight as aimet's min-max encoder sets it: the
    largest positive value lands on 127 or the most negative on -128, whichever needs the
    larger step."""
    scale = np.maximum(w_kn.max(axis=0) / QMAX, w_kn.min(axis=0) / QMIN)
    return np.where(scale > 0, scale, 1.0)


def _defining_rows(w_kn: np.ndarray) -> np.ndarray:
    """Row of the element that sets each channel's scale (on 127 or -128 after rounding)."""
    positive = w_kn.max(axis=0) / QMAX >= w_kn.min(axis=0) / QMIN
    return np.where(positive, w_kn.argmax(axis=0), w_kn.argmin(axis=0))


def inverse_upper_cholesky(h: np.ndarray) -> np.ndarray:
    """The upper-triangular U with U^T U = H^-1, for a symmetric positive definite H,
    without forming H^-1: the Cholesky factor of H with its index order reversed is an
    upper R with H = R R^T, and U = R^-1 (a triangular solve): about 2K^3/3 flops
    against 7K^3/3 for inverting H and factoring the inverse (K = 6144 for an FF2 weight).

    Computed in float32, as GPTQ itself does (torch's Cholesky, LAPACK's triangular
    inverse ``strtri``, which takes K^3/3 flops against K^3 for a triangular solve against
    the identity), and again in float64 if the float32 factorisation fails. On a K = 6144
    Hessian the float32 factor differs from the float64 one by 2e-7 (relative)."""
    h32 = torch.from_numpy(np.ascontiguousarray(h, dtype=np.float32))
    lower_flipped, info = torch.linalg.cholesky_ex(h32.flip(0, 1))
    if int(info) == 0:
        r = np.asfortranarray(lower_flipped.flip(0, 1).numpy())
        u, info = scipy.linalg.lapack.strtri(r, lower=0, overwrite_c=1)
        if info == 0 and np.isfinite(u).all():
            return np.triu(u)
    lower_flipped = np.linalg.cholesky(np.asarray(h, dtype=np.float64)[::-1, ::-1])
    r = np.ascontiguousarray(lower_flipped[::-1, ::-1])
    u, info = scipy.linalg.lapack.dtrtri(r, lower=0)
    if info != 0:
        raise np.linalg.LinAlgError(f"triangular inverse failed (info {info})")
    return u.astype(np.float32)


def snap_to_grid(w_kn: np.ndarray, values_kn: np.ndarray) -> np.ndarray:
    """``values_kn`` rounded to the nearest point of ``w_kn``'s int8 grid (what a min-max
    per-channel quantizer computed from ``w_kn`` makes of them)."""
    scale = channel_scales(w_kn.astype(np.float64))
    return (np.clip(np.round(values_kn / scale), QMIN, QMAX) * scale).astype(w_kn.dtype)


def keep_scales(w_kn: np.ndarray, rounded_kn: np.ndarray) -> np.ndarray:
    """``rounded_kn`` (on the grid of ``w_kn``) with each channel's scale-setting element put
    back to its round-to-nearest value, so that a min-max encoder finds the same scale in the
    result as in ``w_kn`` (another rounding may have moved that element one step in)."""
    out = np.array(rounded_kn, copy=True)
    scale = channel_scales(w_kn.astype(np.float64))
    rows, cols = _defining_rows(w_kn), np.arange(w_kn.shape[1])
    out[rows, cols] = (np.round(w_kn[rows, cols] / scale) * scale).astype(out.dtype)
    return out


def round_to_nearest(w_kn: np.ndarray) -> np.ndarray:
    scale = channel_scales(w_kn.astype(np.float64))
    return (np.clip(np.round(w_kn / scale), QMIN, QMAX) * scale).astype(w_kn.dtype)


def on_grid(w_kn: np.ndarray, atol: float = 1e-4) -> bool:
    """True when every channel already lies on its own int8 grid (a rounded weight)."""
    scale = channel_scales(w_kn.astype(np.float64))
    q = w_kn / scale
    return bool(np.all(np.abs(q - np.round(q)) <= atol))


def gptq_round(
    w_kn: np.ndarray, hessian: np.ndarray, *, cross: np.ndarray | None = None, block: int = 128,
    damp: float = DEFAULT_DAMP, act_order: bool = True,
) -> np.ndarray:
    """GPTQ-rounded copy of ``w_kn`` ([K inputs, N output channels]) for ``hessian`` [K, K]
    (H = X~^T X~ of the inputs the layer will see).

    The result lies on round_to_nearest's grid and keeps the element that sets each
    channel's scale in place, so a min-max encoder recomputes exactly the same scales.
    ``act_order`` rounds the input channels with the most energy first (their errors are
    then spread over the weaker ones).

    ``cross`` = X~^T (X - X~), with X the inputs the float model gives the layer, aims the
    rounding at the float layer's output X W instead of X~ W (asymmetric calibration, as
    in GPTAQ, Li et al. 2025): the weight first moves to the least-squares optimum
    W + H^-1 X~^T (X - X~) W, absorbing part of the error the quantized layers before left
    in X~, and is then rounded on its own grid (which moves with it).
    """
    w_kn = np.asarray(w_kn)
    k = w_kn.shape[0]
    if hessian.shape != (k, k) or (cross is not None and cross.shape != (k, k)):
        raise ValueError(f"gptq: hessian {hessian.shape} does not match weight {w_kn.shape}")
    if act_order:
        order = np.argsort(-np.diag(hessian), kind="stable")
        permuted = None if cross is None else cross[np.ix_(order, order)]
        out = gptq_round(w_kn[order], hessian[np.ix_(order, order)], cross=permuted, block=block, damp=damp,
                         act_order=False)
        return out[np.argsort(order)]
    h = np.array(hessian, dtype=np.float32, copy=True)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h), dtype=np.float64))
    # upper Cholesky factor of H^-1 (H^-1 = U^T U): row i holds how column i's error
    # spreads to i+1..K
    h_inv = inverse_upper_cholesky(h)
    del h
    if cross is not None:
        shift = h_inv.T @ (h_inv @ (cross.astype(np.float32) @ w_kn.astype(np.float32)))
        shift[dead] = 0.0
        w_kn = (w_kn.astype(np.float32) + shift).astype(w_kn.dtype)

    scale64 = channel_scales(w_kn.astype(np.float64))
    scale = scale64.astype(np.float32)
    pinned_row = _defining_rows(w_kn)
    pinned_q = np.round(w_kn[pinned_row, np.arange(w_kn.shape[1])] / scale)

    work = w_kn.astype(np.float32, copy=True)
    work[dead] = 0.0
    q_out = np.empty_like(work)
    for i0 in range(0, k, block):
        i1 = min(i0 + block, k)
        errors = np.empty((i1 - i0, work.shape[1]), dtype=np.float32)
        for i in range(i0, i1):
            row = work[i]
            q = np.clip(np.round(row / scale), QMIN, QMAX)
            q_out[i] = q
            err = (row - q * scale) / h_inv[i, i]
            errors[i - i0] = err
            if i + 1 < i1:
                work[i + 1 : i1] -= np.outer(h_inv[i, i + 1 : i1], err)
        if i1 < k:
            work[i1:] -= h_inv[i0:i1, i1:].T @ errors
    q_out[pinned_row, np.arange(w_kn.shape[1])] = pinned_q
    q_out[dead] = np.clip(np.round(w_kn[dead] / scale), QMIN, QMAX)
    return (q_out.astype(np.float64) * scale64).astype(w_kn.dtype)


@dataclass(frozen=True)
class ConvGeometry:
    """How a 2-D convolution reads its input: each output position multiplies one patch."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right (ONNX order)
    dilations: tuple[int, int]

    def rows(self, x: np.ndarray, count: int) -> np.ndarray:
        """Up to ``count`` evenly spaced output positions' input patches of ``x`` [1, C, H, W],
        as rows [R, C * kh * kw] in the order of the weight's reshape(O, -1)."""
        (kh, kw), (sh, sw), (top, left, bottom, right), (dh, dw) = self.kernel, self.strides, self.pads, self.dilations
        xp = np.pad(np.asarray(x[0], dtype=np.float32), ((0, 0), (top, bottom), (left, right)))
        ho = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
        wo = (xp.shape[2] - (kw - 1) * dw - 1) // sw + 1
        flat = np.arange(ho * wo)
        if flat.size > count:
            flat = np.linspace(0, flat.size - 1, count).round().astype(int)
        oy, ox = flat // wo, flat % wo
        ys = oy[:, None] * sh + np.arange(kh)[None, :] * dh  # [R, kh]
        xs = ox[:, None] * sw + np.arange(kw)[None, :] * dw  # [R, kw]
        patches = xp[:, ys[:, :, None], xs[:, None, :]]  # [C, R, kh, kw]
        return np.ascontiguousarray(patches.transpose(1, 0, 2, 3).reshape(len(flat), -1))


@dataclass
class _Site:
    weight: str  # initializer name
    x: str  # the activation it multiplies
    transposed: bool  # Gemm(transB=1): stored [N, K]
    conv: ConvGeometry | None = None  # a Conv: the weight [O, C, kh, kw] acts as [C*kh*kw, O]

    def to_kn(self, w: np.ndarray) -> np.ndarray:
        if self.conv is not None:
            return w.reshape(w.shape[0], -1).T
        return w.T if self.transposed else w

    def from_kn(self, w_kn: np.ndarray, shape) -> np.ndarray:
        if self.conv is not None:
            return np.ascontiguousarray(w_kn.T).reshape(shape)
        return w_kn.T.copy() if self.transposed else w_kn


@dataclass
class HessianSet:
    """Hessians of the inputs of a model's weight-bearing MatMul/Gemm nodes, accumulated over
    calibration feeds (and over several graphs that share the weights, e.g. the three stage
    graphs), and the rounded weights computed from them (each weight rounded once).

    ``rows_per_feed`` caps the rows (tokens) taken from each feed, evenly strided, to keep
    X^T X cheap; an input is used only if it got at least ``min_rows_ratio`` x K rows.
    """

    rows_per_feed: int = DEFAULT_ROWS_PER_FEED
    min_rows_ratio: float = 0.5
    total_feeds: int | None = None  # if known: inputs that cannot reach the ratio are not tracked
    max_exposed_bytes: int = MAX_EXPOSED_BYTES  # per run: see accumulate
    # X^T X (fp32) per input, keyed by the first name (sorted) of the weights reading that
    # input: tensor names differ between separately exported graphs, weight names do not
    hessians: dict[str, np.ndarray] = field(default_factory=dict)
    # X~^T (X - X~) per input when float-chain feeds were given (see gptq_round's cross)
    cross: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    inputs_of: dict[str, str] = field(default_factory=dict)  # weight -> its input's key
    rounded: dict[str, np.ndarray] = field(default_factory=dict)

    def eligible(self, weight: str) -> bool:
        if weight in self.rounded:
            return True
        x = self.inputs_of.get(weight)
        if x is None or x not in self.hessians:
            return False
        return self.rows[x] >= self.min_rows_ratio * self.hessians[x].shape[0]

    def release(self) -> None:
        """Free the Hessians once every shared weight is rounded (the rounded copies stay)."""
        self.hessians.clear()
        self.cross.clear()

    def accumulate(self, model_path: str | Path, feeds: Sequence[Mapping[str, np.ndarray]],
                   skip: Iterable[str] = (), float_feeds: Sequence[dict[str, np.ndarray]] | None = None) -> int:
        """Run the float model at ``model_path`` on ``feeds`` and add every weight-bearing
        MatMul/Gemm/Conv input's X^T X. Returns the number of inputs tracked.

        The inputs are read as extra graph outputs, at most ``max_exposed_bytes`` of them
        (fp32) per run: a partition at 640x1024 reads gigabytes of conv inputs, and exposed
        all at once they cannot share memory. Each group of inputs gets its own session
        and runs over all feeds, so a partition with more inputs than the budget is run
        more than once (its earlier groups stop where their last input is made).

        ``float_feeds`` are the same samples as the float chain (unquantized partitions)
        delivers them: the model runs on them too, adds X~^T (X - X~) per input (the
        rounding then aims at the float layer's output) and writes its graph outputs into
        them, so they are ready for the next partition."""
        if float_feeds is not None and len(float_feeds) != len(feeds):
            raise ValueError(f"accumulate: {len(feeds)} feeds but {len(float_feeds)} float feeds")
        path = Path(model_path)
        proto = onnx.load(str(path), load_external_data=False)
        # (input tensor, how it is read: None for MatMul/Gemm, a conv's geometry) -> weights
        readers: dict[tuple[str, ConvGeometry | None], list[str]] = {}
        for site in weight_sites(ir.serde.deserialize_model(proto), skip):
            readers.setdefault((site.x, site.conv), []).append(site.weight)
        if not readers and float_feeds is None:
            return 0
        groups = sorted(readers, key=lambda g: (g[0], g[1] is not None, str(g[1])))
        key_of = {g: min(readers[g]) for g in groups}
        self.inputs_of.update({w: key_of[g] for g in groups for w in readers[g]})
        batches = exposure_batches(proto, {g[0] for g in groups}, self.max_exposed_bytes)
        outputs = [o.name for o in proto.graph.output]
        probe = path.with_name(f".{path.stem}.probe.onnx")  # next to it: same external data
        try:
            for b, batch in enumerate(batches):
                last = b == len(batches) - 1
                # the float run of the last group also brings the graph outputs
                carried = float_feeds is not None and last
                fetch_float = batch + ([o for o in outputs if o not in batch] if carried else [])
                if not fetch_float:
                    continue
                probe.write_bytes(expose(proto, fetch_float))
                session = qnn.cpu_session(probe)
                wanted = [i.name for i in session.get_inputs()]
                in_batch = [g for g in groups if g[0] in batch]
                for i, feed in enumerate(feeds):
                    value_of = dict(zip(batch, session.run(batch, {n: feed[n] for n in wanted}))) if batch else {}
                    target_of = None
                    if float_feeds is not None:
                        env = float_feeds[i]
                        run = dict(zip(fetch_float, session.run(fetch_float, {n: env[n] for n in wanted})))
                        if carried:
                            env.update({o: run[o] for o in outputs})
                        target_of = {t: run[t] for t in batch}
                        del run
                    for group in in_batch:
                        self._add(key_of[group], group, value_of[group[0]],
                                  None if target_of is None else target_of[group[0]])
                    del value_of, target_of
                del session
        finally:
            probe.unlink(missing_ok=True)
        return len(groups)

    def _add(self, name: str, group: tuple[str, ConvGeometry | None], x: np.ndarray, target: np.ndarray | None) -> None:
        """One feed's rows of one input into its Hessian (and cross term, given the float
        chain's ``target`` for the same input)."""
        conv = group[1]
        if conv is not None:
            x2 = conv.rows(x, self.rows_per_feed)
            k = x2.shape[1]
            if self.total_feeds and x2.shape[0] * self.total_feeds < self.min_rows_ratio * k:
                return
            t2 = conv.rows(target, self.rows_per_feed) if target is not None else None
        else:
            rows, k = int(np.prod(x.shape[:-1])), x.shape[-1]
            if self.total_feeds and min(rows, self.rows_per_feed) * self.total_feeds < self.min_rows_ratio * k:
                return  # too few rows for its width: it will be rounded to nearest
            pick = None
            if rows > self.rows_per_feed:
                pick = np.linspace(0, rows - 1, self.rows_per_feed).round().astype(int)
            x2 = np.asarray(x, dtype=np.float32).reshape(-1, k)
            x2 = x2 if pick is None else x2[pick]
            t2 = None
            if target is not None:
                t2 = np.asarray(target, dtype=np.float32).reshape(-1, k)
                t2 = t2 if pick is None else t2[pick]
        if name not in self.hessians:
            self.hessians[name] = np.zeros((k, k), dtype=np.float32)
            self.rows[name] = 0
        self.hessians[name] += x2.T @ x2
        self.rows[name] += x2.shape[0]
        if t2 is not None:
            if name not in self.cross:
                self.cross[name] = np.zeros((k, k), dtype=np.float32)
            self.cross[name] += x2.T @ (t2 - x2)


def weight_sites(model: ir.Model, skip: Iterable[str] = ()) -> list[_Site]:
    """MatMul(x, W) and Gemm(x, W) nodes with a 2-D initializer weight, and 2-D Conv(x, W)
    nodes (one group) with a 4-D initializer weight; nodes matching a ``skip`` pattern
    (:func:`graphs.onnx_edit.matches_any`: the weights kept at 16 bit) are left out."""
    patterns = list(skip)
    sites: list[_Site] = []
    for node in model.graph:
        if node.op_type == "Conv" and len(node.inputs) >= 2:
            site = _conv_site(node)
            if site is not None and not matches_any(node, patterns):
                sites.append(site)
            continue
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if w is None or not w.is_initializer() or w.const_value is None or len(w.shape or ()) != 2:
            continue
        if node.op_type == "Gemm":
            attrs = {a.name: a.value for a in node.attributes.values()}
            if attrs.get("transA", 0):
                continue
            transposed = bool(attrs.get("transB", 0))
        else:
            transposed = False
        if matches_any(node, patterns):
            continue
        sites.append(_Site(w.name, node.inputs[0].name, transposed))
    return sites


def _conv_site(node: ir.Node) -> _Site | None:
    w = node.inputs[1]
    if w is None or not w.is_initializer() or w.const_value is None or len(w.shape or ()) != 4:
        return None
    attrs = {a.name: a.value for a in node.attributes.values()}
    if attrs.get("group", 1) != 1 or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return None
    kernel = tuple(int(d) for d in w.shape[2:])
    pads = tuple(attrs.get("pads", (0, 0, 0, 0)))
    geometry = ConvGeometry(kernel, tuple(attrs.get("strides", (1, 1))), (pads[0], pads[1], pads[2], pads[3]),
                            tuple(attrs.get("dilations", (1, 1))))
    return _Site(w.name, node.inputs[0].name, False, geometry)


def round_model_weights(model: ir.Model, hessians: HessianSet, skip: Iterable[str] = ()) -> list[str]:
    """Replace every eligible weight of ``model`` by its GPTQ rounding (computed once per
    weight name and cached in ``hessians``). Returns the names replaced."""
    replaced = []
    for site in weight_sites(model, skip):
        if not hessians.eligible(site.weight):
            continue
        value = model.graph.initializers[site.weight]
        if site.weight not in hessians.rounded:
            w = const_array(value)
            w_kn = site.to_kn(w)
            if on_grid(w_kn):
                continue
            key = hessians.inputs_of[site.weight]
            rounded = gptq_round(w_kn, hessians.hessians[key], cross=hessians.cross.get(key))
            hessians.rounded[site.weight] = site.from_kn(rounded, w.shape)
        value.const_value = ir.tensor(hessians.rounded[site.weight], name=site.weight)
        replaced.append(site.weight)
    return replaced
