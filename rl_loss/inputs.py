"""Checks of the library's inputs: values are right or refused, never silently converted (docs/trust-library.md).

Every public function of :mod:`rl_loss` passes its tensor and index arguments through these helpers, so a
wrong kind of input (a Python list where a tensor belongs, a generator where a sequence belongs, a boolean
selection, integer or meta values) raises one ``TypeError`` / ``ValueError`` line that names the argument,
what was given and the fix. Conversions happen only where they are exact (a list of 0/1 masks to a tensor,
integer rewards to float advantages).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor


def describe(value: Any) -> str:
    """How an error line shows a given value: a tensor by dtype and shape, anything else by a short repr."""
    if isinstance(value, Tensor):
        where = "meta " if value.is_meta else ""
        return f"{where}{str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def refuse_iterators(name: str, value: Any) -> None:
    """A generator or other one-shot iterator is refused where a sequence is needed (it would be consumed)."""
    if isinstance(value, Iterator) and not isinstance(value, (Tensor, str, bytes)):
        raise TypeError(
            f"{name} must be a sequence or a tensor, not a one-shot {type(value).__name__} (got {describe(value)}); "
            f"pass list(...) of it"
        )


def instance_of(name: str, value: Any, kind: type) -> Any:
    """``value`` itself when it is a ``kind``; otherwise a TypeError naming the argument and what it got."""
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be a {kind.__name__} (got {describe(value)})")
    return value


def refuse_meta(name: str, value: Tensor) -> None:
    if value.is_meta:
        raise ValueError(f"{name} is a meta tensor, which holds no values (got {describe(value)}); pass real data")


def integer_vector(name: str, values: Sequence[int] | Tensor, what: str = "integers") -> Tensor:
    """``values`` as a new 1-D int64 tensor (a copy: later edits by the caller change nothing).

    Raises:
        TypeError: for a generator, a string, or something that is not a sequence.
        ValueError: for values that are not integers (floats, booleans), a meta tensor, or a shape other than 1-D.
    """
    refuse_iterators(name, values)
    if isinstance(values, (str, bytes)) or not isinstance(values, (Tensor, Sequence)) and not hasattr(values, "__array__"):
        raise TypeError(f"{name} must be a 1-D sequence of {what} (got {describe(values)})")
    if isinstance(values, Tensor):
        refuse_meta(name, values)
        tensor = values.detach()
    else:
        try:
            tensor = torch.as_tensor(values) if len(values) else torch.zeros(0, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise TypeError(f"{name} must be a 1-D sequence of {what} (got {describe(values)})") from None
    if tensor.dtype == torch.bool:
        raise ValueError(
            f"{name} must be a 1-D sequence of {what}, not booleans (got {describe(values)}); a boolean selection "
            "is not a list of numbers: pass torch.nonzero(selection).flatten().tolist()"
        )
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        raise ValueError(f"{name} must be a 1-D sequence of {what}, not {str(tensor.dtype).removeprefix('torch.')} "
                         f"values (got {describe(values)}); convert them to int yourself where that is exact")
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be a 1-D sequence of {what} (got shape {tuple(tensor.shape)})")
    return tensor.to(device="cpu", dtype=torch.long, copy=True)


def float_tensor(name: str, value: Any, *, allow_integers: bool = False) -> Tensor:
    """A real (not meta) tensor of floating dtype; integer or boolean values are refused unless ``allow_integers``.

    Raises:
        TypeError: for a non-tensor, or integer / boolean / complex values where floats are needed.
        ValueError: for a meta tensor.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (got {describe(value)}); pass torch.as_tensor(...) of it")
    refuse_meta(name, value)
    if value.dtype.is_complex or not value.dtype.is_floating_point and not allow_integers:
        raise TypeError(
            f"{name} must hold floating-point values (got {describe(value)}); integer values would be reduced "
            "in integer arithmetic: pass .float() of them"
        )
    return value


def same_length_floats(n: int | None, **named: Tensor | None) -> int:
    """Check 1-D float tensors of one common length (``n``, or the first one's); returns that length.

    ``None`` entries are skipped (optional arguments).
    """
    for name, value in named.items():
        if value is None:
            continue
        float_tensor(name, value)
        if value.dim() != 1 or (n is not None and value.numel() != n):
            expected = f" with this rank's {n} local tokens" if n is not None else ", one value per local token"
            raise ValueError(f"{name} must be 1-D{expected} (got shape {tuple(value.shape)})")
        n = value.numel() if n is None else n
    return 0 if n is None else n


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a reduction of ``dtype`` values runs in: at least float32 (float16 / bfloat16 sums drift)."""
    return torch.promote_types(dtype, torch.float32)


def same_shape_floats(**named: Tensor) -> None:
    """Check float tensors of one common shape (element-wise inputs: log-probs, advantages)."""
    shape = None
    for name, value in named.items():
        float_tensor(name, value)
        if shape is None:
            shape, first = value.shape, name
        elif value.shape != shape:
            raise ValueError(
                f"{name} must have the shape of {first}, {tuple(shape)}, one value per token (got {describe(value)})"
            )


def real_number(name: str, value: Any, *, optional: bool = False, positive: bool = True) -> None:
    """A finite Python number (not a bool, not a tensor) for a coefficient such as a clip range or temperature."""
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < float("inf")
    if not ok or (positive and not value > 0):
        need = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{name} must be {need}{' or None' if optional else ''} (got {describe(value)})")
