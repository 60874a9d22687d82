"""A small causal transformer policy whose attention supports context parallelism (CP).

Every forward works on the query positions a rank computes: ``tokens``, their GLOBAL ``positions``
and a ``valid`` flag (False for padding). Each attention layer hands its local keys/values to a
``kv_exchange`` callable that returns the keys/values of the whole sequence (gathered from every CP
rank), and masks causally by global position: a query at position ``p`` sees the valid keys with
position ``<= p``. Without CP the exchange is the identity, so one code path serves:

- the plain full-sequence path (:meth:`ToyPolicy.logits`, used by rollouts);
- a single process simulating CP ranks (:func:`launchers.backends.toy.cp_exchange.run_simulated_cp`, for tests);
- a distributed trainer (:func:`launchers.backends.toy.cp_exchange.all_gather_kv` over the CP process group).

:func:`local_logprobs` turns a rank's logits into the log-probs and entropies of the response tokens
it holds, in the order rl_loss expects (docs/cp-layout.md: per sample, its two CP pieces concatenated).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rl_loss.layout import check_cp_args, sequence_positions

# (k, v, positions, valid) of this rank -> the same for the whole sequence; k, v: [B, H, S, Dh],
# positions: [B, S] int64, valid: [B, S] bool. Gathered along S, in any order.
KVExchange = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]

# Position of a batch slot that holds no sequence position at all (thd samples shorter than the
# widest one): larger than any real position, so such a query always has a key to attend to.
SLOT_PAD_POSITION = 2**30


def no_exchange(k: Tensor, v: Tensor, positions: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The identity exchange: this rank holds the whole sequence (no CP)."""
    return k, v, positions, valid


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of :class:`ToyPolicy`.

    Args:
        vocab_size: input token ids ``[0, vocab_size)``.
        num_actions: the output head scores token ids ``[0, num_actions)`` only (what a response may
            contain), so no probability is wasted on prompt-only tokens.
        pad_id: token used for padding slots.
        max_positions: learned position embeddings; padding beyond it reuses the last one.
        d_model, n_layers, n_heads, mlp_ratio: transformer sizes.
        init_std: std of the normal init of weights and embeddings.
    """

    vocab_size: int = 14
    num_actions: int = 11
    pad_id: int = 13
    max_positions: int = 32
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    init_std: float = 0.02

    @classmethod
    def for_task(cls, task: Any, **sizes: Any) -> ModelConfig:
        """A config whose vocabulary, action set, pad token and positions fit ``task`` (a DigitSumTask)."""
        return cls(
            vocab_size=task.vocab_size,
            num_actions=task.num_actions,
            pad_id=task.pad_id,
            max_positions=task.max_total_len,
            **sizes,
        )

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if not 1 <= self.num_actions <= self.vocab_size:
            raise ValueError(f"num_actions must be in [1, vocab_size={self.vocab_size}] (got {self.num_actions})")


class CausalSelfAttention(nn.Module):
    """Multi-head attention masked by global position, with keys/values from ``kv_exchange``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: Tensor, positions: Tensor, valid: Tensor, kv_exchange: KVExchange) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k_all, v_all, key_pos, key_valid = kv_exchange(k, v, positions, valid)
        allowed = key_valid[:, None, :] & (key_pos[:, None, :] <= positions[:, :, None])  # [B, S_q, S_k]
        scores = (q @ k_all.transpose(-1, -2)) / math.sqrt(self.head_dim)
        # Masked keys get exactly zero weight, so padding and other samples' slots never leak in.
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v_all
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        hidden = config.mlp_ratio * config.d_model
        self.mlp = nn.Sequential(nn.Linear(config.d_model, hidden), nn.GELU(), nn.Linear(hidden, config.d_model))

    def forward(self, x: Tensor, positions: Tensor, valid: Tensor, kv_exchange: KVExchange) -> Tensor:
        x = x + self.attn(self.ln1(x), positions, valid, kv_exchange)
        return x + self.mlp(self.ln2(x))


class ToyPolicy(nn.Module):
    """Token + learned position embeddings, pre-LN blocks, final LayerNorm, untied action head."""

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config if config is not None else ModelConfig()
        c = self.config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.max_positions, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.num_actions)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, tokens: Tensor, positions: Tensor, valid: Tensor, kv_exchange: KVExchange | None = None
    ) -> Tensor:
        """Logits over the actions at the given query slots.

        Args:
            tokens: ``[B, S]`` token ids of the slots this rank computes.
            positions: ``[B, S]`` their global sequence positions (int64).
            valid: ``[B, S]`` True where the slot holds a real token (position < the sample's length).
            kv_exchange: gathers keys/values of the whole sequence; ``None`` = this rank holds all of it.

        Returns:
            ``[B, S, num_actions]`` logits; the logit at position ``p`` predicts token ``p + 1``.
        """
        exchange = no_exchange if kv_exchange is None else kv_exchange
        pos_index = positions.clamp(0, self.config.max_positions - 1)  # padding slots only
        x = self.tok_emb(tokens) + self.pos_emb(pos_index)
        for block in self.blocks:
            x = block(x, positions, valid, exchange)
        return self.head(self.ln_f(x))

    def logits(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Full-sequence logits of a right-padded batch ``tokens [B, S]`` with true ``lengths [B]`` (no CP)."""
        b, s = tokens.shape
        positions = torch.arange(s, device=tokens.device).expand(b, s)
        valid = positions < lengths.to(tokens.device)[:, None]
        return self(tokens, positions, valid)


@dataclass
class CPBatch:
    """The slots one CP rank computes for a micro-batch, ready for :meth:`ToyPolicy.forward`.

    Attributes:
        tokens, positions, valid: ``[B, S_local]`` forward inputs (positions global).
        score_mask: ``[B, S_local]`` True at slots whose logit scores a response token; read in
            row-major order these are the rank's response tokens in rl_loss's order.
        labels: ``[B, S_local]`` the token each scored slot predicts (0 elsewhere).
    """

    tokens: Tensor
    positions: Tensor
    valid: Tensor
    score_mask: Tensor
    labels: Tensor

    @property
    def num_scored(self) -> int:
        """How many response tokens this rank scores (the length of its local values)."""
        return int(self.score_mask.sum())


def cp_batch(
    sequences: Sequence[Sequence[int]],
    response_lengths: Sequence[int],
    cp_rank: int = 0,
    cp_size: int = 1,
    qkv_format: str = "thd",
    max_seq_len: int | None = None,
    pad_id: int = 13,
) -> CPBatch:
    """Cut a micro-batch into the slots CP rank ``cp_rank`` computes (docs/cp-layout.md zigzag layout).

    Args:
        sequences: full token ids of each sample (prompt then response), length T_i.
        response_lengths: R_i of each sample.
        cp_rank, cp_size, qkv_format, max_seq_len: as in :func:`rl_loss.local_response_ranges`
            (``max_seq_len`` is the padded bshd width, required for bshd with ``cp_size > 1``).
        pad_id: token placed in padding slots.

    Returns:
        The rank's :class:`CPBatch`; sample ``i`` occupies row ``i``.
    """
    check_cp_args(cp_rank, cp_size, qkv_format, max_seq_len)
    if len(sequences) != len(response_lengths):
        raise ValueError(f"got {len(sequences)} sequences but {len(response_lengths)} response lengths")
    rows = []
    for seq, r in zip(sequences, response_lengths, strict=True):
        total = len(seq)
        if not 1 <= int(r) < total:
            raise ValueError(f"response length {r} must be in [1, T_i={total}) (every sample has a prompt token)")
        pos = sequence_positions(total, cp_rank, cp_size, qkv_format, max_seq_len)
        # the label of the last held position may be one past the padded width
        full = torch.full((max(total, int(pos.max()) + 2),), pad_id, dtype=torch.long)
        full[:total] = torch.as_tensor(list(seq), dtype=torch.long)
        first_scored = total - int(r) - 1
        rows.append((full[pos], pos, pos < total, (pos >= first_scored) & (pos < total - 1), full[pos + 1]))
    width = max(row[1].numel() for row in rows)

    def stack(index: int, fill: Any, dtype: torch.dtype) -> Tensor:
        out = torch.full((len(rows), width), fill, dtype=dtype)
        for i, row in enumerate(rows):
            out[i, : row[index].numel()] = row[index]
        return out

    score_mask = stack(3, False, torch.bool)
    labels = stack(4, 0, torch.long).masked_fill(~score_mask, 0)
    return CPBatch(
        tokens=stack(0, pad_id, torch.long),
        positions=stack(1, SLOT_PAD_POSITION, torch.long),
        valid=stack(2, False, torch.bool),
        score_mask=score_mask,
        labels=labels,
    )


def local_logprobs(
    model: ToyPolicy,
    sequences: Sequence[Sequence[int]],
    response_lengths: Sequence[int],
    cp_rank: int = 0,
    cp_size: int = 1,
    qkv_format: str = "thd",
    max_seq_len: int | None = None,
    kv_exchange: KVExchange | None = None,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Log-probs and entropies of the response tokens CP rank ``cp_rank`` holds, in rl_loss order.

    Response token ``j`` of sample ``i`` is scored by the logit at ``P_i - 1 + j``; the result lists,
    per sample in order, the rank's two pieces concatenated, exactly as
    :func:`rl_loss.local_response_ranges` describes and the reducers of rl_loss expect.

    Args:
        model: the policy.
        sequences, response_lengths, cp_rank, cp_size, qkv_format, max_seq_len: see :func:`cp_batch`.
        kv_exchange: gathers keys/values across the CP group (``None`` for cp_size 1).
        temperature: the sampling temperature of the rollout (logits are divided by it).

    Returns:
        ``(logprobs, entropy)``, 1-D tensors of the rank's local response-token count, in the
        model's dtype, differentiable in the model's parameters.
    """
    if cp_size > 1 and kv_exchange is None:
        raise ValueError(f"cp_size={cp_size} needs a kv_exchange gathering keys/values over the CP group")
    batch = cp_batch(sequences, response_lengths, cp_rank, cp_size, qkv_format, max_seq_len, model.config.pad_id)
    device = next(model.parameters()).device
    logits = model(batch.tokens.to(device), batch.positions.to(device), batch.valid.to(device), kv_exchange)
    scored = logits[batch.score_mask.to(device)] / temperature
    logp = torch.log_softmax(scored, dim=-1)
    token_logp = logp.gather(-1, batch.labels[batch.score_mask].to(device)[:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return token_logp, entropy
