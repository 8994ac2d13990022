"""WinogradConv2d: legalize wide 3x3 stride-1 convolutions with constant weights as Winograd F(m x m, 3x3)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te, topi
from tvm.relax.transform.legalize_ops.nn import _nn_conv2d
from tvm.topi.nn import winograd_util
from tvm.topi.utils import const_matrix

from .graph import static_shape

WINOGRAD_KERNEL = "conv2d_winograd"
"""Name of the Winograd convolution's kernel, and part of every fused kernel's name that holds one."""


@dataclass(frozen=True)
class Tier:
    """Winograd F(tile x tile, 3x3) for convolutions whose output height and width and both channel counts reach these."""

    tile: int
    min_size: int
    min_channels: int


@dataclass(frozen=True)
class WinogradRule:
    """Which convolutions ``WinogradConv2d`` makes Winograd: the first tier a convolution reaches gives its tile.

    Part of every kernel's workload, so a database records the rule it was tuned with
    (``to_json``) and ``LowerKernels`` compiles under it with that rule.
    """

    tiers: tuple[Tier, ...]

    def to_json(self) -> list[list[int]]:
        return [[t.tile, t.min_size, t.min_channels] for t in self.tiers]

    @staticmethod
    def from_json(value: object) -> WinogradRule | None:
        """The rule ``to_json`` wrote; None (direct convolutions only) for anything else."""
        try:
            return WinogradRule(tuple(Tier(*(int(v) for v in tier)) for tier in value))  # type: ignore[union-attr]
        except (TypeError, ValueError):
            return None

    def tile(self, call: relax.Call) -> int | None:
        """The tile this ``relax.nn.conv2d`` call gets; None where it stays direct."""
        shape = _winograd_shape(call)
        if shape is None:
            return None
        size, channels = shape
        return next((t.tile for t in self.tiers if size >= t.min_size and channels >= t.min_channels), None)


DEFAULT_RULE = WinogradRule((Tier(tile=2, min_size=14, min_channels=256),))
"""Measured on Zen 5 with the same trials each way (benchmarks/winograd_probe.py; in the model, ResNet-50's
database, 320 trials): 14x14 256 -> 256 260.7 us against the direct kernel's 466.3 (F(4x4) 367 at 256
trials: a 14x14 image is a third padding in 4x4 tiles); 7x7 512 -> 512 583.6 against 455.0 (16 tiles, too
few rows for the GEMM); 28x28 128 -> 128 0.95x as F(2x2) and 1.10x as F(4x4) in the probe, but in ResNet-50
with cosched's sized search F(4x4) reached 600.2 us after 256 trials against the direct 444.7. Its data and
output transforms cost per channel, the GEMM it saves per pair of channels: narrow convolutions stay direct."""


def default_rule(target: tvm.target.Target) -> WinogradRule | None:
    """The rule new kernels of ``target`` are tuned and compiled with: ``DEFAULT_RULE`` on CPUs, none elsewhere."""
    # GPU kernels get dlight's default schedules, written for direct convolutions.
    return DEFAULT_RULE if target.kind.name == "llvm" else None


def _transform_matrices(tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Topi's Cook-Toom matrices (A, B, G) as numpy: A and B go into the kernel, G into the weights.
    return winograd_util._cook_toom_convolution(winograd_util._interpolation_points(tile + 1), tile, 3)


def transform_weights(weight: np.ndarray, tile: int) -> np.ndarray:
    """OHWI 3x3 weights to Winograd's ``(alpha, alpha, O, I)``: ``G g G^T`` per (O, I) pair."""
    _, _, g = _transform_matrices(tile)
    packed = np.einsum("eh,ohwi,nw->enoi", g, weight.astype("float64"), g, optimize=True)
    return packed.astype(weight.dtype)


def winograd_nhwc(data: te.Tensor, packed: te.Tensor, padding: tuple[int, int, int, int], tile: int) -> te.Tensor:
    """3x3 stride-1 NHWC convolution of ``data`` with pre-transformed weights ``(alpha, alpha, O, I)``."""
    batch, height, width, cin = (int(d) for d in data.shape)
    alpha, cout = tile + 2, int(packed.shape[2])
    top, left, bottom, right = padding
    out_h, out_w = height + top + bottom - 2, width + left + right - 2
    tiles_h, tiles_w = (out_h + tile - 1) // tile, (out_w + tile - 1) // tile
    tiles = tiles_h * tiles_w
    a_np, b_np, _ = _transform_matrices(tile)
    a, b = const_matrix(a_np.astype(str(data.dtype)), "A"), const_matrix(b_np.astype(str(data.dtype)), "B")
    # Pad to whole tiles: the last tile's extra outputs are computed and dropped.
    padded = topi.nn.pad(
        data,
        (0, top, left, 0),
        (0, tiles_h * tile + 2 - height - top, tiles_w * tile + 2 - width - left, 0),
        name="data_pad",
    )
    ra, rb = te.reduce_axis((0, alpha), "r_a"), te.reduce_axis((0, alpha), "r_b")

    def tile_origin(p: tvm.tirx.PrimExpr) -> tuple:
        t = p % tiles
        return p // tiles, (t // tiles_w) * tile, (t % tiles_w) * tile

    def data_pack(e, n, p, c):
        img, y, x = tile_origin(p)
        return te.sum(padded[img, y + ra, x + rb, c] * b[ra, e] * b[rb, n], axis=[ra, rb])

    transformed = te.compute((alpha, alpha, batch * tiles, cin), data_pack, name="data_pack")
    k = te.reduce_axis((0, cin), "ci")
    bgemm = te.compute(
        (alpha, alpha, batch * tiles, cout),
        lambda e, n, p, co: te.sum(transformed[e, n, p, k] * packed[e, n, co, k], axis=[k]),
        name="bgemm",
    )
    rc, rd = te.reduce_axis((0, alpha), "r_a"), te.reduce_axis((0, alpha), "r_b")
    inverse = te.compute(
        (tile, tile, batch * tiles, cout),
        lambda vh, vw, p, co: te.sum(bgemm[rc, rd, p, co] * a[rc, vh] * a[rd, vw], axis=[rc, rd]),
        name="inverse",
    )
    return te.compute(
        (batch, out_h, out_w, cout),
        lambda img, h, w, co: inverse[h % tile, w % tile, img * tiles + (h // tile) * tiles_w + w // tile, co],
        name=WINOGRAD_KERNEL,
    )


def _winograd_shape(call: relax.Call) -> tuple[int, int] | None:
    """(smaller output side, fewer channels) of a convolution Winograd can compute; None for any other."""
    attrs = call.attrs
    weight = call.args[1]
    if not isinstance(weight, tvm.ir.GenericConst) or attrs.data_layout != "NHWC" or attrs.kernel_layout != "OHWI":
        return None
    if attrs.out_layout not in ("", "NHWC") or int(attrs.groups) != 1:
        return None
    if [int(s) for s in attrs.strides] != [1, 1] or [int(d) for d in attrs.dilation] != [1, 1]:
        return None
    dtype = weight.ty.dtype
    if dtype != "float32" or call.args[0].ty.dtype != dtype or str(attrs.out_dtype or dtype) != dtype:
        return None
    out = static_shape(call.ty)
    if out is None or static_shape(call.args[0].ty) is None:
        return None
    cout, kh, kw, cin = weight.value.shape
    return (min(out[1:3]), min(cin, cout)) if (kh, kw) == (3, 3) else None


def WinogradConv2d(rule: WinogradRule = DEFAULT_RULE) -> tvm.transform.Pass:  # noqa: N802
    """Legalize NHWC 3x3 stride-1 convolutions with constant weights that ``rule`` picks as Winograd."""

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        tile = rule.tile(call)
        if tile is None:
            return _nn_conv2d(bb, call)
        # The weight transform runs here, once, on the constant: the kernel only transforms the data.
        packed = relax.const(transform_weights(call.args[1].value.numpy(), tile))
        padding = tuple(int(p) for p in call.attrs.padding)
        return bb.call_te(
            winograd_nhwc, call.args[0], packed, padding=padding, tile=tile, primfunc_name_hint=WINOGRAD_KERNEL
        )

    # Every other operator gets its registered legalization, as in the pipeline's own LegalizeOps.
    return relax.transform.LegalizeOps(customize_legalize_map={"relax.nn.conv2d": legalize})
