"""A custom pg token-weight function, importable as ``tests.custom_weights:double_sample_mean``."""

from rl_loss import StepBatch, build_step_weights


def double_sample_mean(step: StepBatch):
    """Twice the sample_mean weights (a deliberately different scale that tests can recognise)."""
    return 2 * build_step_weights(step, "sample_mean").weights
