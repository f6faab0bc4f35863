"""Small helpers for reading json records."""
import math

__all__ = ["finite_floats"]


def finite_floats(value, length):
    """`value` as a list of `length` finite floats, or None if it is not one (missing, wrong
    length, non-numeric, NaN or infinite)."""
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(numbers) != length or not all(math.isfinite(v) for v in numbers):
        return None
    return numbers
