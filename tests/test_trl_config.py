"""backend=trl without training: group rules, what TRL cannot honour, the GRPOConfig mapping, the text task's reward.

Nothing here imports trl; the runs are in test_trl_launcher.py.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from launchers.backends.hf.grpo_args import (
    GRPO_CONFIG_FIELDS,
    HONOURED_OUTSIDE_GRPO_CONFIG,
    UNSUPPORTED_BY_TRL,
    grpo_config_kwargs,
    trl_loss_config,
)
from launchers.backends.hf.task import DigitSumReward, prompt_dataset
from launchers.backends.toy.task import DigitSumTask
from launchers.config.backends import HFModelConfig, HFTinyModelConfig
from launchers.config.conf_store import section_options
from launchers.config.preflight import ConfigError, compose_job
from launchers.config.run_config import ModelConfig, RunConfig

ROOT = Path(__file__).resolve().parent.parent
TRL = ["backend=trl", "model=hf_tiny"]
TASK = DigitSumTask()
EOS = 10


def problems_of(overrides: list[str], world_size: int = 1) -> list[str]:
    with pytest.raises(ConfigError) as err:
        compose_job(overrides, world_size)
    return err.value.problems


# -- the backend and model groups -----------------------------------------------------------------


def test_default_run_is_the_toy_backend_on_the_toy_model():
    config = compose_job([]).config
    assert (config.backend.kind, config.model.kind) == ("toy", "toy")


def test_toy_model_fields_keep_their_command_line_names():
    model = compose_job(["model.d_model=32", "model.n_layers=1", "model.n_heads=2"]).config.model
    assert model == ModelConfig(d_model=32, n_layers=1, n_heads=2)


def test_toy_backend_rejects_a_hugging_face_model():
    assert problems_of(["model=hf_tiny"]) == [
        "model: backend=toy trains model=toy (got model=hf_tiny); use model=toy, or backend=trl for model=hf_tiny"
    ]


def test_trl_backend_rejects_the_toy_model():
    assert problems_of(["backend=trl"]) == [
        "model: backend=trl trains model=hf_tiny or model=hf (got model=toy); use model=hf_tiny or model=hf, "
        "or backend=toy for model=toy"
    ]


def test_model_hf_requires_name_or_path():
    assert problems_of(["backend=trl", "model=hf"]) == ["model.name_or_path: is required (got nothing); set model.name_or_path=VALUE"]


def test_model_hf_takes_a_hub_id_or_folder():
    model = compose_job(["backend=trl", "model=hf", "model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct"]).config.model
    assert model == HFModelConfig(name_or_path="Qwen/Qwen2.5-0.5B-Instruct")


def test_group_tag_set_as_a_key_names_the_group_option():
    assert problems_of([*TRL, "model.kind=hf"]) == [
        "model.kind: is set by the group option (got 'hf' with model=hf_tiny); pick the option instead: model=hf"
    ]


def test_field_of_another_model_option_is_an_unknown_key():
    (problem,) = problems_of([*TRL, "model.d_model=32"])
    assert problem.startswith("model.d_model: unknown key")


def test_misspelt_model_field_suggests_the_field():
    (problem,) = problems_of([*TRL, "model.hiden_size=64"])
    assert "did you mean 'model.hidden_size'?" in problem


def test_model_field_errors_name_the_field_without_the_option_tag():
    assert problems_of([*TRL, "model.hidden_size=30"]) == ["model.num_attention_heads: must divide hidden_size=30 (got 4)"]


# -- fields TRL cannot honour ----------------------------------------------------------------------

UNSUPPORTED_SETTINGS = {  # path: (value on the command line, as the message shows it)
    "parallel.cp_size": ("2", "2"),
    "parallel.qkv_format": ("bshd", "'bshd'"),
    "parallel.backend": ("gloo", "'gloo'"),
    "loss.advantage_eps": ("0.001", "0.001"),
    "loss.cov_penalty": ("clip_cov", "'clip_cov'"),
    "loss.rollout_correction": ("{is_level:token}", "{'is_level': 'token'}"),
}


def test_every_field_trl_cannot_honour_has_a_rejection_test():
    assert set(UNSUPPORTED_SETTINGS) == set(UNSUPPORTED_BY_TRL)


@pytest.mark.parametrize("path", list(UNSUPPORTED_SETTINGS))
def test_field_trl_cannot_honour_is_rejected_when_set(path):
    value, shown = UNSUPPORTED_SETTINGS[path]
    ours = [p for p in problems_of([*TRL, f"{path}={value}"]) if "backend=trl cannot honour it" in p]
    assert len(ours) == 1 and ours[0].startswith(f"{path}: backend=trl cannot honour it: ")
    assert f"(got {shown}); remove it (default " in ours[0]


@pytest.mark.parametrize(("path", "value"), [("parallel.qkv_format", "bshd"), ("parallel.backend", "gloo")])
def test_fields_trl_cannot_honour_stay_valid_with_the_toy_backend(path, value):
    assert compose_job([f"{path}={value}"]).config


def test_trls_own_advantage_eps_is_accepted():
    assert compose_job([*TRL, "loss.advantage_eps=1e-4"]).config.loss.advantage_eps == 1e-4


def test_trl_needs_two_samples_per_prompt():
    overrides = [*TRL, "rollout.n_samples_per_prompt=1", "trainer.global_batch_size=16", "trainer.micro_batch_size=16"]
    assert any(p.startswith("rollout.n_samples_per_prompt: TRL's GRPOTrainer needs at least 2") for p in problems_of(overrides))


def test_trl_checkpoints_fall_between_rollouts():
    overrides = [*TRL, "trainer.global_batch_size=64", "trainer.save_every=3", "trainer.max_steps=4"]
    assert any(p.startswith("trainer.save_every: with backend=trl a checkpoint must fall between rollouts")
               for p in problems_of(overrides))


def test_unsupported_field_exits_2_with_one_line_before_any_model_work(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "launchers.train", *TRL, "parallel.qkv_format=bshd", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "Invalid configuration (1 problem):",
        "  parallel.qkv_format: backend=trl cannot honour it: TRL packs no sequences across CP ranks, so the CP "
        "layout has no meaning there (got 'bshd'); remove it (default 'thd')",
    ]
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


# -- world size (accelerate launch sets WORLD_SIZE, as torchrun does) --------------------------------------


def test_world_size_enters_the_batch_rules():
    overrides = [*TRL, "trainer.micro_batch_size=64"]  # a step of 128 samples
    assert compose_job(overrides, world_size=2).config
    (problem,) = problems_of(overrides, world_size=4)
    assert problem.startswith("trainer.micro_batch_size: a step of 128 samples over 4 DP rank(s)")


def test_world_size_divides_gradient_accumulation():
    config = compose_job(TRL).config  # 128 samples per step, micro-batches of 32
    assert grpo_config_kwargs(config, "run", world_size=1)["gradient_accumulation_steps"] == 4
    assert grpo_config_kwargs(config, "run", world_size=2)["gradient_accumulation_steps"] == 2
    assert grpo_config_kwargs(config, "run", world_size=4)["gradient_accumulation_steps"] == 1


# -- the GRPOConfig mapping ------------------------------------------------------------------------


def leaf_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        if name in ("kind", "target"):  # set by the group option / Hydra
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths += leaf_paths(annotation, f"{prefix}{name}.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


def run_config_paths(model_option: str) -> list[str]:
    paths = [p for p in leaf_paths(RunConfig) if p not in ("backend", "model")]
    backend = section_options("backend")["trl"]
    return paths + leaf_paths(backend, "backend.") + leaf_paths(section_options("model")[model_option], "model.")


@pytest.mark.parametrize("model_option", ["hf_tiny", "hf"])
def test_every_launcher_field_is_mapped_honoured_or_rejected(model_option):
    unaccounted = [
        path for path in run_config_paths(model_option)
        if path not in GRPO_CONFIG_FIELDS and path not in UNSUPPORTED_BY_TRL
        and path.split(".")[0] not in HONOURED_OUTSIDE_GRPO_CONFIG and path not in HONOURED_OUTSIDE_GRPO_CONFIG
    ]
    assert unaccounted == []


PERTURBED = {
    "rollout.prompts_per_rollout": "32",
    "rollout.n_samples_per_prompt": "16",
    "rollout.max_response_len": "10",
    "rollout.temperature": "0.7",
    "trainer.global_batch_size": "64",
    "trainer.micro_batch_size": "16",
    "trainer.max_steps": "600",
    "trainer.save_every": "50",
    "optim.lr": "1e-5",
    "optim.betas": "[0.8,0.95]",
    "optim.weight_decay": "0.1",
    "optim.grad_clip": "null",
    "loss.kl_coef": "0.04",
    "loss.advantage_estimator": "drgrpo",
    "loss.ratio_level": "sequence",
    "seed": "7",
    "device": "cuda",
    "backend.bf16": "true",
    "backend.gradient_checkpointing": "true",
}


def test_every_mapped_field_has_a_perturbation():
    assert set(PERTURBED) == set(GRPO_CONFIG_FIELDS)


@pytest.mark.parametrize("path", sorted(GRPO_CONFIG_FIELDS))
def test_mapped_field_sets_exactly_its_grpo_config_fields(path):
    if path not in run_config_paths("hf_tiny"):
        assert path == "loss.ratio_level"  # GSPO's ratio level lands with the surrogates issue (10a)
        return
    base = compose_job(TRL).config
    changed = compose_job([*TRL, f"{path}={PERTURBED[path]}"]).config
    before, after = grpo_config_kwargs(base, "run"), grpo_config_kwargs(changed, "run")
    assert {k for k in before if before[k] != after[k]} == set(GRPO_CONFIG_FIELDS[path])


def test_unclipped_gradients_still_report_their_norm():
    config = compose_job([*TRL, "optim.grad_clip=null"]).config
    assert grpo_config_kwargs(config, "run")["max_grad_norm"] == math.inf  # the Trainer clips (and logs) only when > 0


def test_device_auto_follows_cuda_availability():
    config = compose_job([*TRL, "device=auto"]).config
    assert grpo_config_kwargs(config, "run", cuda_available=True)["use_cpu"] is False
    assert grpo_config_kwargs(config, "run", cuda_available=False)["use_cpu"] is True


def test_loss_config_marks_only_non_default_fields_as_set():
    loss = trl_loss_config(compose_job([*TRL, "loss=drgrpo"]).config)
    assert loss.model_fields_set == {"aggregation", "divisor", "advantage_estimator"}
    assert (loss.aggregation, loss.divisor, loss.advantage_estimator) == ("constant", 12.0, "drgrpo")


def test_launcher_page_table_lists_every_mapping():
    readme = (ROOT / "docs" / "launcher.md").read_text()
    table = readme[readme.index("### The GRPOConfig mapping"):]
    for path, fields in GRPO_CONFIG_FIELDS.items():
        row = next((line for line in table.splitlines() if line.startswith(f"| `{path}` ")), None)
        assert row is not None, path
        assert all(f"`{f}`" in row for f in fields), (path, row)
    for path in UNSUPPORTED_BY_TRL:
        assert f"`{path}`" in table, path


def test_dry_run_summary_shows_the_grpo_batch_layout():
    result = subprocess.run(
        [sys.executable, "-m", "launchers.train", *TRL, "dry_run=true"], cwd=ROOT, capture_output=True, text=True,
        timeout=120, env={**os.environ, "WORLD_SIZE": "2"},
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"DP=2 through accelerate; GRPOConfig num_generations=8 generation_batch_size=128 "
                     r"per_device_train_batch_size=32 gradient_accumulation_steps=2 steps_per_generation=2", result.stdout)


# -- the digit-sum task as text --------------------------------------------------------------------


def reward(token_text: dict[int, str], completion_ids: list[list[int]], targets: list[int]) -> list[float]:
    fn = DigitSumReward(TASK, lambda i: token_text.get(i, str(i)), eos_ids=[EOS])
    return fn(prompts=[None] * len(targets), completions=[""] * len(targets), completion_ids=completion_ids, target=targets)


def test_reward_of_an_exact_answer_is_one():
    # digits 5 + 9 + 9 = 23 then EOS: 0.75 * exp(0) + 0.25 * 1 = 1
    assert reward({}, [[5, 9, 9, EOS]], [23]) == [pytest.approx(1.0, abs=1e-15)]


def test_reward_of_a_near_miss_follows_the_toy_formula():
    # 9 + 9 = 18 for target 23: 0.75 * exp(-5 / 5) = 0.75 / e
    assert reward({}, [[9, 9, EOS]], [23]) == [pytest.approx(0.75 / math.e, rel=1e-12)]


def test_reward_without_eos_is_zero():
    assert reward({}, [[5, 9, 9]], [23]) == [0.0]


def test_reward_reads_digits_inside_tokens_and_skips_whitespace():
    # " 1", "2", " ", "34" -> digits 1, 2, 3, 4: sum 10 = target
    text = {101: " 1", 102: "2", 103: " ", 104: "34"}
    assert reward(text, [[101, 102, 103, 104, EOS]], [10]) == [pytest.approx(1.0, abs=1e-15)]


def test_reward_of_a_non_digit_token_is_zero():
    assert reward({101: "x", 102: "²"}, [[5, 101, EOS], [5, 102, EOS]], [5, 5]) == [0.0, 0.0]


def test_reward_stops_at_the_first_eos():
    assert reward({}, [[5, EOS, 9, 9]], [5]) == [pytest.approx(1.0, abs=1e-15)]


def test_prompt_dataset_draws_the_toy_tasks_targets_in_order():
    long, short = prompt_dataset(TASK, 12, str, seed=3), prompt_dataset(TASK, 4, str, seed=3)
    assert short["target"] == long["target"][:4]  # resume with a higher max_steps keeps the prompts
    assert all(TASK.target_min <= t <= TASK.target_max for t in long["target"])
    assert long["prompt"] == [str(t) for t in long["target"]]


def test_tiny_model_section_validates_head_counts():
    with pytest.raises(ValueError, match="num_key_value_heads: must divide num_attention_heads=4"):
        HFTinyModelConfig(num_key_value_heads=3)


def test_launcher_and_toy_backend_never_import_trl_or_transformers(tmp_path):
    code = f"""
import sys
import launchers.train, launchers.backends.toy.trainer, launchers.backends.hf, launchers.backends.hf.grpo_args
from launchers.config.cli_help import render_help
from launchers.config.preflight import compose_job, summary
summary(compose_job(["backend=trl", "model=hf_tiny"]))
render_help()
launchers.backends.toy.trainer.train(compose_job(["trainer.max_steps=1", "rollout.prompts_per_rollout=2",
    "rollout.n_samples_per_prompt=2", "trainer.global_batch_size=4", "trainer.micro_batch_size=4"]).config, {str(tmp_path)!r})
print(",".join(m for m in sys.modules if m.split(".")[0] in ("trl", "transformers", "datasets", "accelerate")))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1:] in ([], [""])
    assert (tmp_path / "metrics.jsonl").exists()


def launcher_page_command(heading: str) -> list[str]:
    """The launcher overrides of the first bash block after ``heading`` in docs/launcher.md."""
    readme = (ROOT / "docs" / "launcher.md").read_text()
    block = readme[readme.index(heading):].split("```bash\n", 1)[1].split("```", 1)[0]
    words = block.replace("\\\n", " ").split()
    return words[words.index("launchers.train") + 1:]


def test_launcher_page_one_gpu_qwen_command_is_valid():
    config = compose_job(launcher_page_command("### One GPU: Qwen2.5-0.5B")).config
    assert (config.backend.kind, config.model.name_or_path, config.loss.aggregation) == (
        "trl", "Qwen/Qwen2.5-0.5B-Instruct", "prompt_mean")
    assert config.device == "cuda" and config.backend.bf16


def test_launcher_page_accelerate_command_is_valid_on_its_four_processes():
    config = compose_job(launcher_page_command("### Several GPUs: accelerate"), world_size=4).config
    assert grpo_config_kwargs(config, "run", world_size=4)["gradient_accumulation_steps"] == 4


def test_several_gpus_in_one_process_point_to_accelerate():
    from launchers.backends.hf.train import several_gpus_in_one_process

    assert several_gpus_in_one_process(1) is None
    assert several_gpus_in_one_process(4).startswith(
        "device: 4 GPUs are visible to one process and TRL's GRPOTrainer does not support nn.DataParallel")
    assert "accelerate launch --multi_gpu --num_processes 4" in several_gpus_in_one_process(4)


def test_gradient_checkpointing_goes_by_the_name_the_installed_transformers_knows():
    # transformers 5.17 (seen on the GPU image) has no activation_checkpointing field; 5.24 has both names
    import dataclasses

    from launchers.backends.hf.train import for_installed_transformers

    @dataclasses.dataclass
    class Before:  # a TrainingArguments of a transformers 5 release before the rename
        gradient_checkpointing: bool = False
        bf16: bool = False

    @dataclasses.dataclass
    class After(Before):
        activation_checkpointing: bool = False

    kwargs = {"activation_checkpointing": True, "bf16": True}
    assert for_installed_transformers(kwargs, Before) == {"gradient_checkpointing": True, "bf16": True}
    assert for_installed_transformers(kwargs, After) == kwargs
