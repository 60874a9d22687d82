"""``custom_pg_reducer``: the path's shape (checked without importing) and the one function that imports it.

Validating a :class:`~rl_loss.LossConfig` never imports anything: it checks only that
``custom_pg_reducer`` has the shape ``package.module:function`` (:func:`check_reducer_path`). Code that
needs the callable (the :class:`~rl_loss.ReducerFactory`, the launcher's preflight, ``rl-loss-validate
--import-custom``) calls :func:`load_custom_reducer`, which imports it and turns every failure (no such
module, a module that raises on import, not callable, a signature or result that breaks the contract)
into one ``ValueError`` line naming ``custom_pg_reducer``, the path and the fix (docs/trust-library.md).

The contract (docs/aggregation.md): ``fn(step: StepBatch) -> weights``, one finite float weight per
response token of the step in its flat order (samples concatenated).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported only when a reducer is loaded: LossConfig validation needs none
    from torch import Tensor

FIELD = "custom_pg_reducer"
REDUCER_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*|\.[A-Za-z_]\w*)")
"""``package.module:function`` or ``package.module.function``: Python identifiers only."""
FIX = "use 'package.module:function' naming a function step -> one weight per response token"


def check_reducer_path(path: str) -> str | None:
    """The problem with the SHAPE of an import path, or ``None``; imports nothing."""
    if not isinstance(path, str) or len(path) > 200 or not REDUCER_PATH.fullmatch(path):
        shown = repr(path) if len(repr(path)) <= 60 else repr(path)[:57] + "..."
        return f"{FIELD}: {shown} is not an import path; {FIX}"
    return None


def split_reducer_path(path: str) -> tuple[str, str]:
    """(module, attribute) of ``'a.b:f'`` or ``'a.b.f'``."""
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    return module, attr


def load_custom_reducer(path: str, *, probe: bool = True) -> Callable[[Any], Tensor]:
    """Import the custom pg reducer at ``path`` and check it against the contract.

    This runs the named module's code: call it only where importing was asked for (a training run, or
    ``rl-loss-validate --import-custom``), never on a file under review.

    Args:
        path: ``'package.module:function'``.
        probe: also call the function once on a two-sample step and check its result (one finite weight
            per response token): the only way to be sure of a callable without annotations (``os:system``
            takes one argument too, and fails only when called).

    Raises:
        ValueError: one line naming custom_pg_reducer, the path, what failed and the fix.
    """
    problem = check_reducer_path(path)
    if problem:
        raise ValueError(problem)
    module_name, attr = split_reducer_path(path)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{FIELD}: cannot import {path!r} ({_first_line(err)}); {FIX}") from None
    except BaseException as err:  # the module's own code raised (or exited) while importing
        if isinstance(err, KeyboardInterrupt):
            raise
        raise ValueError(
            f"{FIELD}: importing {module_name!r} raised {type(err).__name__} ({_first_line(err)}); fix that module"
        ) from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"{FIELD}: module {module_name!r} has no {attr!r} (got {path!r}); {FIX}")
    if not callable(fn) or inspect.isclass(fn):
        raise ValueError(f"{FIELD}: {path!r} is not a function (got {type(fn).__name__}); {FIX}")
    _check_signature(path, fn)
    if probe:
        _probe(path, fn)
    return fn


def _check_signature(path: str, fn: Callable[..., Any]) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # some builtins have none: the probe decides
    try:
        signature.bind(object())
    except TypeError:
        raise ValueError(
            f"{FIELD}: {path!r} cannot be called with one argument, the step (signature {signature}); {FIX}"
        ) from None


def _probe(path: str, fn: Callable[..., Any]) -> None:
    import torch

    from rl_loss.step import StepBatch

    # two samples of 2 and 1 response tokens, one token masked: 3 weights expected
    step = StepBatch(response_lengths=[2, 1], total_lengths=[3, 2],
                     loss_masks=[torch.tensor([1.0, 0.0]), torch.tensor([1.0])], group_index=[0, 0])
    try:
        result = fn(step)
    except Exception as err:
        raise ValueError(
            f"{FIELD}: {path!r} failed on a two-sample step ({type(err).__name__}: {_first_line(err)}); {FIX}"
        ) from None
    try:
        custom_weights_of(result, step)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{FIELD}: {path!r} on a two-sample step: {err}") from None


def custom_weights_of(result: Any, step: Any) -> Tensor:
    """A custom reducer's result as flat float64 weights, checked: one finite float per response token.

    Raises:
        TypeError / ValueError: naming what was returned and what is expected.
    """
    import torch

    if not isinstance(result, torch.Tensor):
        raise TypeError(f"returned {type(result).__name__}; return a float tensor of one weight per response token")
    if result.is_meta or not result.dtype.is_floating_point:
        raise TypeError(f"returned a {'meta ' if result.is_meta else ''}{result.dtype} tensor; "
                        "return floating-point weights")
    weights = result.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if weights.numel() != step.num_response_tokens:
        raise ValueError(
            f"returned {weights.numel()} weights; expected one per response token ({step.num_response_tokens})"
        )
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("returned non-finite token weights; return finite weights")
    return weights


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= 120 else line[:117] + "..."
