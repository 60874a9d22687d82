"""``backend=trl``: the launcher on Hugging Face models, through rl_loss's RLLossGRPOTrainer (a trl.GRPOTrainer).

Modules: :mod:`~launchers.backends.hf.grpo_args` (the one mapping of the launcher's sections onto GRPOConfig,
and what TRL cannot honour; imports no trl), :mod:`~launchers.backends.hf.models` (the tiny test model and
pretrained models), :mod:`~launchers.backends.hf.task` (the digit-sum task as text, with the toy task's
reward), :mod:`~launchers.backends.hf.callbacks` (metrics.jsonl, TensorBoard, checkpoint at the end, Ctrl-C)
and :mod:`~launchers.backends.hf.train` (the entry point). Importing this package imports neither trl nor
transformers.
"""
