"""Schema checks: every combination of group options composes and validates; the JSON Schema is fresh."""

from __future__ import annotations

import itertools

import hydra
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from launchers.config.cli_help import group_options
from launchers.config.conf_store import register_configs, section_options
from launchers.config.preflight import CONFIG_DIR, compose_job
from launchers.config.schema import SCHEMA_PATH, render_schema
from rl_loss import ReducerFactory

REQUIRED_BY_OPTION = {"model=hf": ["model.name_or_path=org/some-model"]}  # validation loads nothing


def all_group_combinations() -> list[list[str]]:
    """Every combination of group options that a backend can train (backend=toy only trains model=toy)."""
    groups = {g: opts for g, opts in group_options().items() if not g.startswith("hydra/")}
    assert "loss" in groups and groups["loss"], "Hydra lists no loss presets"
    keys = sorted(groups)
    combos = []
    for combo in itertools.product(*(groups[k] for k in keys)):
        chosen = dict(zip(keys, combo, strict=True))
        if chosen["model"] not in section_options("backend")[chosen["backend"]].model_kinds:
            continue
        overrides = [f"{k}={v}" for k, v in chosen.items()]
        combos.append(overrides + [x for o in overrides for x in REQUIRED_BY_OPTION.get(o, [])])
    return combos


def test_group_combinations_cover_both_backends_and_every_model():
    combos = [" ".join(c) for c in all_group_combinations()]
    for option in ("backend=toy", "backend=trl", "model=toy", "model=hf_tiny", "model=hf"):
        assert any(option in c.split() for c in combos), option


def test_hydra_lists_the_loss_presets():
    assert set(group_options()["loss"]) >= {"grpo", "dapo", "drgrpo", "scalerl", "gspo", "cispo", "sapo"}


@pytest.mark.parametrize("overrides", all_group_combinations(), ids=lambda o: " ".join(o))
def test_every_group_combination_validates(overrides):
    job = compose_job(overrides)
    assert job.config.loss.aggregation in ("sample_mean", "token_mean", "constant", "prompt_mean")


@pytest.mark.parametrize(
    ("preset", "aggregation"),
    [("grpo", "sample_mean"), ("dapo", "token_mean"), ("drgrpo", "constant"), ("scalerl", "prompt_mean"),
     ("gspo", "sample_mean"), ("cispo", "token_mean"), ("sapo", "sample_mean")],
)
def test_instantiate_loss_group_returns_factory(preset, aggregation):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=[f"loss={preset}"])
    factory = hydra.utils.instantiate(cfg.loss)
    assert isinstance(factory, ReducerFactory)
    assert factory.aggregation == aggregation


def test_instantiate_rejects_invalid_loss_group():
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=["loss=drgrpo", "loss.divisor=-2"])
    with pytest.raises(Exception, match="divisor"):
        hydra.utils.instantiate(cfg.loss)


def test_drgrpo_divisor_defaults_to_max_response_len():
    job = compose_job(["loss=drgrpo", "rollout.max_response_len=10"])
    assert job.config.loss.divisor == 10


def test_drgrpo_divisor_override():
    job = compose_job(["loss=drgrpo", "loss.divisor=40960"])
    assert job.config.loss.divisor == 40960
    assert job.config.loss.advantage_estimator == "drgrpo"


def test_dapo_sets_clip_higher():
    loss = compose_job(["loss=dapo"]).config.loss
    assert (loss.clip_low, loss.clip_high) == (0.2, 0.28)


@pytest.mark.parametrize("launcher", ["joblib", "submitit_slurm", "submitit_local"])
def test_sweep_launcher_configs_compose(launcher):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert launcher.split("_")[0] in OmegaConf.to_container(cfg.hydra.launcher)["_target_"].lower()


def test_committed_json_schema_is_fresh():
    assert SCHEMA_PATH.read_text() == render_schema(), (
        "conf/schema.json is stale: regenerate it with `make schema` (python -m launchers.config.schema --write)"
    )
