"""A user's path (docs/integrations/hydra.md): build the wheel, install it into a fresh venv, use the presets from a new Hydra app.

The fresh virtual environment gets rl-loss only from the wheel (``pip install --no-deps``); its
dependencies (torch, hydra-core, pydantic, ...) are the test environment's, reached through a plain
path entry that does not run that environment's ``.pth`` files, so the development (editable) install
of rl-loss stays invisible. Every test checks where rl-loss was imported from.
"""

from __future__ import annotations

import email.message
import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

APP = '''\
import json, sys
import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    factory = hydra.utils.instantiate(cfg.loss)
    import hydra_plugins.rl_loss_searchpath, rl_loss, rl_loss_conf
    print(json.dumps({
        "aggregation": factory.aggregation,
        "divisor": factory.config.divisor,
        "files": [rl_loss.__file__, rl_loss_conf.__file__, hydra_plugins.rl_loss_searchpath.__file__],
        "editable": sorted(m for m in sys.modules if "editable" in m),
    }))


if __name__ == "__main__":
    main()
'''

# The app's own config: its own loss group choice (a preset of rl-loss) and its own settings.
APP_CONFIG = "defaults:\n  - loss: grpo\n  - _self_\n\nlr: 0.001\n"
# A second primary config without a loss group: presets are added with +loss=...
APP_BARE_CONFIG = "lr: 0.001\n"


def repository_files() -> list[str]:
    """Files a fresh clone would have (tracked, plus new files not ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the repository's files (no stale build folder, nothing ignored)."""
    source = tmp_path_factory.mktemp("source")
    for name in repository_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True, capture_output=True,
    )
    (built,) = out.glob("rl_loss-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    """A new venv with rl-loss installed from the wheel; dependencies reached through a plain path entry."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, with_pip=False, symlinks=True)
    python = env_dir / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    # A path line, not `import site; site.addsitedir(...)`: the test environment's .pth files (the
    # editable install's import hook among them) are not run, so only the wheel provides rl-loss.
    # Every site-packages folder of the test environment: a venv layered on another (a .pth path line to
    # the base venv's site-packages) reaches the base's packages too.
    dependencies = [sysconfig.get_path("purelib"), *(p for p in sys.path if p.endswith("site-packages"))]
    (site / "zz_test_dependencies.pth").write_text("".join(f"{p}\n" for p in dict.fromkeys(dependencies)))
    probe = "import importlib.util as u; print([n for n in ('rl_loss', 'rl_loss_conf', 'hydra', 'pydantic') if u.find_spec(n)])"
    assert run([python, "-c", probe], cwd=env_dir).stdout.strip() == "['hydra', 'pydantic']"  # no rl-loss before the wheel
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True, capture_output=True,
    )
    return env_dir


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Path:
    """A Hydra app written from scratch in a folder outside the repository."""
    folder = tmp_path_factory.mktemp("app")
    assert ROOT not in folder.parents
    (folder / "conf").mkdir()
    (folder / "app.py").write_text(APP)
    (folder / "conf" / "config.yaml").write_text(APP_CONFIG)
    (folder / "conf" / "bare.yaml").write_text(APP_BARE_CONFIG)
    return folder


def run(argv, cwd=None, check=True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, check=check)


def run_app(fresh_venv, app, *args, check=True) -> subprocess.CompletedProcess:
    return run([fresh_venv / "bin" / "python", app / "app.py", *args], cwd=app, check=check)


def job_results(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def assert_from_wheel(result: dict, fresh_venv: Path) -> None:
    for path in result["files"]:
        assert Path(path).is_relative_to(fresh_venv), f"{path} is not the wheel's install in {fresh_venv}"
    assert result["editable"] == []


def test_wheel_ships_every_package_file_and_every_loss_preset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    files = repository_files()
    python_files = [f for f in files if f.endswith(".py") and f.split("/")[0] in ("rl_loss", "launchers", "hydra_plugins")]
    missing = sorted(f for f in python_files if f not in names)
    assert not missing, f"not in the wheel (add their package to [tool.setuptools] packages in pyproject.toml): {missing}"
    presets = [f for f in files if f.startswith("conf/loss/") and f.endswith(".yaml")]
    assert len(presets) >= 4
    assert {f"rl_loss_conf/loss/{Path(f).name}" for f in presets} <= names
    assert "hydra_plugins/__init__.py" not in names  # it would shadow every other package's plugins
    assert "hydra_plugins/rl_loss_searchpath/__init__.py" in names


def test_wheel_installs_no_benchmarks_package(wheel):
    # benchmarks run from the checkout (python -m benchmarks.x); a top-level `benchmarks` in site-packages
    # would shadow any other project's
    assert [n for n in zipfile.ZipFile(wheel).namelist() if n.split("/")[0] == "benchmarks"] == []


def wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(zf.read(name).decode())


def requirement_names(lines: list[str]) -> dict[str | None, set[str]]:
    """Extra (None: the library itself) -> the distribution names it requires, from Requires-Dist lines."""
    by_extra: dict[str | None, set[str]] = {}
    for line in lines:
        requirement, _, marker = line.partition(";")
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        name = re.match(r"[A-Za-z0-9_.-]+", requirement.strip()).group(0).lower().replace("_", "-")
        by_extra.setdefault(extra.group(1) if extra else None, set()).add(name)
    return by_extra


def test_wheel_requires_only_the_library_dependencies_and_offers_the_extras(wheel):
    metadata = wheel_metadata(wheel)
    requires = requirement_names(metadata.get_all("Requires-Dist"))
    assert requires[None] == {"torch", "pydantic", "hydra-core", "omegaconf", "typing-extensions"}
    assert {"launcher", "megatron", "trl", "liger", "all", "dev"} <= set(metadata.get_all("Provides-Extra"))
    assert requires["launcher"] == {"tensorboard", "tqdm", "matplotlib", "megatron-core",
                                    "hydra-joblib-launcher", "hydra-submitit-launcher"}
    assert requires["megatron"] == {"megatron-core"}
    assert requires["trl"] >= {"trl", "transformers"}
    assert requires["liger"] == {"liger-kernel"}
    # [all] is the other extras by name; [dev] pulls [all] and the test tools, xdist among them
    all_line = next(line for line in metadata.get_all("Requires-Dist") if re.search(r"""extra\s*==\s*["']all["']""", line))
    assert set(re.search(r"\[([^\]]+)\]", all_line).group(1).split(",")) >= {"launcher", "megatron", "trl", "liger"}
    assert {"rl-loss", "pytest", "pytest-xdist", "hypothesis"} <= requires["dev"]


def test_app_composes_drgrpo_with_a_divisor_from_the_wheel(fresh_venv, app):
    (result,) = job_results(run_app(fresh_venv, app, "loss=drgrpo", "loss.divisor=40960").stdout)
    assert (result["aggregation"], result["divisor"]) == ("constant", 40960)
    assert_from_wheel(result, fresh_venv)


def test_app_without_a_rollout_gets_drgrpos_documented_budget(fresh_venv, app):
    # the app has no rollout.max_response_len: 512, trl 1.16 GRPOConfig.max_completion_length (docs/configuration.md)
    (result,) = job_results(run_app(fresh_venv, app, "loss=drgrpo").stdout)
    assert (result["aggregation"], result["divisor"]) == ("constant", 512)


def test_app_without_a_divisor_fails_with_one_line_naming_loss_divisor(fresh_venv, app):
    failed = run_app(fresh_venv, app, "loss=drgrpo", "loss.divisor=null", check=False)
    assert failed.returncode != 0
    assert "loss.divisor: must be a finite number > 0 when aggregation=constant (got None)" in failed.stderr
    assert "Interpolation" not in failed.stderr and "Traceback" not in failed.stderr


def test_app_without_a_loss_group_adds_a_preset(fresh_venv, app):
    (result,) = job_results(run_app(fresh_venv, app, "--config-name", "bare", "+loss=grpo").stdout)
    assert result["aggregation"] == "sample_mean"
    assert_from_wheel(result, fresh_venv)


def test_app_sweeps_every_preset(fresh_venv, app):
    # the own-app sweep of docs/integrations/hydra.md, over every shipped preset: each job exits 0
    presets = sorted(p.stem for p in (ROOT / "conf" / "loss").glob("*.yaml"))
    results = job_results(run_app(fresh_venv, app, "-m", "loss=" + ",".join(presets), "hydra.sweep.dir=multirun").stdout)
    expected = [yaml.safe_load((ROOT / "conf" / "loss" / f"{p}.yaml").read_text()).get("aggregation", "sample_mean")
                for p in presets]
    assert [r["aggregation"] for r in results] == expected


def test_app_search_path_lists_rl_loss(fresh_venv, app):
    table = run_app(fresh_venv, app, "--info", "searchpath").stdout
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table.splitlines() if "|" in line]
    assert ["rl-loss", "pkg://rl_loss_conf"] in rows, table


def test_console_script_from_the_wheel_validates(fresh_venv, app):
    script = fresh_venv / "bin" / "rl-loss-validate"
    ok = run([script, "loss=drgrpo", "loss.divisor=40960"], cwd=app)
    assert ok.stdout.strip() == "loss=drgrpo loss.divisor=40960: ok (aggregation=constant, divisor=40960)"
    bad = run([script, "loss=drgrpo", "loss.divisor=-1"], cwd=app, check=False)
    assert bad.returncode == 2
    assert bad.stderr.startswith("loss.divisor=-1: loss.divisor: must be a finite number > 0")
