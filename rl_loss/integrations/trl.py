"""Hugging Face TRL: rl-loss aggregation inside ``trl.GRPOTrainer`` (``pip install rl-loss[trl]``).

:class:`RLLossGRPOTrainer` is a ``trl.GRPOTrainer`` whose loss is computed by rl-loss: TRL still
generates, scores and computes advantages (for ``advantage_estimator=grpo_batch_std`` this trainer
divides TRL's group-centred advantages by their std over the generation batch); ``_compute_loss`` -- the hook TRL's own experimental
trainers (e.g. ``trl/experimental/gmpo``) override -- computes the per-token loss with
:func:`rl_loss.policy_loss` and aggregates it with the configured mode over the **optimizer step**
(all its micro-batches on all processes), docs/aggregation.md, docs/exactness.md. Checked against trl 1.16.0 and transformers 5.

Steps. :mod:`rl_loss.integrations.trl_steps` maps TRL's generation batches onto optimizer steps. When
``steps_per_generation`` is a multiple of ``gradient_accumulation_steps`` (TRL's default: equal), it
builds one :class:`~rl_loss.StepBatch` per step from every process's loss masks, exchanged once per
generation (one all-gather of an int32 ``(slices, rows, max_completion_length + 3)`` tensor); a prompt
group is the ``num_generations`` completions of one prompt. Otherwise a step mixes generation batches
and only sample_mean and constant are accepted: their weight of a sample needs only N and its own
tokens, so each micro-batch is reduced in a step of its own rows and fully masked placeholders for
the step's other samples, with no collective.

Scaling. Each micro-step returns ``num_processes * partial``, where ``partial`` is this process's
share of the step objective J for its micro-batch. The Hugging Face Trainer does not rescale it
(``GRPOTrainer.loss_is_scaled_for_ga = True``; Accelerate runs with ``num_steps=1``), gradients add up
over the micro-steps, and DDP averages them over the processes: the gradient is ``grad J`` exactly,
whatever ``gradient_accumulation_steps``, ``per_device_train_batch_size``, ``steps_per_generation``
and number of processes. The logged ``loss`` (the processes' mean of the summed
micro-step losses) is J.

Where this differs from TRL's own loss (TRL 1.16, ``GRPOTrainer._compute_loss``):

- KL (``beta > 0``): TRL adds ``beta * k3`` to every token's loss and aggregates it with the
  ``loss_type``'s normalisation (for ``dapo``: the token mean; ``dr_grpo``: / (B * max_completion_length)),
  and by default multiplies it by the importance ratio (``use_bias_correction_kl``). Here, as docs/aggregation.md
  says, ``kl_loss`` is ``loss_config.kl_estimator`` of ``d = logp - logp_ref`` averaged with
  sample_mean over the step, added as ``kl_coef * kl_loss``; ``loss_config.kl_coef`` is the
  coefficient and must equal ``GRPOConfig.beta`` (TRL builds the reference model only when beta > 0),
  and ``use_bias_correction_kl`` must be False. With ``loss_type="grpo"`` and k3 both agree.
- Entropy: TRL's bonus is each micro-batch's token mean divided by GA; here it is
  ``loss_config.entropy_coef`` times the sample_mean entropy of the step (``GRPOConfig.entropy_coef``
  must stay 0).
- Token mean: TRL's ``dapo`` divides by the generation batch's tokens times GA / steps_per_generation
  (the step's token count only when steps_per_generation == GA); here by the step's own tokens T.
- Metrics are step values, reduced once per optimizer step over processes, with sample_mean weights:
  ``pg_loss``, ``pg_clipfrac`` (share of tokens where the clip binds), ``ppo_kl`` (mean of
  logp_old - logp), ``entropy``, ``kl_loss`` (with a reference model), ``loss_scale_vs_token_mean``,
  ``tokens``, ``empty_step`` go into TRL's ``self._metrics`` (averaged over ``logging_steps`` by
  TRL's ``log``), and ``aggregation`` (a string, which TRL's averaging cannot take) is added to
  every training log by :meth:`RLLossGRPOTrainer.log`. TRL's ``clip_ratio/*`` and ``kl`` are not logged.

GRPOConfig settings that TRL's loss reads and this trainer would ignore or contradict are rejected
at construction (:mod:`rl_loss.integrations.trl_checks`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from rl_loss.extras import missing_extra

try:
    from trl import GRPOTrainer
except ModuleNotFoundError as err:  # trl or one of its own dependencies (transformers, accelerate, datasets)
    if (err.name or "").split(".")[0] not in ("trl", "transformers", "accelerate", "datasets"):
        raise
    raise missing_extra("trl", "rl_loss.integrations.trl", err.name) from None

from rl_loss.aggregation import EmptyStepWarning, ReducerFactory, TokenReducer
from rl_loss.config import LossConfig
from rl_loss.integrations.trl_checks import check_grpo_config
from rl_loss.integrations.trl_steps import (
    ROW_KEY,
    GenerationSteps,
    generation_rows,
    loss_mask,
    placeholder_step,
    slice_metadata,
    step_batch,
)
from rl_loss.policy_loss import policy_loss

TRL_CHECKED = "1.16.0"
"""trl release whose GRPOTrainer batching, scaling and config fields this module was derived from."""

_FORWARD_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                 "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _as_loss_config(loss_config: Any) -> LossConfig:
    if isinstance(loss_config, LossConfig):
        return loss_config
    if isinstance(loss_config, Mapping):
        return LossConfig.model_validate(dict(loss_config))
    raise TypeError(f"loss_config must be a rl_loss.LossConfig or a mapping of its fields (got {type(loss_config).__name__})")


class RLLossGRPOTrainer(GRPOTrainer):
    """A ``trl.GRPOTrainer`` whose pg loss is aggregated by rl-loss, exact across accumulation and processes.

    Args:
        *args, **kwargs: everything ``trl.GRPOTrainer`` takes (model, reward_funcs, args=GRPOConfig, ...).
        loss_config: the loss (:class:`~rl_loss.LossConfig` or a mapping of its fields), required.

    Raises:
        ValueError: listing, one line each, GRPOConfig settings that disagree with ``loss_config`` or
            that TRL's loss would apply and this trainer would not (before the model is touched when
            ``args`` is given).
    """

    def __init__(self, *args: Any, loss_config: LossConfig | Mapping[str, Any], **kwargs: Any):
        self.loss_config = _as_loss_config(loss_config)
        training_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        if training_args is not None:
            check_grpo_config(training_args, self.loss_config)
        super().__init__(*args, **kwargs)
        if training_args is None:  # TRL built a default GRPOConfig
            check_grpo_config(self.args, self.loss_config)
        self.reducers = ReducerFactory(self.loss_config)
        self._rl_buffer: list | None = None
        self._rl_steps: GenerationSteps | None = None
        # steps_per_generation a multiple of GA: whole-step StepBatches; otherwise placeholder steps
        self._rl_whole_steps = self.args.steps_per_generation % self.args.gradient_accumulation_steps == 0
        self._rl_micro = 0  # micro-steps taken in the current optimizer step (placeholder steps)
        self._rl_partials: dict[str, Tensor] = {}

    # -- batches -> steps -------------------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        if self.loss_config.advantage_estimator == "grpo_batch_std":
            output["advantages"] = self._batch_std_advantages(output["advantages"])
        device = output["advantages"].device
        output[ROW_KEY] = generation_rows(output["advantages"].size(0), self.accelerator.process_index, device)
        return output

    def _batch_std_advantages(self, centred: Tensor) -> Tensor:
        """grpo_batch_std (ScaleRL, docs/objectives.md) from TRL's ``scale_rewards="none"`` advantages ``c = r - mean_g``.

        A = c / (std_B + advantage_eps), std_B = sqrt(sum_j c_j^2 / (N - 1)) over the N completions of the
        whole generation batch (every process's share: one all-gather per generation), as
        :func:`rl_loss.group_advantages` computes it; TRL's own ``scale_rewards="batch"`` would divide by
        the std of the raw rewards instead.
        """
        every = self.accelerator.gather(centred.detach()).to(torch.float64)
        batch_std = (every.square().sum() / max(every.numel() - 1, 1)).sqrt()
        return (centred.to(torch.float64) / (batch_std + self.loss_config.advantage_eps)).to(centred.dtype)

    def _prepare_inputs(self, generation_batch: Any) -> dict[str, Any]:
        inputs = super()._prepare_inputs(generation_batch)
        if self.model.training and self._rl_whole_steps and self._buffered_inputs is not self._rl_buffer:
            self._rl_buffer = self._buffered_inputs
            self._rl_steps = GenerationSteps.from_buffer(
                self._buffered_inputs,
                self._metadata_width(),
                self.accelerator.gather,
                self.accelerator.process_index,
                self.args.gradient_accumulation_steps,
                self.num_generations,
            )
        return inputs

    def _metadata_width(self) -> int:
        multiple = self.pad_to_multiple_of or 1
        return -(-self.max_completion_length // multiple) * multiple

    def _micro_step(self, inputs: dict[str, Any], mode: str) -> tuple[TokenReducer, TokenReducer, bool, dict | None]:
        """This micro-batch's pg and metric reducers, whether it ends its optimizer step, and the step's figures.

        The figures (tokens, empty_step, loss_scale_vs_token_mean) come from the whole step's StepBatch,
        or are ``None`` for a placeholder step: then each micro-step adds its share and they are reduced
        with the other metrics at the step's end.
        """
        if mode != "train":  # eval: each process's batch is its own step
            step = step_batch(slice_metadata([inputs], loss_mask(inputs).shape[1])[0], self.num_generations_eval)
            return self.reducers.pg_reducer(step), self.reducers.metric_reducer(step), True, self.reducers.step_metrics(step)
        accumulation = self.current_gradient_accumulation_steps
        if self._rl_whole_steps:
            if accumulation != self.args.gradient_accumulation_steps:
                raise RuntimeError(
                    f"an optimizer step of {accumulation} micro-steps instead of gradient_accumulation_steps="
                    f"{self.args.gradient_accumulation_steps}: the epoch is not a whole number of optimizer steps, which "
                    "TRL's generation batching rules out; report this with your GRPOConfig"
                )
            slice_index = self._step % self.args.steps_per_generation
            steps = self._rl_steps
            step, samples = steps.step(slice_index), steps.micro_batch_samples(slice_index)
            ends_step = steps.is_last_micro_step(slice_index)
            figures = self.reducers.step_metrics(step) if ends_step else None
            return self.reducers.pg_reducer(step, samples), self.reducers.metric_reducer(step, samples), ends_step, figures
        # a step mixing generation batches (sample_mean / constant only): this micro-batch + placeholders
        rows = slice_metadata([inputs], loss_mask(inputs).shape[1])[0]
        step = placeholder_step(rows, accumulation * rows.shape[0] * self.accelerator.num_processes)
        samples = list(range(rows.shape[0]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EmptyStepWarning)  # judged on the whole step, at its end
            pg_reducer = self.reducers.pg_reducer(step, samples)
        self._rl_micro = (self._rl_micro + 1) % accumulation
        return pg_reducer, self.reducers.metric_reducer(step, samples), self._rl_micro == 0, None

    # -- the loss ---------------------------------------------------------------------------------------

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Tensor:
        mode = "train" if self.model.training else "eval"
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled, **{key: inputs.get(key) for key in _FORWARD_KEYS},
        )
        pg_reducer, metric_reducer, ends_step, figures = self._micro_step(inputs, mode)

        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old
        advantages = inputs["advantages"]
        advantages = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).expand_as(logps)
        tis = inputs.get("importance_sampling_ratio") if self.use_vllm and self.vllm_importance_sampling_correction else None
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        # OPSM's behaviour policy and rollout correction: the engine's log-probs when TRL has them (docs/corrections.md)
        wants_rollout = self.loss_config.rollout_correction.enabled or self.loss_config.off_policy_mask_delta is not None
        rollout = inputs.get("sampling_per_token_logps") if wants_rollout else None
        loss, metrics = policy_loss(
            logps.reshape(-1), old.reshape(-1), advantages.reshape(-1), pg_reducer, metric_reducer, self.loss_config,
            ref_logprobs=None if ref is None else ref.reshape(-1),
            entropy=entropies.reshape(-1),
            tis_weights=None if tis is None else tis.expand_as(logps).reshape(-1),
            rollout_logprobs=None if rollout is None else rollout.reshape(-1),
        )
        world = self.accelerator.num_processes if mode == "train" else 1
        loss = loss * world  # DDP averages over processes; the partials add up to J
        if self.aux_loss_enabled:  # the MoE router loss, as TRL adds it: a mean over micro-steps and processes
            accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            metrics["aux_loss"] = aux_loss.detach() / (accumulation * world)
        if figures is None and mode == "train":  # this micro-batch's share of the step's figures
            metrics["tokens"] = torch.tensor(float(pg_reducer.token_count()))
            metrics["loss_scale_vs_token_mean"] = pg_reducer.weights().sum()
        self._record_metrics(metrics, mode, ends_step, figures)
        return loss

    def _record_metrics(self, partials: dict[str, Tensor], mode: str, ends_step: bool, figures: dict | None) -> None:
        """Add this micro-step's metric partials; at the step's end, reduce over processes and log once."""
        for name, value in partials.items():
            value = value.detach().float().to(self.accelerator.device)
            previous = self._rl_partials.get(name)
            self._rl_partials[name] = value if previous is None else previous + value
        if not ends_step:
            return
        names = sorted(self._rl_partials)
        values = torch.stack([self._rl_partials[name] for name in names])
        values = self.accelerator.reduce(values, reduction="sum" if mode == "train" else "mean")
        step_values = dict(zip(names, values.tolist(), strict=True))
        if figures is None:
            figures = {"empty_step": float(step_values["tokens"] == 0)}
            if step_values["tokens"] == 0:
                warnings.warn("every loss-mask entry of the optimizer step is 0: pg_loss is 0 with zero gradient "
                              "(metric empty_step=1)", EmptyStepWarning, stacklevel=2)
        step_values.update(figures)
        metrics = self._metrics[mode]
        for name, value in step_values.items():
            metrics[name].append(float(value))
        self._rl_partials.clear()

    def log(self, logs: dict[str, Any], start_time: float | None = None) -> None:
        """TRL's log, plus ``aggregation`` (a string TRL's metric averaging cannot hold) on training logs."""
        if self.model.training and self._metrics["train"].get("pg_loss"):
            logs["aggregation"] = self.reducers.aggregation
        super().log(logs, start_time)
