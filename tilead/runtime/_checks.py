"""One input-check helper for every boundary of the runtime.

Errors say what was expected and what was given, and are raised as
``ValueError`` (``TypeError`` is never used for bad array contents, so callers
catch one exception type).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt


def describe(value: object) -> str:
    """Short description of a value for error messages."""
    if isinstance(value, np.ndarray):
        return f"array of dtype {value.dtype} and shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_array(
    value: object,
    name: str,
    *,
    dtypes: Sequence[npt.DTypeLike],
    ndims: Sequence[int],
    contiguous: bool = True,
    writable: bool = False,
    nonempty: bool = True,
) -> np.ndarray:
    """Validate an array argument and return it unchanged.

    Args:
        value: The argument to check.
        name: Argument name used in error messages.
        dtypes: Accepted dtypes.
        ndims: Accepted numbers of dimensions.
        contiguous: Require C-contiguous memory.
        writable: Require a writable array (outputs).
        nonempty: Require every dimension to be at least 1.

    Returns:
        The same array.

    Raises:
        ValueError: When any requirement is not met.
    """
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {describe(value)}")
    accepted = [np.dtype(d) for d in dtypes]
    if value.dtype not in accepted:
        want = " or ".join(str(d) for d in accepted)
        raise ValueError(f"{name}: expected dtype {want}, got {value.dtype}")
    if value.ndim not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise ValueError(f"{name}: expected {want} dimensions, got {value.ndim} with shape {value.shape}")
    if nonempty and value.size == 0:
        raise ValueError(f"{name}: expected a non-empty array, got shape {value.shape}")
    if contiguous and not value.flags.c_contiguous:
        raise ValueError(
            f"{name}: expected a C-contiguous array, got strides {value.strides} for shape {value.shape} "
            "(use numpy.ascontiguousarray)"
        )
    if writable and not value.flags.writeable:
        raise ValueError(f"{name}: expected a writable array, got a read-only one")
    return value


def check_shape(value: np.ndarray, name: str, expected: tuple[int, ...], meaning: str) -> None:
    """Raise ValueError unless ``value.shape == expected``.

    Args:
        value: Array to check.
        name: Argument name used in error messages.
        expected: Required shape.
        meaning: What the dimensions are, e.g. ``"(n, height, width)"``.
    """
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)} {meaning}, got {tuple(value.shape)}")


def as_int(value: object, name: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    """Validate an integer (Python or NumPy, not bool) of at least ``minimum`` and at most ``maximum``.

    Args:
        value: The argument to check.
        name: Argument name used in error messages.
        minimum: Smallest accepted value.
        maximum: Largest accepted value (None: no bound).

    Returns:
        The value as a Python int.

    Raises:
        ValueError: When the value is not an integer or is out of bounds.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {describe(value)}")
    result = int(value)
    if result < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {describe(result)}")
    if maximum is not None and result > maximum:
        raise ValueError(f"{name}: expected an integer <= {maximum}, got {describe(result)}")
    return result


def as_pair(value: object, name: str, *, minimum: int = 1, maximum: int | None = None) -> tuple[int, int]:
    """Validate an int or a (height, width) pair of ints.

    Args:
        value: An integer (used for both axes) or a sequence of two integers.
        name: Argument name used in error messages.
        minimum: Smallest accepted value.
        maximum: Largest accepted value (None: no bound).

    Returns:
        ``(height, width)``.

    Raises:
        ValueError: When the value is not of that form.
    """
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{name}: expected an integer or a pair of integers (height, width), got {value!r}")
    if isinstance(value, (Sequence, np.ndarray)):
        if isinstance(value, np.ndarray) and value.ndim != 1:
            raise ValueError(
                f"{name}: expected an integer or a pair of integers (height, width), got {describe(value)}"
            )
        if len(value) != 2:
            raise ValueError(
                f"{name}: expected an integer or a pair of integers (height, width), got {len(value)} values"
            )
        items = list(value)
        return (
            as_int(items[0], f"{name}[0]", minimum=minimum, maximum=maximum),
            as_int(items[1], f"{name}[1]", minimum=minimum, maximum=maximum),
        )
    single = as_int(value, name, minimum=minimum, maximum=maximum)
    return single, single


def as_float(value: object, name: str, *, low: float | None = None, high: float | None = None) -> float:
    """Validate a finite real number within optional inclusive bounds.

    Args:
        value: The argument to check.
        name: Argument name used in error messages.
        low: Smallest accepted value, if any.
        high: Largest accepted value, if any.

    Returns:
        The value as a Python float.

    Raises:
        ValueError: When the value is not a finite number within the bounds.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected a number, got {describe(value)}")
    result = float(value)
    if not np.isfinite(result):
        raise ValueError(f"{name}: expected a finite number, got {result}")
    if (low is not None and result < low) or (high is not None and result > high):
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name}: expected a number in [{lo}, {hi}], got {result:g}")
    return result


def check_mapping(data: object, name: str, allowed: Sequence[str], required: Sequence[str] = ()) -> Mapping[str, Any]:
    """Validate plain configuration data: a mapping with known keys only.

    Args:
        data: The value read from a manifest or config.
        name: What it describes, used in error messages (e.g. ``"grid"``).
        allowed: Every accepted key.
        required: Keys that must be present.

    Returns:
        The same mapping.

    Raises:
        ValueError: For a non-mapping, unknown keys or missing keys.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{name}: expected a mapping with keys {', '.join(allowed)}, got {describe(data)}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"{name}: unknown keys {unknown}; allowed keys are {', '.join(allowed)}")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{name}: missing keys {missing}")
    return data
