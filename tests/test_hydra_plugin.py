"""The Hydra plugin puts the loss presets on every Hydra app's search path (docs/integrations/hydra.md), without torch.

These tests use the development install; ``tests/test_wheel.py`` repeats the user's path from a built
wheel in a fresh virtual environment.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import yaml
from hydra import compose, initialize
from hydra.core.global_hydra import GlobalHydra
from hydra.core.plugins import Plugins
from hydra.errors import InstantiationException
from hydra.plugins.search_path_plugin import SearchPathPlugin

from hydra_plugins.rl_loss_searchpath import PROVIDER, SEARCH_PATH, RLLossSearchPathPlugin
from hydra_plugins.rl_loss_searchpath.loss_base import LOSS_BASE
from launchers.config.schema import LOSS_BASE_PATH, REGENERATE, render_loss_base
from rl_loss import ConfigError, LossConfig, ReducerFactory

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted(p.stem for p in (ROOT / "conf" / "loss").glob("*.yaml"))
DIVISOR_LINE = (
    "loss.divisor: must be a finite number > 0 when aggregation=constant (got None); "
    "set it to the generation budget, e.g. the rollout's max response length"
)


def compose_loss(*overrides: str):
    """Compose like a Hydra app with no config of its own: only the plugin provides the loss group."""
    GlobalHydra.instance().clear()
    with initialize(config_path=None, version_base=None):
        return compose(overrides=list(overrides))


def test_plugin_loss_base_is_loss_config_defaults():
    assert LossConfig().model_dump(mode="json", by_alias=True) == LOSS_BASE, (
        f"{LOSS_BASE_PATH.relative_to(ROOT)} differs from LossConfig's defaults: regenerate it with {REGENERATE}"
    )
    assert LOSS_BASE_PATH.read_text() == render_loss_base(), (
        f"{LOSS_BASE_PATH.relative_to(ROOT)} is stale: regenerate it with {REGENERATE}"
    )


def test_hydra_discovers_the_plugin():
    # Hydra's scanner executes the module again, so compare names rather than class objects
    discovered = {f"{c.__module__}.{c.__qualname__}" for c in Plugins.instance().discover(SearchPathPlugin)}
    assert f"{RLLossSearchPathPlugin.__module__}.{RLLossSearchPathPlugin.__qualname__}" in discovered


def test_hydra_plugins_namespace_has_no_init_file():
    # an __init__.py there would shadow every other package's Hydra plugins
    assert not (ROOT / "hydra_plugins" / "__init__.py").exists()


def test_search_path_lists_rl_loss():
    GlobalHydra.instance().clear()
    with initialize(config_path=None, version_base=None):
        entries = GlobalHydra.instance().config_loader().get_sources()
        assert (PROVIDER, SEARCH_PATH) in [(s.provider, f"{s.scheme()}://{s.path}") for s in entries]


def test_every_preset_file_is_an_option_of_the_loss_group():
    GlobalHydra.instance().clear()
    with initialize(config_path=None, version_base=None):
        options = GlobalHydra.instance().config_loader().get_group_options("loss")
    assert set(PRESETS) >= {"grpo", "dapo", "drgrpo", "scalerl"}
    assert set(options) == {*PRESETS, "base"}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_instantiates_a_factory_in_a_foreign_app(preset):
    cfg = compose_loss(f"+loss={preset}")  # nothing else defined: every preset stands alone
    factory = hydra.utils.instantiate(cfg.loss)
    assert isinstance(factory, ReducerFactory)
    aggregation = yaml.safe_load((ROOT / "conf" / "loss" / f"{preset}.yaml").read_text()).get("aggregation")
    assert factory.aggregation == (aggregation or factory.aggregation)  # a preset may inherit it


def test_drgrpo_with_a_divisor_is_constant_in_a_foreign_app():
    factory = hydra.utils.instantiate(compose_loss("+loss=drgrpo", "loss.divisor=40960").loss)
    assert (factory.aggregation, factory.config.divisor, factory.config.advantage_estimator) == (
        "constant",
        40960,
        "drgrpo",
    )


def test_drgrpo_in_an_app_without_a_rollout_divides_by_trls_default_budget():
    # no rollout.max_response_len: the preset's documented fallback, trl 1.16 GRPOConfig.max_completion_length
    factory = hydra.utils.instantiate(compose_loss("+loss=drgrpo").loss)
    assert (factory.aggregation, factory.config.divisor) == ("constant", 512)


def test_drgrpo_without_a_divisor_fails_with_one_line_naming_loss_divisor():
    cfg = compose_loss("+loss=drgrpo", "loss.divisor=null")
    assert cfg.loss.divisor is None
    with pytest.raises(InstantiationException) as err:
        hydra.utils.instantiate(cfg.loss)
    cause = err.value.__cause__
    assert isinstance(cause, ConfigError) and isinstance(cause, ValueError)
    assert str(cause) == DIVISOR_LINE
    assert "Interpolation" not in str(err.value)


def test_drgrpo_divisor_follows_the_apps_rollout_section():
    cfg = compose_loss("+loss=drgrpo", "+rollout.max_response_len=777")
    assert hydra.utils.instantiate(cfg.loss).config.divisor == 777


def test_build_reducer_factory_error_has_one_line_per_problem():
    cfg = compose_loss("+loss=dapo", "loss.eps_clip=2", "+loss.divisr=3")
    with pytest.raises(InstantiationException) as err:
        hydra.utils.instantiate(cfg.loss)
    assert err.value.__cause__.problems == [
        "loss.eps_clip: input should be less than 1 (got 2)",
        "loss.divisr: unknown key; did you mean 'loss.divisor'? (got 3)",
    ]


def test_importing_the_plugin_and_composing_a_preset_loads_no_torch():
    code = (
        "import sys\n"
        "import hydra_plugins.rl_loss_searchpath\n"
        "from hydra import compose, initialize\n"
        "with initialize(config_path=None, version_base=None):\n"
        "    cfg = compose(overrides=['+loss=dapo'])\n"
        "assert cfg.loss.aggregation == 'token_mean'\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'rl_loss', 'launchers'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert result.stdout.strip() == ""
