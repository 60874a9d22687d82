"""Context-parallel layout: which response tokens of a sample a CP rank holds.

Megatron / Transformer Engine split every sequence into ``2 * cp_size`` chunks of ``c`` positions
and give CP rank ``r`` the chunks ``r`` and ``2 * cp_size - 1 - r`` (load-balanced "zigzag"), so each
rank gets one early and one late chunk of causal attention work.

- ``thd`` (packed): ``c = ceil(T_i / (2 * cp_size))`` per sample; the sample is padded to ``2 * cp_size * c``.
- ``bshd`` (padded batch): ``c = ceil(max_seq_len / (2 * cp_size))`` for every sample of the micro-batch.

The logit at position ``p`` predicts token ``p + 1``, so response token ``j`` (0-based) is scored at
position ``P_i - 1 + j`` where ``P_i = T_i - R_i`` is the prompt length. A held chunk ``[a, b)``
therefore holds response indices ``[max(a, P_i - 1), min(b, T_i - 1)) - (P_i - 1)`` (possibly empty).
A rank's local per-token values are, per sample in order, its two pieces concatenated.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

QkvFormat = Literal["thd", "bshd"]
QKV_FORMATS: tuple[str, ...] = ("thd", "bshd")


def check_cp_args(cp_rank: int, cp_size: int, qkv_format: str, max_seq_len: int | None) -> None:
    """Raise ``ValueError`` for a CP rank/size/format combination that cannot describe a layout."""
    if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"cp_size must be an integer >= 1 (got {cp_size!r})")
    if isinstance(cp_rank, bool) or not isinstance(cp_rank, int) or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be an integer in [0, cp_size={cp_size}) (got {cp_rank!r})")
    if qkv_format not in QKV_FORMATS:
        raise ValueError(f"qkv_format must be one of {', '.join(QKV_FORMATS)} (got {qkv_format!r})")
    if qkv_format == "bshd" and cp_size > 1 and max_seq_len is None:
        raise ValueError(
            "max_seq_len is required for qkv_format='bshd' with cp_size > 1: bshd chunks are cut from "
            "the padded micro-batch width, not from each sample's length (pass the padded width) "
            f"(got max_seq_len=None with cp_size={cp_size})"
        )
    if qkv_format == "thd" and max_seq_len is not None:
        raise ValueError(
            f"max_seq_len applies to qkv_format='bshd' only; thd chunks follow each sample's length "
            f"(got max_seq_len={max_seq_len!r} with thd: pass None)"
        )
    if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2):
        raise ValueError(f"max_seq_len must be an integer >= 2 or None (got {max_seq_len!r})")


def chunk_size(total_length: int, cp_size: int, qkv_format: str, max_seq_len: int | None) -> int:
    """Positions per CP chunk: ``ceil(width / (2 * cp_size))``, width = T_i (thd) or max_seq_len (bshd)."""
    width = total_length if qkv_format == "thd" or max_seq_len is None else max_seq_len
    return -(-width // (2 * cp_size))


def held_position_chunks(cp_rank: int, cp_size: int, chunk: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two position ranges ``[r*c, (r+1)*c)`` and ``[(2cp-1-r)*c, (2cp-r)*c)`` of CP rank ``r``."""
    first = (cp_rank * chunk, (cp_rank + 1) * chunk)
    second = ((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk)
    return first, second


def local_response_ranges(
    total_length: int,
    response_length: int,
    cp_rank: int = 0,
    cp_size: int = 1,
    qkv_format: QkvFormat = "thd",
    max_seq_len: int | None = None,
) -> list[tuple[int, int]]:
    """Response-token ranges of one sample held by a CP rank.

    Args:
        total_length: T_i, prompt plus response tokens.
        response_length: R_i, with ``1 <= R_i < T_i`` (every sample has a prompt token).
        cp_rank: this rank's index in its context-parallel group.
        cp_size: size of the context-parallel group.
        qkv_format: ``"thd"`` (packed, per-sample chunks) or ``"bshd"`` (padded, chunks of max_seq_len).
        max_seq_len: padded sequence width of the micro-batch; required for bshd with cp_size > 1.

    Returns:
        The non-empty ``(start, end)`` response-index ranges in the order the rank holds them
        (adjacent ranges merged). Concatenated over all CP ranks they tile ``[0, R_i)`` exactly once.

    Raises:
        ValueError: naming the argument, for lengths or CP arguments that describe no layout.
    """
    check_cp_args(cp_rank, cp_size, qkv_format, max_seq_len)
    _check_lengths(total_length, response_length, max_seq_len, qkv_format)
    chunk = chunk_size(total_length, cp_size, qkv_format, max_seq_len)
    first_scored = total_length - response_length - 1
    ranges: list[tuple[int, int]] = []
    for a, b in held_position_chunks(cp_rank, cp_size, chunk):
        start, end = max(a, first_scored), min(b, total_length - 1)
        if start >= end:
            continue
        start, end = start - first_scored, end - first_scored
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    return ranges


def _check_lengths(total_length: int, response_length: int, max_seq_len: int | None, qkv_format: str) -> None:
    if isinstance(response_length, bool) or not isinstance(response_length, int) or response_length < 1:
        raise ValueError(f"response_length must be an integer >= 1 (got {response_length!r})")
    if isinstance(total_length, bool) or not isinstance(total_length, int) or total_length <= response_length:
        raise ValueError(
            f"total_length must exceed response_length={response_length} (every sample has at least one "
            f"prompt token) (got {total_length!r})"
        )
    if qkv_format == "bshd" and max_seq_len is not None and max_seq_len < total_length:
        raise ValueError(f"max_seq_len={max_seq_len} is shorter than a sample of total_length={total_length}")


def local_token_index(
    total_lengths: Tensor,
    response_lengths: Tensor,
    response_offsets: Tensor,
    cp_rank: int,
    cp_size: int,
    qkv_format: str,
    max_seq_len: int | None,
    with_counts: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Positions in the step's flat response-token order of the tokens a CP rank holds, in §4 order.

    Vectorized counterpart of :func:`local_response_ranges` for many samples at once (no Python loop
    over samples): per sample, the rank's two pieces, each a run of consecutive flat positions.

    Args:
        total_lengths: T_i of the selected samples (int64).
        response_lengths: R_i of the selected samples (int64).
        response_offsets: flat offset of each selected sample's first response token in the step.
        cp_rank, cp_size, qkv_format, max_seq_len: as in :func:`local_response_ranges` (already checked).
        with_counts: also return how many of each sample's tokens the rank holds.

    Returns:
        int64 tensor of flat token positions; its length is the rank's local value count. With
        ``with_counts``, ``(positions, per-sample counts)``.
    """
    width = total_lengths if qkv_format == "thd" or max_seq_len is None else torch.full_like(total_lengths, max_seq_len)
    chunk = torch.div(width + 2 * cp_size - 1, 2 * cp_size, rounding_mode="floor")
    first_scored = total_lengths - response_lengths - 1
    starts, lengths = [], []
    for a_mult, b_mult in ((cp_rank, cp_rank + 1), (2 * cp_size - 1 - cp_rank, 2 * cp_size - cp_rank)):
        start = torch.maximum(a_mult * chunk, first_scored)
        end = torch.minimum(b_mult * chunk, total_lengths - 1)
        starts.append(start - first_scored + response_offsets)
        lengths.append((end - start).clamp_min(0))
    # interleave (sample 0 piece 0, sample 0 piece 1, sample 1 piece 0, ...)
    piece_starts = torch.stack(starts, dim=1).reshape(-1)
    piece_lengths = torch.stack(lengths, dim=1).reshape(-1)
    index = runs_to_index(piece_starts, piece_lengths)
    return (index, lengths[0] + lengths[1]) if with_counts else index


def runs_to_index(run_starts: Tensor, run_lengths: Tensor) -> Tensor:
    """Concatenate ``arange(s, s + n)`` for every run ``(s, n)``, vectorized."""
    total = int(run_lengths.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long)
    run_ends = torch.cumsum(run_lengths, 0)
    shift = run_starts - (run_ends - run_lengths)
    return torch.arange(total, dtype=torch.long) + torch.repeat_interleave(shift, run_lengths, output_size=total)


def sequence_positions(total_length: int, cp_rank: int, cp_size: int, qkv_format: str, max_seq_len: int | None) -> Tensor:
    """Sequence positions (possibly padding, ``>= T_i``) held by a CP rank, in local order.

    Used by models that compute only their rank's query chunks: the logits at these positions are the
    rank's local logits, and response token ``j`` is read at position ``T_i - R_i - 1 + j``.
    """
    chunk = chunk_size(total_length, cp_size, qkv_format, max_seq_len)
    (a0, b0), (a1, b1) = held_position_chunks(cp_rank, cp_size, chunk)
    return torch.cat([torch.arange(a0, b0), torch.arange(a1, b1)])
