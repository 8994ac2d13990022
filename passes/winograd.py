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

COMPUTE_VERSION = 2
"""Changes with ``winograd_nhwc``'s stages: a database's records fit only the kernels of the version it
was tuned with (1, the first, had no ``input_tile`` stage and no ``schedule_rule`` attributes)."""


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

    def to_json(self) -> dict:
        return {"compute": COMPUTE_VERSION, "tiers": [[t.tile, t.min_size, t.min_channels] for t in self.tiers]}

    @staticmethod
    def from_json(value: object) -> WinogradRule | None:
        """The rule ``to_json`` wrote; None (direct convolutions only) for anything else, and for a
        rule recorded with another ``COMPUTE_VERSION``, whose kernels this one no longer makes."""
        if not isinstance(value, dict) or value.get("compute") != COMPUTE_VERSION:
            return None
        try:
            return WinogradRule(tuple(Tier(*(int(v) for v in tier)) for tier in value["tiers"]))
        except (KeyError, TypeError, ValueError):
            return None

    def tile(self, call: relax.Call) -> int | None:
        """The tile this ``relax.nn.conv2d`` call gets; None where it stays direct."""
        shape = _winograd_shape(call)
        if shape is None:
            return None
        size, channels = shape
        return next((t.tile for t in self.tiers if size >= t.min_size and channels >= t.min_channels), None)


DEFAULT_RULE = WinogradRule((Tier(tile=4, min_size=28, min_channels=64), Tier(tile=2, min_size=14, min_channels=256)))
"""Measured on Zen 5 (benchmarks/winograd_probe.py, 128 trials each; in ResNet-50's database, 256 trials
each, us per call against the direct kernels'): F(4x4) from 28x28 and 64 channels (56x56 64 -> 64: 247.0 against
457.7; 28x28 128 -> 128: 165.9 against 444.7; Inception-v2's 56x56 64 -> 192 655.5 against 1362.5 in the probe),
F(2x2) at 14x14 with 256 channels (232.5 against 466.3; F(4x4) would compute 16x16 outputs for 14x14). 7x7
512 -> 512 stays direct (F(2x2) 467.5 against 489.6: 16 tiles, too few rows for the GEMM). Narrower ones
(DenseNet-121's 128 -> 32, SqueezeNet's) were not tried: the transforms cost per channel, the GEMM saves per pair."""


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


def _transform(tiles: te.Tensor, matrix: te.Tensor, size: int, name: str) -> te.Tensor:
    """``M^T X M`` for every tile ``X = tiles[:, :, p, c]``, ``M = matrix`` ``(alpha, size)``: Winograd's data
    (``B``) and output (``A``) transforms."""
    alpha, _, count, channels = (int(d) for d in tiles.shape)
    ra, rb = te.reduce_axis((0, alpha), "r_a"), te.reduce_axis((0, alpha), "r_b")
    return te.compute(
        (size, size, count, channels),
        lambda i, j, p, c: te.sum(tiles[ra, rb, p, c] * matrix[ra, i] * matrix[rb, j], axis=[ra, rb]),
        name=name,
        # MetaSchedule's CPU rules for topi's Winograd stages of these names (see winograd_nhwc).
        attrs={"schedule_rule": f"conv2d_nhwc_winograd_{name}"},
    )


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
    # Pad to whole tiles: the last tile's extra outputs are computed and dropped. The stages and their
    # "schedule_rule" attributes are topi's (conv2d_winograd_nhwc): MetaSchedule's built-in CPU rules
    # for the data and output transforms unroll the 4x4 (6x6) tile loops so the constant matrices'
    # zeros fold away; its generic rules left them as loops (28x28, 128 channels: 297 against 567 us).
    padded = topi.nn.pad(
        data,
        (0, top, left, 0),
        (0, tiles_h * tile + 2 - height - top, tiles_w * tile + 2 - width - left, 0),
        name="data_pad",
        attrs={"schedule_rule": "None"},
    )

    def input_tile(e, n, p, c):
        t = p % tiles
        return padded[p // tiles, (t // tiles_w) * tile + e, (t % tiles_w) * tile + n, c]

    tiled = te.compute(
        (alpha, alpha, batch * tiles, cin), input_tile, name="input_tile", attrs={"schedule_rule": "None"}
    )
    transformed = _transform(tiled, b, alpha, "data_pack")
    k = te.reduce_axis((0, cin), "ci")
    bgemm = te.compute(
        (alpha, alpha, batch * tiles, cout),
        lambda e, n, p, co: te.sum(transformed[e, n, p, k] * packed[e, n, co, k], axis=[k]),
        name="bgemm",
    )
    inverse = _transform(bgemm, a, tile, "inverse")
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
