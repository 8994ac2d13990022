"""WinogradConv2d: legalize wide 3x3 stride-1 convolutions with constant weights as Winograd F(2x2, 3x3)."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, topi
from tvm.relax.transform.legalize_ops.nn import _nn_conv2d
from tvm.topi.nn import winograd_util
from tvm.topi.utils import const_matrix

from .graph import static_shape

WINOGRAD_KERNEL = "conv2d_winograd"
"""Name of the Winograd convolution's kernel, and part of every fused kernel's name that holds one."""

TILE = 2
"""Output tile of F(TILE x TILE, 3x3). F(4x4) measured slower on ResNet-50's 14x14 images (padding waste)."""

MIN_CHANNELS = 256
"""Winograd pays where both channel counts reach this: its data and output transforms cost per channel, the
GEMM it saves per pair of channels. Measured (benchmarks/winograd_probe.py, Zen 5, same trials): 14x14
256 -> 256 1.39-1.64x faster than direct, 28x28 128 -> 128 0.95x."""

MIN_SIZE = 14
"""Nor below this output height and width: a 7x7 image is 16 tiles of 2x2, a third of them padding, too few
rows for the GEMM. Tuned into ResNet-50's database with 320 trials each (Zen 5): 14x14 256 -> 256 260.7 us
against the direct kernel's 466.3, 7x7 512 -> 512 583.6 against 455.0."""


def _transform_matrices(tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Topi's Cook-Toom matrices (A, B, G) as numpy: A and B go into the kernel, G into the weights.
    return winograd_util._cook_toom_convolution(winograd_util._interpolation_points(tile + 1), tile, 3)


def transform_weights(weight: np.ndarray, tile: int = TILE) -> np.ndarray:
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


def eligible(call: relax.Call, min_channels: int = MIN_CHANNELS, min_size: int = MIN_SIZE) -> bool:
    """Whether ``WinogradConv2d`` legalizes this ``relax.nn.conv2d`` call as Winograd."""
    attrs = call.attrs
    weight = call.args[1]
    if not isinstance(weight, tvm.ir.GenericConst) or attrs.data_layout != "NHWC" or attrs.kernel_layout != "OHWI":
        return False
    if attrs.out_layout not in ("", "NHWC") or int(attrs.groups) != 1:
        return False
    if [int(s) for s in attrs.strides] != [1, 1] or [int(d) for d in attrs.dilation] != [1, 1]:
        return False
    dtype = weight.ty.dtype
    if dtype != "float32" or call.args[0].ty.dtype != dtype or str(attrs.out_dtype or dtype) != dtype:
        return False
    out = static_shape(call.ty)
    if out is None or static_shape(call.args[0].ty) is None:
        return False
    cout, kh, kw, cin = weight.value.shape
    return (kh, kw) == (3, 3) and min(cin, cout) >= min_channels and min(out[1:3]) >= min_size


def WinogradConv2d(min_channels: int = MIN_CHANNELS, min_size: int = MIN_SIZE) -> tvm.transform.Pass:  # noqa: N802
    """Legalize NHWC 3x3 stride-1 convolutions with constant weights, wide channels and images as Winograd F(2x2, 3x3)."""

    def legalize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
        if not eligible(call, min_channels, min_size):
            return _nn_conv2d(bb, call)
        # The weight transform runs here, once, on the constant: the kernel only transforms the data.
        packed = relax.const(transform_weights(call.args[1].value.numpy()))
        padding = tuple(int(p) for p in call.attrs.padding)
        return bb.call_te(
            winograd_nhwc, call.args[0], packed, padding=padding, tile=TILE, primfunc_name_hint=WINOGRAD_KERNEL
        )

    # Every other operator gets its registered legalization, as in the pipeline's own LegalizeOps.
    return relax.transform.LegalizeOps(customize_legalize_map={"relax.nn.conv2d": legalize})
