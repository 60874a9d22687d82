"""Embedded toy RL environment for the launcher: a verifiable digit-sum task, a tiny causal
transformer policy with context-parallel attention, and batched sampled rollouts.

Everything here is plain PyTorch and needs no download, so ``python -m launchers.train`` runs on a
2-core CPU in minutes.
"""

from launchers.backends.toy.cp_exchange import all_gather_kv, run_simulated_cp
from launchers.backends.toy.model import (
    ModelConfig,
    ToyPolicy,
    cp_batch,
    local_logprobs,
)
from launchers.backends.toy.rollout import Rollout, generate, sample_rollout
from launchers.backends.toy.task import DigitSumTask

__all__ = [
    "DigitSumTask",
    "ModelConfig",
    "Rollout",
    "ToyPolicy",
    "all_gather_kv",
    "cp_batch",
    "generate",
    "local_logprobs",
    "run_simulated_cp",
    "sample_rollout",
]
