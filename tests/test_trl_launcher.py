"""``python -m launchers.train backend=trl``: short RLLossGRPOTrainer runs on the tiny Hugging Face model.

Each run is 2-4 optimizer steps of a 2-layer Qwen2 (hidden size 32) on 8 completions per step, on
the CPU. The run folder contract is the toy backend's (docs/launcher.md).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from launchers.config.preflight import compose_job
from tests.forked_launch import ForkedRun

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted(p.stem for p in (ROOT / "conf" / "loss").glob("*.yaml"))
SMALL = [
    "backend=trl",
    "model=hf_tiny",
    "rollout.prompts_per_rollout=2",
    "rollout.n_samples_per_prompt=4",
    "rollout.max_response_len=8",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=4",  # two micro-batches per step: gradient accumulation is exercised
    "progress=log",
]
REQUIRED_KEYS = {
    "step", "reward_mean", "response_length_mean", "pg_loss", "pg_clipfrac", "ppo_kl", "entropy", "grad_norm",
    "loss_scale_vs_token_mean", "tokens", "aggregation",
}
TIMING_KEYS = {"step_seconds"}
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
FORK_OFFLINE = {"HF_HUB_OFFLINE": "1"}

pytestmark = pytest.mark.slow


def train_in_process(run_dir: Path, *overrides: str) -> list[dict]:
    from launchers.backends.hf.train import train

    train(compose_job([*SMALL, *overrides]).config, run_dir)
    return read_metrics(run_dir)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def test_presets_are_enumerated_from_the_folder():
    assert {"grpo", "dapo", "drgrpo", "scalerl"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_two_step_run_per_preset_writes_every_metric(tmp_path, preset):
    config = compose_job([*SMALL, f"loss={preset}"]).config
    records = train_in_process(tmp_path, f"loss={preset}", "trainer.max_steps=2")
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert record.keys() >= REQUIRED_KEYS, record
        assert record["aggregation"] == config.loss.aggregation
        assert all(v == v and abs(v) != float("inf") for v in record.values() if isinstance(v, float)), record
        assert record["response_length_mean"] == record["tokens"] / 8
        # sum of the step's token weights: 1 for sample_mean (N samples of weight-sum 1/N), prompt_mean
        # (P groups of 1/P) and token_mean (T tokens of 1/T); T / (N L) for constant (no sample is empty:
        # every completion holds at least its first token)
        expected = record["tokens"] / (8 * config.loss.divisor) if config.loss.aggregation == "constant" else 1.0
        assert record["loss_scale_vs_token_mean"] == pytest.approx(expected, rel=1e-9)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists()  # the final step's checkpoint


def test_drgrpo_with_the_deepswe_divisor_from_the_command_line(tmp_path):
    # the command of the issue, as typed (default sizes: 16 prompts x 8 samples, steps of 128), in a known folder
    # (forked from the test process: the same launchers.train entry, tests/forked_launch.py)
    run = ForkedRun(["backend=trl", "model=hf_tiny", "loss=drgrpo", "loss.divisor=40960", "trainer.max_steps=4",
                     f"hydra.run.dir={tmp_path / 'run'}", "progress=log"], 1, tmp_path / "logs", env=FORK_OFFLINE)
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output[-3000:]
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {r["aggregation"] for r in records} == {"constant"}
    for record in records:  # weight 1 / (N L) per token: sum w = T / (128 * 40960)
        assert record["loss_scale_vs_token_mean"] == pytest.approx(record["tokens"] / (128 * 40960), rel=1e-9)


def test_resume_continues_bit_identically(tmp_path):
    steps = ["trainer.save_every=2"]
    straight = train_in_process(tmp_path / "straight", "trainer.max_steps=4", *steps)
    train_in_process(tmp_path / "split", "trainer.max_steps=2", *steps)
    resumed = train_in_process(tmp_path / "split", "trainer.max_steps=4", "resume=true", *steps)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert without_timing(resumed) == without_timing(straight)


def test_several_steps_per_rollout_share_its_reward(tmp_path):
    records = train_in_process(tmp_path, "loss=dapo", "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
                               "trainer.max_steps=4", "trainer.save_every=2")
    assert [r["rollout"] for r in records] == [0, 0, 1, 1]
    assert records[0]["reward_mean"] == records[1]["reward_mean"]
    assert records[0]["tokens"] + records[1]["tokens"] > 0


def save_tiny_model(folder: Path, chat_template: str | None = None) -> Path:
    from launchers.backends.hf.models import tiny_model
    from launchers.backends.toy.task import DigitSumTask
    from launchers.config.backends import HFTinyModelConfig

    policy = tiny_model(HFTinyModelConfig(), DigitSumTask(), seed=0)
    if chat_template is not None:
        policy.tokenizer.chat_template = chat_template
    policy.model.save_pretrained(folder)
    policy.tokenizer.save_pretrained(folder)
    return folder


def test_pretrained_model_loads_from_a_local_folder(tmp_path):
    folder = save_tiny_model(tmp_path / "model")
    overrides = ["model=hf", f"model.name_or_path={folder}", "model.chat_template=false", "trainer.max_steps=2"]
    overrides = [o for o in [*SMALL, *overrides] if o != "model=hf_tiny"]
    from launchers.backends.hf.train import train

    train(compose_job(overrides).config, tmp_path / "run")
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]


def test_pretrained_model_with_a_chat_template_gets_chat_prompts(tmp_path):
    from launchers.backends.hf.models import pretrained_model
    from launchers.backends.hf.task import chat_prompt
    from launchers.backends.toy.task import DigitSumTask
    from launchers.config.backends import HFModelConfig

    folder = save_tiny_model(tmp_path, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    policy = pretrained_model(HFModelConfig(name_or_path=str(folder)), DigitSumTask(), seed=0)
    assert policy.prompt_fn is chat_prompt


def train_exit(capsys, tmp_path: Path, *overrides: str) -> tuple[int, str]:
    """Exit code and stderr of a run that stops with SystemExit."""
    from launchers.backends.hf.train import train

    with pytest.raises(SystemExit) as stopped:
        train(compose_job(list(overrides)).config, tmp_path / "run")
    err = capsys.readouterr().err
    return stopped.value.code, err[err.find("Invalid configuration:"):]  # after transformers' progress bars


def test_pretrained_model_without_chat_template_is_one_line(tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "model")
    code, err = train_exit(capsys, tmp_path, "backend=trl", "model=hf", f"model.name_or_path={folder}")
    assert code == 2
    assert err.splitlines() == [
        "Invalid configuration:",
        f"  model.chat_template: the tokenizer of '{folder}' has no chat template (got true); "
        "set model.chat_template=false to prompt it with plain text",
    ]


def test_missing_pretrained_model_is_one_line(tmp_path, capsys):
    code, err = train_exit(capsys, tmp_path, "backend=trl", "model=hf", f"model.name_or_path={tmp_path / 'nothing'}")
    assert code == 2
    assert err.splitlines()[0] == "Invalid configuration:"
    assert err.splitlines()[1].startswith(f"  model.name_or_path: cannot load '{tmp_path / 'nothing'}' (")
    assert len(err.splitlines()) == 2


def preflight_exit(capsys, *argv: str) -> tuple[int, str, str]:
    from launchers.config.preflight import preflight

    with pytest.raises(SystemExit) as stopped:
        preflight(list(argv))
    captured = capsys.readouterr()
    return stopped.value.code, captured.out, captured.err


def test_sweep_over_backend_and_model_is_validated_job_by_job(capsys):
    code, _, err = preflight_exit(capsys, "-m", "backend=toy,trl", "model=toy,hf_tiny", "dry_run=true")
    assert code == 2
    assert err.splitlines()[1:] == [
        "  job 1 (backend=toy model=hf_tiny dry_run=True): model: backend=toy trains model=toy (got model=hf_tiny); "
        "use model=toy, or backend=trl for model=hf_tiny",
        "  job 2 (backend=trl model=toy dry_run=True): model: backend=trl trains model=hf_tiny or model=hf "
        "(got model=toy); use model=hf_tiny or model=hf, or backend=toy for model=toy",
    ]


def test_sweep_of_presets_on_trl_dry_runs(capsys):
    code, out, err = preflight_exit(capsys, "-m", "backend=trl", "model=hf_tiny", f"loss={','.join(PRESETS)}",
                                    "dry_run=true")
    assert code == 0, err
    assert f"dry run: {len(PRESETS)} job(s) valid, nothing started" in out
    assert out.count("): backend=trl model=hf_tiny aggregation=") == len(PRESETS)


def test_sweep_runs_trl_jobs_one_after_another(tmp_path, monkeypatch):
    from launchers.train import main

    monkeypatch.setattr(sys, "argv", [sys.argv[0]])  # main() hands its argv to Hydra through sys.argv
    main(["-m", *SMALL, "loss=grpo,scalerl", "trainer.max_steps=2", f"hydra.sweep.dir={tmp_path}"])
    aggregations = sorted(read_metrics(job)[-1]["aggregation"] for job in tmp_path.iterdir() if job.is_dir())
    assert aggregations == ["prompt_mean", "sample_mean"]


def test_ctrl_c_writes_a_checkpoint_before_exiting(tmp_path):
    # forked from the test process (tests/forked_launch.py); tests/test_trl_run_safety.py signals a `python -m` run
    run_dir = tmp_path / "run"
    proc = ForkedRun([*SMALL, "trainer.max_steps=500", "trainer.save_every=500", f"hydra.run.dir={run_dir}"], 1,
                     tmp_path / "logs", env=FORK_OFFLINE)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 130, output[-3000:]
    last = read_metrics(run_dir)[-1]["step"]
    assert (run_dir / "checkpoints" / f"checkpoint-{last}" / "trainer_state.json").exists(), output[-3000:]
    assert "resume=true" in output


def test_data_parallel_run_uses_the_world_size(tmp_path):
    # accelerate launch --multi_gpu starts its processes with torchrun; here two ranks forked from the test
    # process with torchrun's environment (tests/forked_launch.py; tests/test_trl_integration.py runs torchrun)
    run = ForkedRun([*SMALL, "trainer.micro_batch_size=2", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"],
                    2, tmp_path / "logs", env=FORK_OFFLINE)
    output, _ = run.communicate(timeout=600)
    assert [code for code, _ in run.results()] == [0, 0], [log[-3000:] for _, log in run.results()]
    assert "world=2 (DP through accelerate)" in output
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]  # written once, by the first process
    assert all(r["response_length_mean"] == r["tokens"] / 8 for r in records)  # both processes' samples


def test_world_size_from_the_environment_enters_the_batch_rules(capsys, monkeypatch):
    # torchrun (and so accelerate launch) exports WORLD_SIZE to every process it starts
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = preflight_exit(capsys, *SMALL, "trainer.micro_batch_size=8")
    assert code == 2
    assert "trainer.micro_batch_size: a step of 8 samples over 2 DP rank(s)" in err
