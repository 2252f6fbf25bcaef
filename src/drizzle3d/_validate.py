"""Argument checks shared by the public entry points.

Every message has the form ``'<arg>' must <expectation>; got <actual>.``
"""

import math
import numbers

import numpy as np

#: Flag values are 32-bit (SPHEREx FLAGS are int32; bit 31 reads as uint32).
FLAG_BITS = 0xFFFFFFFF


def check_fraction(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"'{name}' must be a real number in (0, 1]; got {type(value).__name__}.")
    value = float(value)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"'{name}' must be in (0, 1]; got {value!r}.")
    return value


def check_real(name, value, *, low=None, low_inclusive=True, allow_inf=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"'{name}' must be a real number; got {type(value).__name__}.")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"'{name}' must be finite; got {value!r}.")
    if low is not None:
        bad = value < low if low_inclusive else value <= low
        if bad:
            op = ">=" if low_inclusive else ">"
            raise ValueError(f"'{name}' must be {op} {low}; got {value!r}.")
    return value


def exclude_mask(exclude_flags) -> int:
    """Turn an int bitmask or an iterable of bit numbers into an int mask."""
    if isinstance(exclude_flags, bool):
        raise TypeError(
            "'exclude_flags' must be an int bitmask or a list of bit numbers; got bool."
        )
    if isinstance(exclude_flags, numbers.Integral):
        mask = int(exclude_flags)
        if mask < 0 or mask > FLAG_BITS:
            raise ValueError(
                f"'exclude_flags' must be a bitmask in [0, 2**32); got {exclude_flags!r}."
            )
        return mask
    try:
        bits = list(exclude_flags)
    except TypeError:
        raise TypeError(
            "'exclude_flags' must be an int bitmask or a list of bit numbers; "
            f"got {type(exclude_flags).__name__}."
        ) from None
    mask = 0
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not 0 <= int(b) < 32:
            raise ValueError(f"'exclude_flags' bit numbers must be integers in 0..31; got {b!r}.")
        mask |= 1 << int(b)
    return mask


def as_image(name, arr, shape=None, *, integer=False):
    """Check a 2-D numeric image (without copying) and return it as an ndarray."""
    if arr is None:
        raise TypeError(f"'{name}' must be a 2-D array; got None.")
    a = np.asarray(arr)
    if integer:
        if a.dtype.kind not in "iu":
            raise TypeError(f"'{name}' must be an integer array; got dtype {a.dtype}.")
    elif a.dtype.kind not in "fiu":
        raise TypeError(f"'{name}' must be a real numeric array; got dtype {a.dtype}.")
    if a.ndim != 2:
        raise ValueError(f"'{name}' must be 2-D (ny, nx); got shape {a.shape}.")
    if shape is not None and a.shape != shape:
        raise ValueError(f"'{name}' must have the shape of 'data' {shape}; got {a.shape}.")
    if a.size == 0:
        raise ValueError(f"'{name}' must not be empty; got shape {a.shape}.")
    return a


def as_map(name, arr):
    a = np.asarray(arr)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"'{name}' must be a real numeric array; got dtype {a.dtype}.")
    if a.ndim != 3 or a.shape[2] != 2:
        raise ValueError(f"'{name}' must have shape (ny, nx, 2); got {a.shape}.")
    return a


def box(name, value, n):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"'{name}' must be an integer pixel index; got {value!r}.")
    value = int(value)
    if not 0 <= value < n:
        raise ValueError(f"'{name}' must be in [0, {n - 1}]; got {value}.")
    return value
