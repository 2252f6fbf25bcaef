"""Compiled inner loops of the 3-D drizzle.

Arrays in, accumulators out: these functions know nothing of WCS, files or xarray.
Every function here is compiled by numba with ``cache=True, nogil=True``, so
several threads can each fill their own accumulators at once.

Conventions
-----------
- Output pixel ``(jj, ii)`` covers ``[ii - 0.5, ii + 0.5] x [jj - 0.5, jj + 0.5]``
  in output pixel coordinates (STScI drizzle's convention).
- All accumulators of one voxel sit together in one 56-byte block of a
  ``(nz, ny, nx, 7)`` float64 array ``acc`` (fields ``F_*`` below); the two
  32-bit flag masks share one word of an int64 view of the same memory
  (``macc``). One voxel update then touches one or two cache lines, and the
  neighbouring output pixels of one wavelength plane, which neighbouring input
  pixels (nearly the same wavelength) update in turn, share cache lines: with
  34 bins this is 17 % faster than the wavelength-innermost ``(ny, nx, nz, 7)``
  layout, where every output pixel's bins fill their own 1.9 kB.
- A contribution to voxel ``(k, jj, ii)`` has weight ``w * a * f`` where ``w`` is
  the input pixel weight, ``a`` the spatial weight (for ``square`` the exact
  overlap area of the pixfrac-shrunk pixel quadrilateral with the output pixel,
  in output pixels) and ``f`` the fraction of the pixel's (wave_pixfrac-shrunk)
  band that falls in bin ``k``.
"""

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

KERNEL_IDS = {
    "square": 0,
    "turbo": 1,
    "point": 2,
    "gaussian": 3,
    "lanczos2": 4,
    "lanczos3": 5,
    "bilinear": 6,
}

# fields of the accumulator block of each voxel
F_WF = 0  # sum of w a f * data
F_W = 1  # sum of w a f
F_W2V = 2  # sum of (w a f)**2 * var
F_N = 3  # number of contributing input pixels (exact in float64)
F_WL = 4  # sum of w a f * effective wavelength of the overlap
F_WL2 = 5  # sum of w a f * second moment of the overlap's wavelength
# flag masks (int64 view): low 32 bits the complement of the bitwise AND of the flags,
# high 32 bits their bitwise OR, so both are OR-accumulated in one operation and the
# word is 0 exactly where nothing landed (see ``mask_word``)
F_MASK = 6
N_FIELDS = 7

_LOW32 = 0xFFFFFFFF


def pack_masks(and_mask, or_mask):
    """Packed mask words from ``(and_mask, or_mask)`` as :func:`unpack_masks` gives
    them (the AND -1 where nothing landed): the inverse of :func:`unpack_masks`."""
    and_mask = np.asarray(and_mask, dtype=np.int64)
    or_mask = np.asarray(or_mask, dtype=np.int64) & _LOW32
    return np.where(and_mask == -1, 0, ~and_mask & _LOW32) | (or_mask << 32)


def unpack_masks(words):
    """``(and_mask, or_mask)`` as int64 from packed mask words; the AND is -1 (all
    bits) where nothing landed, as in :attr:`Drizzle3D.state`."""
    words = np.asarray(words, dtype=np.int64)
    and_mask = np.where(words == 0, -1, ~words & _LOW32)
    return and_mask, (words >> 32) & _LOW32


#: Spacing (input pixels) of the Lanczos look-up table, as in STScI drizzle 3.
LANCZOS_LUT_STEP = 0.003


# No kernel allocates: every work array comes from the caller, so the kernels are
# compiled without numba's reference-counting runtime (``_nrt=False``). With it,
# passing arrays to the helper functions costs atomic increments and decrements
# that numba does not prune around loops: 10x slower helper calls, measured.
# The one fast-math flag is ``contract``: a * b + c may become one fused multiply-add
# (rounded once instead of twice; the square kernel is 3 % faster). None of the flags
# that assume no NaN or infinity, or reorder sums, is set: NaN checks and the order of
# accumulation stay as written.
_OPTIONS = {
    "cache": True,
    "nogil": True,
    "error_model": "numpy",
    "_nrt": False,
    "fastmath": {"contract"},
}


def _jit(func):
    return numba.njit(**_OPTIONS)(func)


def _jit_inline(func):
    return numba.njit(inline="always", **_OPTIONS)(func)


@_jit_inline
def mask_word(flag):  # pragma: no cover - compiled
    """The packed mask word of one pixel's 32-bit flags: their complement in the low
    32 bits, the flags in the high 32 bits (OR-ing words accumulates both masks)."""
    f = flag & _LOW32
    return (~f & _LOW32) | (f << 32)


def lanczos_lut(order: int) -> np.ndarray:
    """Tabulate ``sinc(x) sinc(x / order)`` every ``LANCZOS_LUT_STEP`` input pixels."""
    n = math.ceil(order / LANCZOS_LUT_STEP) + 2
    x = np.arange(n, dtype=np.float64) * LANCZOS_LUT_STEP
    lut = np.where(x <= order, np.sinc(x) * np.sinc(x / order), 0.0)
    lut[0] = 1.0
    return lut


@_jit_inline
def _nint(x):
    """Round half away from zero (Fortran NINT), as drizzle does."""
    if x >= 0.0:
        return math.floor(x + 0.5)
    return -math.floor(0.5 - x)


@_jit
def _clamped_trapezoid(xa, ya, xb, yb):
    """Integral over [xa, xb] of clamp(y, 0, 1) for y linear from ya to yb."""
    w = xb - xa
    if ya <= 0.0 and yb <= 0.0:
        return 0.0
    if ya >= 1.0 and yb >= 1.0:
        return w
    if ya >= 0.0 and ya <= 1.0 and yb >= 0.0 and yb <= 1.0:
        return 0.5 * w * (ya + yb)
    dy = yb - ya
    t0 = -ya / dy
    t1 = (1.0 - ya) / dy
    tl = min(t0, t1)
    th = max(t0, t1)
    tl = min(max(tl, 0.0), 1.0)
    th = min(max(th, 0.0), 1.0)
    yl = min(max(ya + tl * dy, 0.0), 1.0)
    yh = min(max(ya + th * dy, 0.0), 1.0)
    area = w * (th - tl) * 0.5 * (yl + yh)
    if ya > 1.0:
        area += w * tl
    if yb > 1.0:
        area += w * (1.0 - th)
    return area


@_jit
def _edge_integral(x1, y1, x2, y2):
    """Signed integral along one polygon edge of clamp(y, 0, 1) over x in [0, 1]."""
    if x1 == x2:
        return 0.0
    sign = 1.0
    if x1 > x2:
        x1, x2 = x2, x1
        y1, y2 = y2, y1
        sign = -1.0
    if x2 <= 0.0 or x1 >= 1.0:
        return 0.0
    m = (y2 - y1) / (x2 - x1)
    xa = max(x1, 0.0)
    xb = min(x2, 1.0)
    ya = y1 + m * (xa - x1)
    yb = y1 + m * (xb - x1)
    return sign * _clamped_trapezoid(xa, ya, xb, yb)


@_jit
def quad_pixel_overlap(xq, yq, ii, jj):
    """Exact area of a quadrilateral's overlap with output pixel ``(jj, ii)``.

    By Green's theorem the overlap is ``|sum over edges of the integral of
    clamp(y, 0, 1) dx|`` restricted to the pixel's x range, in the pixel's frame.
    Works for any simple quadrilateral, either orientation.
    """
    ox = ii - 0.5
    oy = jj - 0.5
    total = 0.0
    for e in range(4):
        f = (e + 1) & 3
        total += _edge_integral(xq[e] - ox, yq[e] - oy, xq[f] - ox, yq[f] - oy)
    return abs(total)


@_jit_inline
def _interp_pixmap(pixmap, px, py):
    """Bilinear interpolation (extrapolation at the edges) of the pixmap at (px, py)."""
    ny = pixmap.shape[0]
    nx = pixmap.shape[1]
    cx = min(max(math.floor(px), 0), nx - 2)
    cy = min(max(math.floor(py), 0), ny - 2)
    tx = px - cx
    ty = py - cy
    w00 = (1.0 - tx) * (1.0 - ty)
    w10 = tx * (1.0 - ty)
    w01 = (1.0 - tx) * ty
    w11 = tx * ty
    xo = (
        w00 * pixmap[cy, cx, 0]
        + w10 * pixmap[cy, cx + 1, 0]
        + w01 * pixmap[cy + 1, cx, 0]
        + w11 * pixmap[cy + 1, cx + 1, 0]
    )
    yo = (
        w00 * pixmap[cy, cx, 1]
        + w10 * pixmap[cy, cx + 1, 1]
        + w01 * pixmap[cy + 1, cx, 1]
        + w11 * pixmap[cy + 1, cx + 1, 1]
    )
    return xo, yo


@_jit_inline
def _bin_from(edges, lo, hint):
    """Index of the first bin whose upper edge lies above ``lo``, walking from ``hint``.

    Neighbouring input pixels have nearly the same wavelength, so starting from
    the previous pixel's bin takes a step or two, where a binary search over
    the edges costs several unpredictable branches.
    """
    nz = edges.size - 1
    k = min(max(hint, 0), nz - 1)
    while k > 0 and edges[k] > lo:
        k -= 1
    while k < nz - 1 and edges[k + 1] <= lo:
        k += 1
    return k


@_jit_inline
def _spectral_overlaps(edges, lo, hi, band_centroid, spec):
    """Fractions of the band [lo, hi] in each bin it overlaps, once per input pixel.

    Fills ``spec[n] = (k, fraction, wavelength, second moment)`` for the ``n``
    bins (consecutive, from the first) with positive overlap; returns ``n``.
    The wavelength of a contribution is the band's centre (``band_centroid``:
    where the pixel's value was measured) or the centroid of its overlap with
    the bin; the second moment is that of the top-hat it stands for (the whole
    band, or the overlap).
    """
    nz = edges.size - 1
    width = hi - lo
    inv_width = 1.0 / width
    mid = 0.5 * (lo + hi)
    band_m2 = mid * mid + width * width / 12.0
    n = 0
    # spec[0, 0] still holds the previous pixel's first bin: a good starting guess
    for k in range(_bin_from(edges, lo, int(spec[0, 0])), nz):
        el = edges[k]
        if el >= hi or n >= spec.shape[0]:
            break
        eh = edges[k + 1]
        ol = max(lo, el)
        oh = min(hi, eh)
        ov = oh - ol
        if ov <= 0.0:
            continue
        spec[n, 0] = k
        spec[n, 1] = ov * inv_width
        if band_centroid:
            spec[n, 2] = mid
            spec[n, 3] = band_m2
        else:
            c = 0.5 * (ol + oh)
            spec[n, 2] = c
            spec[n, 3] = c * c + ov * ov / 12.0
        n += 1
    return n


@_jit_inline
def _plane_offsets(spec, nspec, plane, koff):
    """``koff[n]``: offset in the flat accumulators of the plane of bin ``spec[n, 0]``."""
    for n in range(nspec):
        koff[n] = np.int64(spec[n, 0]) * plane


@_jit_inline
def _deposit(cell, a, afrac, w, d, v, flag, spec, koff, nspec, min_overlap, track_wave,
             acc1, macc1):  # fmt: skip
    """Add one spatial contribution (weight ``w * a``) to the bins listed in ``spec``.

    ``acc1`` and ``macc1`` are the accumulators flat; ``cell`` is the offset of the
    voxel's block in the first plane, ``koff[n]`` that of the plane of bin
    ``spec[n, 0]`` (:func:`_plane_offsets`): offsets added, not three index products
    per voxel (7 % faster with 34 bins). Returns 1 if positive weight was added (for
    the context image), else 0.
    """
    hit = 0
    wa0 = w * a
    for n in range(nspec):
        f = spec[n, 1]
        if min_overlap > 0.0 and afrac * f < min_overlap:
            continue
        # unsigned: numba then skips its negative-index wraparound (5 % of the kernel)
        o = np.uintp(koff[n] + cell)
        macc1[o + np.uintp(F_MASK)] |= flag  # packed by mask_word: 0 = untouched
        wa = wa0 * f
        if wa != 0.0:
            acc1[o + np.uintp(F_WF)] += wa * d
            acc1[o + np.uintp(F_W)] += wa
            acc1[o + np.uintp(F_W2V)] += wa * wa * v
            acc1[o + np.uintp(F_N)] += 1.0
            if track_wave:
                acc1[o + np.uintp(F_WL)] += wa * spec[n, 2]
                acc1[o + np.uintp(F_WL2)] += wa * spec[n, 3]
            if wa > 0.0:
                hit = 1
    return hit


@_jit_inline
def _contribute(
    jj, ii, a, afrac, w, d, v, flag, spec, koff, nspec, min_overlap, track_wave,
    acc1, macc1, onx, ctx, ctx_plane, ctx_bit, use_ctx, gather, cube,
):  # fmt: skip
    """Deposit one spatial contribution (and set the context bit), or, with
    ``gather``, return ``sum_k w a f_k cube[k, jj, ii]`` instead (the transpose)."""
    if gather:
        wa0 = w * a
        total = 0.0
        for n in range(nspec):
            f = spec[n, 1]
            if min_overlap > 0.0 and afrac * f < min_overlap:
                continue
            total += wa0 * f * cube[int(spec[n, 0]), jj, ii]
        return total
    cell = (jj * onx + ii) * N_FIELDS
    hit = _deposit(cell, a, afrac, w, d, v, flag, spec, koff, nspec, min_overlap, track_wave,
                   acc1, macc1)  # fmt: skip
    if use_ctx and hit:
        ctx[ctx_plane, np.uintp(jj), np.uintp(ii)] |= ctx_bit
    return 0.0


@_jit_inline
def _ramp_antiderivative(y):
    """F(y) with F' = clamp(y, 0, 1): 0 below 0, y**2 / 2 on [0, 1], y - 1/2 above."""
    c = min(max(y, 0.0), 1.0)
    return 0.5 * c * c + max(y - 1.0, 0.0)


@_jit_inline
def _edge_areas(x1, y1, x2, y2, i0, j0, ncol, nrow, area):
    """Add one edge's Green integrals to the box areas (see :func:`_quad_areas`)."""
    if x1 == x2:
        return
    sign = 1.0
    if x1 > x2:
        x1, x2 = x2, x1
        y1, y2 = y2, y1
        sign = -1.0
    m = (y2 - y1) / (x2 - x1)
    invm = 1.0 / m if m != 0.0 else 0.0
    c0 = max(_nint(x1) - i0, 0)
    c1 = min(_nint(x2) - i0, ncol - 1)
    for c in range(c0, c1 + 1):
        left = i0 + c - 0.5
        xa = max(x1, left)
        xb = min(x2, left + 1.0)
        if xb <= xa:
            continue
        ya = y1 + m * (xa - x1)
        yb = y1 + m * (xb - x1)
        dy = yb - ya
        if abs(dy) < 1e-7:
            # (nearly) flat piece: the integrand is constant to O(dy)
            ym = 0.5 * (ya + yb)
            wdt = sign * (xb - xa)
            for r in range(nrow):
                area[r, c] += wdt * min(max(ym - (j0 + r - 0.5), 0.0), 1.0)
        else:
            scale = sign * invm  # (xb - xa) / dy
            top = max(ya, yb)
            for r in range(nrow):
                bottom = j0 + r - 0.5
                if top <= bottom:
                    break
                area[r, c] += scale * (
                    _ramp_antiderivative(yb - bottom) - _ramp_antiderivative(ya - bottom)
                )


@_jit_inline
def _quad_areas(x0, y0, x1, y1, x2, y2, x3, y3, i0, j0, ncol, nrow, area):
    """Exact overlap areas of a quadrilateral (corners in order) with the output pixels of a box.

    ``area[r, c]`` receives the signed overlap with output pixel
    ``(j0 + r, i0 + c)`` (take ``abs``). ``area`` must be zero on entry; the
    caller resets each cell after reading it (a per-pixel clearing loop
    compiles to a ``memset`` call that costs 15% of the kernel). Green's theorem edge by edge: every
    edge piece within a column adds the integral of clamp(y - row bottom, 0, 1)
    dx, which is ``(F(yb) - F(ya)) / slope`` with ``F`` the antiderivative of
    the clamp: one branch-free expression for the rows below, across and above
    the piece. The corners are scalars, not an array: values in an array must be
    read again after every store to another array (numba cannot tell that they do
    not overlap), and with the corners in registers the kernel is 7 % faster.
    """
    _edge_areas(x0, y0, x1, y1, i0, j0, ncol, nrow, area)
    _edge_areas(x1, y1, x2, y2, i0, j0, ncol, nrow, area)
    _edge_areas(x2, y2, x3, y3, i0, j0, ncol, nrow, area)
    _edge_areas(x3, y3, x0, y0, i0, j0, ncol, nrow, area)


@_jit_inline
def _band(wavemap, j, i, wave_pixfrac, lam_min, lam_max, e_lo, e_hi, own_lo, count_outside):
    """``(lo, hi, own)`` of a pixel's shrunk band.

    ``lo, hi`` are nan unless the band overlaps this cube's edges ``[e_lo, e_hi]``;
    then ``own`` is what the pixel adds to ``nmiss`` (it lands nowhere here): 1 if it
    maps nowhere in ``[lam_min, lam_max]`` and ``count_outside``, else 0. Otherwise
    ``own`` is what a miss of the pixel would add: 1 if this cube counts it (its band
    starts at or above ``own_lo``), 0 if another slab of a larger grid does.
    """
    lam = wavemap[j, i, 0]
    bw = wavemap[j, i, 1]
    outside = 1 if count_outside else 0
    if not (math.isfinite(lam) and math.isfinite(bw)):
        return math.nan, math.nan, outside
    half = 0.5 * bw * wave_pixfrac
    lo = lam - half
    hi = lam + half
    if hi <= lam_min or lo >= lam_max:
        return math.nan, math.nan, outside
    if hi <= e_lo or lo >= e_hi:
        return math.nan, math.nan, 0
    return lo, hi, 1 if lo >= own_lo else 0


@intrinsic
def _prefetch_write(typingctx, arr, idx):
    """Hint the CPU to fetch the cache line of ``arr[idx]`` (1-D, C-contiguous) for
    writing (LLVM's ``prefetch`` intrinsic: no fault, no effect on results)."""
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer2(
            context, builder, ary.data, cgutils.unpack_tuple(builder, ary.shape),
            cgutils.unpack_tuple(builder, ary.strides), aryty.layout, [args[1]],
            wraparound=False, boundscheck=False,
        )  # fmt: skip
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        # the typed-pointer name; LLVM with opaque pointers re-mangles it to ".p0"
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        # write access, keep in all cache levels, data cache
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(1), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@_jit
def _box_areas(cx, cy, n, k, area, tmp):
    """Exact overlap areas of ``n`` quadrilaterals with the cells of a ``k`` x ``k`` box each.

    ``cx[e, p], cy[e, p]`` is corner ``e`` of quadrilateral ``p`` in its box's frame,
    where box cell ``(r, c)`` is ``[c, c + 1] x [r, r + 1]``; ``area[r * k + c, p]``
    receives the signed overlap (take ``abs``). Green's theorem, as in
    :func:`_quad_areas`, but with no branch: every edge is clipped to every column of
    the box and integrated over every row, so each loop runs over the ``n``
    quadrilaterals at once and compiles to vector instructions (the ``if`` expressions
    become selects). The integral of ``clamp(y - r, 0, 1)`` over a piece whose ``y``
    runs over ``[lo, hi]`` is ``width * mean``; the mean is
    ``((p1 - p0) (p1 + p0) / 2 + max(hi - max(lo, 1), 0)) / (hi - lo)`` with ``p0, p1``
    the clamped ends (exact: the parts below, inside and above the row), or the clamped
    value itself for a flat piece. Near a row boundary ``y - r`` is computed exactly
    (Sterbenz), so a nearly flat piece still gets its exact share.
    """
    for q in range(k * k):
        for p in range(n):
            area[q, p] = 0.0
    for e in range(4):
        f = (e + 1) & 3
        for c in range(k):
            left = np.float64(c)
            for p in range(n):
                x1 = cx[e, p]
                y1 = cy[e, p]
                x2 = cx[f, p]
                y2 = cy[f, p]
                swap = x1 > x2
                xl = x2 if swap else x1
                xr = x1 if swap else x2
                yl = y2 if swap else y1
                yr = y1 if swap else y2
                dx = xr - xl
                steep = dx > 1e-200  # else the piece has no width: any finite slope
                m = (yr - yl) / (dx if steep else 1.0)
                m = m if steep else 0.0
                xa = max(xl, left)
                xb = min(xr, left + 1.0)
                wdt = max(xb - xa, 0.0)
                wdt = -wdt if swap else wdt  # right-to-left edges subtract
                ya = yl + m * (xa - xl)
                yb = yl + m * (xb - xl)
                lo = min(ya, yb)
                hi = max(ya, yb)
                dy = hi - lo
                sloped = dy > 0.0
                tmp[0, p] = lo
                tmp[1, p] = hi
                tmp[2, p] = wdt / (dy if sloped else 1.0)  # (part is 0 when flat)
                tmp[3, p] = 0.0 if sloped else wdt
            for r in range(k):
                q = r * k + c
                bottom = np.float64(r)
                for p in range(n):
                    u = tmp[0, p] - bottom
                    v = tmp[1, p] - bottom
                    p0 = min(max(u, 0.0), 1.0)
                    p1 = min(max(v, 0.0), 1.0)
                    part = 0.5 * (p1 - p0) * (p1 + p0) + max(v - max(u, 1.0), 0.0)
                    area[q, p] += tmp[2, p] * part + tmp[3, p] * p0


@_jit_inline
def _prefetch_box(acc1, edges, lo, hi, k, plane, onx, i0, j0, ncol, nrow):
    """Prefetch the accumulator blocks a drop's box will update, in every bin its band
    ``[lo, hi]`` overlaps (from bin ``k``, a hint). Returns the band's first bin."""
    k = _bin_from(edges, lo, k)
    first = k
    nz = edges.size - 1
    last = ncol * N_FIELDS - 1
    while k < nz and edges[k] < hi:
        for r in range(nrow):
            # the first and last line of the row's blocks (the CPU fetches the line next to
            # a missed one with it). With 34 bins, prefetching every line of the span took
            # 9 % longer, only the last line 30 % longer
            base = k * plane + ((j0 + r) * onx + i0) * N_FIELDS
            _prefetch_write(acc1, np.uintp(base))
            _prefetch_write(acc1, np.uintp(base + last))
        k += 1
    return first


@_jit_inline
def _prefetch_centred(acc1, pixmap, wavemap, edges, j, i, half, wave_pixfrac, k, plane, onx, ony):
    """:func:`_prefetch_box` for input pixel ``(j, i)`` of a centred kernel: the output
    box within ``half`` of its mapped centre (one more column and row, which covers the
    rounding of every centred kernel and bilinear's four pixels). Returns the bin hint."""
    x = pixmap[j, i, 0]
    y = pixmap[j, i, 1]
    lam = wavemap[j, i, 0]
    hb = 0.5 * wave_pixfrac * wavemap[j, i, 1]
    if not (math.isfinite(x) and math.isfinite(y) and math.isfinite(lam) and math.isfinite(hb)):
        return k
    i0 = max(math.floor(x - half), 0)
    i1 = min(math.floor(x + half) + 1, onx - 1)
    j0 = max(math.floor(y - half), 0)
    j1 = min(math.floor(y + half) + 1, ony - 1)
    if i1 < i0 or j1 < j0 or j1 - j0 >= _SCRATCH:  # off the grid, or a large drop
        return k
    return _prefetch_box(acc1, edges, lam - hb, lam + hb, k, plane, onx, i0, j0, i1 - i0 + 1,
                         j1 - j0 + 1)  # fmt: skip


@_jit
def drizzle_square(
    data, var, weight, flags, pixmap, wavemap, edges, lam_min, lam_max, own_lo, count_outside,
    pixfrac, wave_pixfrac, min_overlap,
    track_wave, band_centroid, acc, ctx, ctx_plane, ctx_bit, use_ctx, gather,
    cube, gout, spec, row_hit, work,
):  # fmt: skip
    """Square kernel: exact overlap of the shrunk pixel quadrilateral with output pixels.

    Corners of the pixfrac-shrunk input pixel are placed by bilinear
    interpolation (extrapolation at the box edges) of the pixmap, so adjacent
    pixels share corners when ``pixfrac == 1``. See :func:`drizzle_image`.

    The input is visited in tiles of ``_SQUARE_TILE`` pixels; each tile row (a
    *segment*) goes through three passes:

    1. every pixel's band, corners and output box; the accumulator blocks its box
       will update are prefetched (the segment's deposits come a few microseconds
       later, by which time they are in cache);
    2. the overlap areas of all drops whose box fits in ``_BOX_MAX`` x
       ``_BOX_MAX`` cells, at once, by the branch-free :func:`_box_areas`;
    3. the deposits. A larger drop takes the per-pixel path (:func:`_quad_areas`,
       or :func:`quad_pixel_overlap` cell by cell beyond the scratch box).
    """
    ny, nx = data.shape
    ony = cube.shape[1] if gather else acc.shape[1]
    onx = cube.shape[2] if gather else acc.shape[2]
    nz = edges.size - 1
    e_lo = edges[0]
    e_hi = edges[nz]
    dh = 0.5 * pixfrac
    # bilinear weights of a shrunk corner in its cell (same for all four corners)
    wa_c = (1.0 - dh) * (1.0 - dh)
    wb_c = dh * (1.0 - dh)
    wc_c = dh * dh
    scratch, xq, yq, cx, cy, sarea, stmp, sval, sidx, koff, acc1, macc1 = work
    smax = scratch.shape[0]
    plane = ony * onx * N_FIELDS  # offset between wavelength planes in acc1
    khint = 0
    nmiss = 0
    row_hit[:] = False
    for tj in range(0, ny, _SQUARE_TILE):
        for ti in range(0, nx, _SQUARE_TILE):
            for j in range(tj, min(tj + _SQUARE_TILE, ny)):
                # ---- pass 1: bands, corners and boxes of the segment's pixels ----
                nv = 0
                kbox = 1
                for i in range(ti, min(ti + _SQUARE_TILE, nx)):
                    lo, hi, own = _band(wavemap, j, i, wave_pixfrac, lam_min, lam_max, e_lo,
                                        e_hi, own_lo, count_outside)  # fmt: skip
                    if not math.isfinite(lo):
                        nmiss += own
                        continue
                    if i > 0 and j > 0 and i < nx - 1 and j < ny - 1:
                        # interior: corner = A P0 + B (Px + Py) + C Pxy over the 3x3
                        # neighbourhood, each neighbour read once
                        pcx = pixmap[j, i, 0]
                        pcy = pixmap[j, i, 1]
                        plx = pixmap[j, i - 1, 0]
                        ply = pixmap[j, i - 1, 1]
                        prx = pixmap[j, i + 1, 0]
                        pry = pixmap[j, i + 1, 1]
                        pdx = pixmap[j - 1, i, 0]
                        pdy = pixmap[j - 1, i, 1]
                        pux = pixmap[j + 1, i, 0]
                        puy = pixmap[j + 1, i, 1]
                        x0 = wa_c * pcx + wb_c * (plx + pdx) + wc_c * pixmap[j - 1, i - 1, 0]
                        y0 = wa_c * pcy + wb_c * (ply + pdy) + wc_c * pixmap[j - 1, i - 1, 1]
                        x1 = wa_c * pcx + wb_c * (prx + pdx) + wc_c * pixmap[j - 1, i + 1, 0]
                        y1 = wa_c * pcy + wb_c * (pry + pdy) + wc_c * pixmap[j - 1, i + 1, 1]
                        x2 = wa_c * pcx + wb_c * (prx + pux) + wc_c * pixmap[j + 1, i + 1, 0]
                        y2 = wa_c * pcy + wb_c * (pry + puy) + wc_c * pixmap[j + 1, i + 1, 1]
                        x3 = wa_c * pcx + wb_c * (plx + pux) + wc_c * pixmap[j + 1, i - 1, 0]
                        y3 = wa_c * pcy + wb_c * (ply + puy) + wc_c * pixmap[j + 1, i - 1, 1]
                    else:
                        x0, y0 = _interp_pixmap(pixmap, i - dh, j - dh)
                        x1, y1 = _interp_pixmap(pixmap, i + dh, j - dh)
                        x2, y2 = _interp_pixmap(pixmap, i + dh, j + dh)
                        x3, y3 = _interp_pixmap(pixmap, i - dh, j + dh)
                    if not (
                        math.isfinite(x0) and math.isfinite(y0) and math.isfinite(x1)
                        and math.isfinite(y1) and math.isfinite(x2) and math.isfinite(y2)
                        and math.isfinite(x3) and math.isfinite(y3)
                    ):  # fmt: skip
                        nmiss += own
                        continue
                    jaco = 0.5 * abs((x0 - x2) * (y1 - y3) - (x1 - x3) * (y0 - y2))
                    xmn = min(min(x0, x1), min(x2, x3))
                    xmx = max(max(x0, x1), max(x2, x3))
                    ymn = min(min(y0, y1), min(y2, y3))
                    ymx = max(max(y0, y1), max(y2, y3))
                    i0 = max(_nint(xmn), 0)
                    i1 = min(_nint(xmx), onx - 1)
                    j0 = max(_nint(ymn), 0)
                    j1 = min(_nint(ymx), ony - 1)
                    if jaco <= 0.0 or i1 < i0 or j1 < j0:
                        nmiss += own
                        continue
                    ncol = i1 - i0 + 1
                    nrow = j1 - j0 + 1
                    boxed = ncol <= _BOX_MAX and nrow <= _BOX_MAX
                    # corners in the box's frame (cell (r, c) = [c, c+1] x [r, r+1]) for
                    # pass 2, else in output coordinates for the per-pixel path
                    ox = i0 - 0.5 if boxed else 0.0
                    oy = j0 - 0.5 if boxed else 0.0
                    cx[0, nv] = x0 - ox
                    cx[1, nv] = x1 - ox
                    cx[2, nv] = x2 - ox
                    cx[3, nv] = x3 - ox
                    cy[0, nv] = y0 - oy
                    cy[1, nv] = y1 - oy
                    cy[2, nv] = y2 - oy
                    cy[3, nv] = y3 - oy
                    if boxed:
                        kbox = max(kbox, max(ncol, nrow))
                        if not gather:
                            khint = _prefetch_box(acc1, edges, lo, hi, khint, plane, onx, i0,
                                                  j0, ncol, nrow)  # fmt: skip
                    sidx[nv, 0] = i
                    sidx[nv, 1] = i0
                    sidx[nv, 2] = j0
                    sidx[nv, 3] = ncol
                    sidx[nv, 4] = nrow
                    sidx[nv, 5] = boxed
                    sidx[nv, 6] = own
                    sval[nv, 0] = jaco
                    sval[nv, 1] = lo
                    sval[nv, 2] = hi
                    nv += 1
                if nv == 0:
                    continue
                # ---- pass 2: overlap areas of all boxed drops at once ----
                _box_areas(cx, cy, nv, kbox, sarea, stmp)
                # ---- pass 3: deposits ----
                for p in range(nv):
                    i = sidx[p, 0]
                    i0 = sidx[p, 1]
                    j0 = sidx[p, 2]
                    ncol = sidx[p, 3]
                    nrow = sidx[p, 4]
                    own = sidx[p, 6]
                    jaco = sval[p, 0]
                    inv_jaco = 1.0 / jaco
                    nspec = _spectral_overlaps(edges, sval[p, 1], sval[p, 2], band_centroid, spec)
                    w = weight[j, i]
                    d = data[j, i]
                    v = var[j, i]
                    flag = mask_word(flags[j, i])
                    landed = False
                    gsum = 0.0
                    _plane_offsets(spec, nspec, plane, koff)
                    boxed = sidx[p, 5] != 0
                    if not boxed:  # a drop larger than the box of pass 2
                        if ncol <= smax and nrow <= smax:
                            _quad_areas(cx[0, p], cy[0, p], cx[1, p], cy[1, p], cx[2, p],
                                        cy[2, p], cx[3, p], cy[3, p], i0, j0, ncol, nrow,
                                        scratch)  # fmt: skip
                        for e in range(4):
                            xq[e] = cx[e, p]
                            yq[e] = cy[e, p]
                    for r in range(nrow):
                        for c in range(ncol):
                            if boxed:
                                a = abs(sarea[np.uintp(r * kbox + c), np.uintp(p)])
                            elif ncol <= smax and nrow <= smax:
                                a = abs(scratch[r, c])
                                scratch[r, c] = 0.0
                            else:  # beyond the scratch box: cell by cell
                                a = quad_pixel_overlap(xq, yq, i0 + c, j0 + r)
                            if a <= _SLIVER * jaco:
                                continue
                            landed = True
                            gsum += _contribute(
                                j0 + r, i0 + c, a, a * inv_jaco, w, d, v, flag, spec, koff,
                                nspec, min_overlap, track_wave, acc1, macc1, onx, ctx,
                                ctx_plane, ctx_bit, use_ctx, gather, cube,
                            )  # fmt: skip
                    if gather:
                        gout[j, i] = gsum
                    if landed:
                        row_hit[j] = True
                    else:
                        nmiss += own
    return nmiss, ny - int(row_hit.sum())


@_jit
def drizzle_centred(
    kernel_id, data, var, weight, flags, pixmap, wavemap, edges, lam_min, lam_max, own_lo,
    count_outside, pixfrac, wave_pixfrac, pscale,
    min_overlap, track_wave, band_centroid, lut, acc, ctx, ctx_plane, ctx_bit, use_ctx,
    gather, cube, gout, spec, row_hit, koff, acc1, macc1,
):  # fmt: skip
    """Kernels centred on the mapped pixel centre: turbo, point, gaussian, lanczos, bilinear.

    The spatial weight of an output pixel is ``drop_area * frac`` where ``frac``
    is drizzle's normalised kernel value there and ``drop_area`` the drop's area
    in output pixels: ``(pixfrac / pscale)**2`` for turbo and gaussian,
    ``1 / pscale**2`` for point, bilinear and Lanczos (which ignore pixfrac).
    """
    ny, nx = data.shape
    ony = cube.shape[1] if gather else acc.shape[1]
    onx = cube.shape[2] if gather else acc.shape[2]
    nz = edges.size - 1
    e_lo = edges[0]
    e_hi = edges[nz]
    inv_s = 1.0 / pscale
    efac = 0.0
    es = 0.0
    sdp = 0.0
    if kernel_id == 1:  # turbo: box of side pixfrac / pscale
        half = pixfrac * inv_s * 0.5
        drop_area = (pixfrac * inv_s) ** 2
    elif kernel_id == 3:  # gaussian, FWHM = pixfrac input pixels
        efac = (2.3548 * 2.3548) * pscale * pscale / (pixfrac * pixfrac) / 2.0
        es = efac / math.pi
        half = max(2.5 * pixfrac / 2.3548 * inv_s, 1.2 * inv_s)
        drop_area = (pixfrac * inv_s) ** 2
    elif kernel_id == 4 or kernel_id == 5:  # lanczos2/3
        half = (2.0 if kernel_id == 4 else 3.0) * inv_s
        sdp = pscale / LANCZOS_LUT_STEP
        drop_area = inv_s * inv_s
    else:  # point (2), bilinear (6)
        half = 0.0
        drop_area = inv_s * inv_s
    nlut = lut.size
    plane = ony * onx * N_FIELDS  # offset between wavelength planes in acc1
    # prefetch the accumulators of the pixel _AHEAD along the row (not for Lanczos: with
    # 7 x 7 boxes its time goes to the kernel values, and prefetching made it 6 % slower)
    ahead = not gather and kernel_id != 4 and kernel_id != 5
    khint = 0
    nmiss = 0
    row_hit[:] = False
    for tj in range(0, ny, _TILE):
        for ti in range(0, nx, _TILE):
            for j in range(tj, min(tj + _TILE, ny)):
                for i in range(ti, min(ti + _TILE, nx)):
                    lo, hi, own = _band(wavemap, j, i, wave_pixfrac, lam_min, lam_max, e_lo,
                                        e_hi, own_lo, count_outside)  # fmt: skip
                    if not math.isfinite(lo):
                        nmiss += own
                        continue
                    xc = pixmap[j, i, 0]
                    yc = pixmap[j, i, 1]
                    if ahead and i + _AHEAD < nx:
                        khint = _prefetch_centred(acc1, pixmap, wavemap, edges, j, i + _AHEAD,
                                                  half, wave_pixfrac, khint, plane, onx,
                                                  ony)  # fmt: skip
                    if not (math.isfinite(xc) and math.isfinite(yc)):
                        nmiss += own
                        continue
                    nspec = _spectral_overlaps(edges, lo, hi, band_centroid, spec)
                    _plane_offsets(spec, nspec, plane, koff)
                    w = weight[j, i]
                    d = data[j, i]
                    v = var[j, i]
                    flag = mask_word(flags[j, i])
                    landed = False
                    gsum = 0.0
                    if kernel_id == 2:  # point: the nearest output pixel
                        i0 = i1 = _nint(xc)
                        j0 = j1 = _nint(yc)
                    elif kernel_id == 6:  # bilinear: the four nearest output centres
                        i0 = math.floor(xc)
                        j0 = math.floor(yc)
                        i1 = i0 + 1
                        j1 = j0 + 1
                    else:  # turbo, gaussian, lanczos
                        i0 = _nint(xc - half)
                        i1 = _nint(xc + half)
                        j0 = _nint(yc - half)
                        j1 = _nint(yc + half)
                    for jj in range(max(j0, 0), min(j1, ony - 1) + 1):
                        for ii in range(max(i0, 0), min(i1, onx - 1) + 1):
                            if kernel_id == 2:
                                frac = 1.0
                            elif kernel_id == 6:
                                frac = (1.0 - abs(xc - ii)) * (1.0 - abs(yc - jj))
                            elif kernel_id == 1:
                                ox = min(xc + half, ii + 0.5) - max(xc - half, ii - 0.5)
                                oy = min(yc + half, jj + 0.5) - max(yc - half, jj - 0.5)
                                frac = ox * oy / drop_area if (ox > 0.0 and oy > 0.0) else 0.0
                            elif kernel_id == 3:
                                ddx = xc - ii
                                ddy = yc - jj
                                frac = es * math.exp(-(ddx * ddx + ddy * ddy) * efac)
                            else:
                                ix = _nint(abs(xc - ii) * sdp)
                                iy = _nint(abs(yc - jj) * sdp)
                                frac = lut[ix] * lut[iy] if (ix < nlut and iy < nlut) else 0.0
                            if frac == 0.0:
                                continue
                            landed = True
                            gsum += _contribute(
                                jj, ii, drop_area * frac, frac, w, d, v, flag, spec, koff,
                                nspec, min_overlap, track_wave, acc1, macc1, onx, ctx,
                                ctx_plane, ctx_bit, use_ctx, gather, cube,
                            )  # fmt: skip
                    if gather:
                        gout[j, i] = gsum
                    if landed:
                        row_hit[j] = True
                    else:
                        nmiss += own
    return nmiss, ny - int(row_hit.sum())


def drizzle_image(
    kernel_id, data, var, weight, flags, pixmap, wavemap, edges, lam_min, lam_max, own_lo,
    count_outside, pixfrac, wave_pixfrac, pscale,
    min_overlap, track_wave, band_centroid, lut, acc, macc, ctx, ctx_plane, ctx_bit, use_ctx,
    gather=False, cube=None, gout=None,
):  # fmt: skip
    """Drizzle one image (or one box of it) into the accumulators, in place.

    Parameters
    ----------
    kernel_id : int
        One of ``KERNEL_IDS``.
    data, var, weight : float64 (ny, nx)
        Input values, variances and weights (weight 0 = lands but adds nothing).
    flags : int64 (ny, nx)
        Input flag bits (non-negative, at most 32 bits); the kernels accumulate
        their packed :func:`mask_word`.
    pixmap, wavemap : float64 (ny, nx, 2)
        Output (x, y) of each pixel centre; central wavelength and bandwidth.
    edges : float64 (nz + 1,)
        Increasing wavelength bin edges.
    lam_min, lam_max, own_lo : float; count_outside : bool
        Miss accounting. Normally ``edges[0]``, ``edges[-1]``, ``-inf``, True:
        every pixel that lands nowhere counts in ``nmiss``. When ``edges`` are
        one slab of a larger grid ``[lam_min, lam_max]``: a pixel whose band
        misses the slab is not this slab's; one whose band overlaps it counts
        here only if the band starts at or above ``own_lo`` (the slab's lower
        edge; ``-inf`` for the first slab), and one whose band misses the whole
        grid only if ``count_outside`` (the first slab). The slabs' ``nmiss``
        then add up to the whole grid's.
    pixfrac, wave_pixfrac, pscale, min_overlap : float
        Spatial and spectral shrink factors, output/input pixel-size ratio, and
        minimum fraction of a drop's volume for a voxel contribution to count.
    track_wave : bool
        Accumulate the effective-wavelength moments.
    band_centroid : bool
        Give each contribution its band's centre as wavelength (else the
        centroid of its overlap with the bin).
    lut : float64 array
        Lanczos look-up table (ignored by other kernels).
    acc : float64 (nz, ny_out, nx_out, N_FIELDS), C-contiguous
        Accumulator blocks, updated in place (the kernels address them flat).
    macc : int64 (nz, ny_out, nx_out, N_FIELDS), C-contiguous
        An int64 view of the same memory as ``acc`` (flag masks).
    ctx : int32 (nplanes, ny_out, nx_out)
    ctx_plane, ctx_bit, use_ctx : int, int32, bool
    gather : bool
        Instead of depositing, compute the transpose: ``gout[j, i] = sum over
        voxels of w a f cube[k, jj, ii]`` (accumulators untouched).
    cube : float64 (nz, ny_out, nx_out), with ``gather``
    gout : float64 (ny, nx), with ``gather``; written in place.

    Returns
    -------
    nmiss, nskip : int
        Input pixels that landed nowhere, and input rows none of whose pixels landed.
    """
    if cube is None:
        cube = np.zeros((1, 1, 1))
    if gout is None:
        gout = np.zeros((1, 1))
    spec = np.zeros((edges.size - 1, 4))
    row_hit = np.zeros(data.shape[0], dtype=np.bool_)
    if not (acc.flags.c_contiguous and macc.flags.c_contiguous):
        raise ValueError("'acc' and 'macc' must be C-contiguous (the kernels use them flat).")
    koff = np.empty(edges.size, dtype=np.int64)  # plane offsets of a pixel's bins
    acc1 = acc.reshape(-1)
    macc1 = macc.reshape(-1)
    if kernel_id == 0:
        seg = _SQUARE_TILE
        work = (
            np.zeros((_SCRATCH, _SCRATCH)),  # scratch: per-pixel areas of larger drops
            np.empty(4),  # xq, yq: corners of a drop beyond the scratch box
            np.empty(4),
            np.empty((4, seg)),  # cx, cy: the segment's corners
            np.empty((4, seg)),
            np.empty((_BOX_MAX * _BOX_MAX, seg)),  # sarea: their areas, cell by cell
            np.empty((4, seg)),  # stmp: work space of _box_areas
            np.empty((seg, 3)),  # sval: jacobian, band
            np.empty((seg, 7), dtype=np.int64),  # sidx: pixel, box, miss count
            koff,
            acc1,
            macc1,
        )
        return drizzle_square(
            data, var, weight, flags, pixmap, wavemap, edges, lam_min, lam_max, own_lo,
            count_outside, pixfrac, wave_pixfrac, min_overlap, track_wave, band_centroid, acc,
            ctx, ctx_plane, ctx_bit, use_ctx, gather, cube, gout, spec, row_hit, work,
        )  # fmt: skip
    return drizzle_centred(
        kernel_id, data, var, weight, flags, pixmap, wavemap, edges, lam_min, lam_max, own_lo,
        count_outside, pixfrac, wave_pixfrac, pscale, min_overlap, track_wave, band_centroid, lut,
        acc, ctx, ctx_plane, ctx_bit, use_ctx, gather, cube, gout, spec, row_hit, koff, acc1, macc1,
    )  # fmt: skip


#: Pixel weightings of :func:`pixel_weights` (``Drizzle3D`` ``weighting``).
WEIGHTING_IDS = {"ivm": 0, "exptime": 1, "uniform": 2}


@_jit
def pixel_weights(
    data, var, flags, exclude, weight_map, use_map, weighting_id, ivar_max, exptime, wht_scale,
    d_out, v_out, w_out,
):  # fmt: skip
    """One pass over an image: float64 copies of ``data`` and ``var`` and the weights.

    A pixel counts when its value and variance are finite and the variance is >= 0
    (> 0 for ``ivm``) and it has no flag in ``exclude``; its weight is then ``min(1 /
    var, ivar_max)`` (ivm), ``exptime`` or 1, times ``weight_map`` (if ``use_map``) and
    ``wht_scale``; else 0. The same operations in the same order as the numpy
    expression it replaces, so the weights are identical to the last bit.
    """
    ny, nx = data.shape
    for j in range(ny):
        for i in range(nx):
            dv = np.float64(data[j, i])
            vv = np.float64(var[j, i])
            d_out[j, i] = dv
            v_out[j, i] = vv
            good = math.isfinite(dv) and math.isfinite(vv) and vv >= 0.0
            if weighting_id == 0:
                good = good and vv > 0.0
                w = min(1.0 / vv, ivar_max) if good else 0.0
            elif weighting_id == 1:
                w = exptime if good else 0.0
            else:
                w = 1.0 if good else 0.0
            if exclude != 0 and (flags[j, i] & exclude) != 0:
                w = 0.0
            if use_map:
                w = w * weight_map[j, i]
            w_out[j, i] = w * wht_scale


@_jit
def bad_wavemap(wavemap):
    """``(any bandwidth <= 0, any wavelength <= 0)`` among finite values of a wavemap."""
    bad_bw = False
    bad_lam = False
    ny, nx = wavemap.shape[:2]
    for j in range(ny):
        for i in range(nx):
            if wavemap[j, i, 1] <= 0.0:
                bad_bw = True
            if wavemap[j, i, 0] <= 0.0:
                bad_lam = True
    return bad_bw, bad_lam


@_jit
def merge_blocks(acc, macc, other, mother):
    """Add another cube's accumulator blocks into ``acc`` in one pass (sums added,
    packed flag-mask words OR-ed: the AND is stored as its complement, so it is OR-ed too).

    All four arrays are ``(n, N_FIELDS)`` views: ``macc``/``mother`` are int64 views
    of ``acc``/``other``.
    """
    for n in range(acc.shape[0]):
        for f in range(F_MASK):
            acc[n, f] += other[n, f]
        macc[n, F_MASK] |= mother[n, F_MASK]


# input pixels are visited in square tiles of this side, so that the output
# voxels one tile writes stay in cache whatever the rotation of the map
_TILE = 32

# Overlaps smaller than this fraction of a drop's area are not contributions: far above the
# round-off of the area sums (~1e-12 at output coordinates ~1000), so whether a voxel counts
# a pixel does not depend on where the output grid's origin is (tiles, sub-grids), and far
# below any weight that matters (at most 1e-9 of the drop's weight is dropped).
_SLIVER = 1e-9

# side of the scratch box for per-pixel overlap areas (larger drops go cell by cell)
_SCRATCH = 16

# the square kernel visits the input in tiles of this side: longer rows make longer vector
# loops in _box_areas, and a tile's output (1-bin: ~230 kB) still fits in the L2 cache
_SQUARE_TILE = 64

# drops whose output box fits in this many cells a side get their areas from _box_areas,
# which computes every cell of a k x k box (k: the segment's largest box). Measured per
# input pixel against the per-pixel path (rotated 30 deg, drops 1 to 5 output pixels
# wide): 0.68x at 1 px, 0.57x at 3.5 px, 0.61x at 5 px. With a limit of 4, drops 2.5-5 px
# wide were slower than the per-pixel path alone: part of each segment went through both.
_BOX_MAX = 8

# the centred kernels prefetch the accumulators of the input pixel this far ahead in its row
# (on the benchmark image: turbo 14-20 %, point 23-34 %, bilinear 18-22 %, gaussian 6-10 %
# faster)
_AHEAD = 8
