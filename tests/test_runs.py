"""Runs you can trust, through the real CLI: nothing overwritten by accident, damaged checkpoints skipped,
a graceful stop that keeps the work, input errors before any weights load, metrics that mean what they
say. Each test checks the exact state before and after (files, checkpoint steps, exit status, message)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowrl import commands
from flowrl.checkpoint import (
    COMPLETE_MARKER,
    MODEL_DIR,
    STATE_FILE,
    CheckpointCorruptError,
    list_checkpoints,
    resolve_checkpoint,
    verify_checkpoint,
)
from flowrl.data import synthetic
from flowrl.data.schema import write_rows
from flowrl.logging import format_step_line, read_metrics
from tests.conftest import trainer_overrides, write_config

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = commands.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def steps(run: Path) -> list[int]:
    return [int(r["step"]) for r in read_metrics(run / "metrics.jsonl")]


def checkpoint_steps(run: Path) -> list[int]:
    return [int(p.name.split("_")[1]) for p in list_checkpoints(run / "checkpoints")]


@pytest.fixture
def finished_run(model_dir: Path, data_file: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A finished 3-step run with a checkpoint after every step (the 2 newest kept)."""
    run = tmp_path / "run"
    items = trainer_overrides(
        model_dir, data_file, run, **{"train.total_steps": 3, "train.save_every": 1, "train.sample_every": 0}
    )
    config = write_config(tmp_path / "run.yaml", items)
    assert commands.main(["train", str(config)]) == 0
    return run, config


def test_rerun_into_a_finished_run_is_refused_and_changes_nothing(
    finished_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run, config = finished_run
    capsys.readouterr()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, out, err = run_cli(["train", str(config), "train.total_steps=1"], capsys)
    assert code == 2
    assert "already holds a run (3 steps in metrics.jsonl; checkpoints up to step_000003)" in err
    assert "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # not one byte changed


def test_overwrite_replaces_the_run(
    finished_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run, config = finished_run
    (run / "notes.txt").write_text("mine")  # not a run file: kept
    code, out, _ = run_cli(["train", str(config), "train.total_steps=1", "--overwrite"], capsys)
    assert code == 0
    assert "--overwrite: removed" in out
    assert steps(run) == [1] and checkpoint_steps(run) == [1]
    assert (run / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit) as exit_info:
        commands.main(["train", str(config), "--overwrite", "--resume"])
    assert exit_info.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_damaged_checkpoints_are_skipped_by_resume_export_and_eval(
    finished_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, config = finished_run
    newest = run / "checkpoints" / "step_000003"
    assert not verify_checkpoint(newest)
    weights = next((newest / MODEL_DIR).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # what a full disk leaves
    assert any(str(weights) in p for p in verify_checkpoint(newest))

    # export and eval's resolution take the newest intact checkpoint, naming the damaged file
    code, _, err = run_cli(["export", str(run), str(tmp_path / "exported")], capsys)
    assert code == 0, err
    assert "skipping damaged checkpoint" in err and str(weights) in err and "step_000002" in err
    assert resolve_checkpoint(run).name == "step_000002"
    with pytest.raises(CheckpointCorruptError, match="intact checkpoints beside it"):
        resolve_checkpoint(newest)  # asked for by name: an error, with the way out

    # resume falls back to step 2 and redoes step 3; the metrics keep one line per step
    code, out, err = run_cli(["train", str(config), "train.total_steps=4", "--resume"], capsys)
    assert code == 0, err
    assert "resumed from" in out and "step_000002 at step 2" in out and str(weights) in err
    assert steps(run) == [1, 2, 3, 4] and checkpoint_steps(run) == [3, 4]

    # a truncated trainer state in every checkpoint: one line naming the files, exit 2
    for ckpt in list_checkpoints(run / "checkpoints"):
        state = ckpt / STATE_FILE
        state.write_bytes(state.read_bytes()[:50])
    code, _, err = run_cli(["train", str(config), "train.total_steps=5", "--resume"], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.count(STATE_FILE) == 2 and "no intact checkpoint is left" in err
    code, _, err = run_cli(["export", str(run), str(tmp_path / "again")], capsys)
    assert code == 2 and "no intact checkpoint is left" in err


def test_checkpoint_manifest_lists_every_file_with_size_and_checksum(finished_run: tuple[Path, Path]) -> None:
    run, _ = finished_run
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    manifest = json.loads((ckpt / COMPLETE_MARKER).read_text())
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {COMPLETE_MARKER}
    assert set(manifest["files"]) == on_disk and manifest["step"] == 3
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in manifest["files"].values())
    state = ckpt / STATE_FILE  # same size, one byte flipped: only the checksum can tell
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    assert verify_checkpoint(ckpt) == [f"{state} does not match its saved checksum"]


def test_bad_input_fails_before_loading_and_leaves_nothing(
    model_dir: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"

    def attempt(**extra: object) -> str:
        config = write_config(tmp_path / "bad.yaml", trainer_overrides(model_dir, data_file, run, **extra))
        code, _, err = run_cli(["train", str(config)], capsys)
        assert code == 2, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not run.exists()  # nothing left behind
        return err

    assert "data file" in attempt(**{"data.train_files": f"[{tmp_path / 'missing.jsonl'}]"})
    assert "cannot import module 'no_such_module'" in attempt(**{"reward.function": "no_such_module:score"})
    rows = synthetic.rows()
    for row in rows[:3]:
        row["data_source"] = "my_puzzles"
    mixed = write_rows(rows, tmp_path / "mixed.jsonl")
    err = attempt(**{"data.train_files": f"[{mixed}]", "reward.function": "null"})
    assert "'my_puzzles' (3 rows" in err and "reward.function=module:function" in err
    assert "model.path" in attempt(**{"model.path": tmp_path / "no_model"})
    config = write_config(tmp_path / "bad.yaml", trainer_overrides(model_dir, data_file, run))
    with pytest.raises(ValueError, match="cannot import"):  # --debug shows the real exception
        commands.main(["train", str(config), "reward.function=no_such_module:score", "--debug"])


def test_reward_module_in_the_current_directory_imports(
    model_dir: Path, data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "myreward_cwd.py").write_text(
        "def score(response, example):\n    return float(sum(c.isdigit() for c in response))\n"
    )
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(work))])
    items = trainer_overrides(
        model_dir,
        data_file,
        tmp_path / "run",
        **{"reward.function": "myreward_cwd:score", "train.total_steps": 1},
    )
    assert commands.main(["train", str(write_config(tmp_path / "c.yaml", items))]) == 0


def test_failed_rewards_are_counted_by_reason(
    model_dir: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    extra = {"reward.function": "tests.helpers.flaky_rewards:nan_on_odd_ground_truth", "train.total_steps": 1}
    config = write_config(tmp_path / "c.yaml", trainer_overrides(model_dir, data_file, run, **extra))
    code, out, _ = run_cli(["train", str(config)], capsys)
    assert code == 0
    failures = [json.loads(line) for line in (run / "reward_failures.jsonl").read_text().splitlines()]
    failed = read_metrics(run / "metrics.jsonl")[0]["reward/failed"]
    assert failed > 0 and sum(f["count"] for f in failures) == failed
    assert all(f["step"] == 1 and f["status"] == "error" and "non-finite" in f["reason"] for f in failures)
    assert f"{int(failed)} rewards failed" in out


def test_metrics_tell_the_truth(
    model_dir: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = synthetic.rows()
    for row in rows[::2]:
        row["data_source"] = "math_dapo"  # two sources: per-source metrics
    data = write_rows(rows, tmp_path / "two.jsonl")
    base = {
        "data.train_files": f"[{data}]",
        "reward.function": "tests.helpers.flaky_rewards:slow_digit_share",
    }
    config = write_config(tmp_path / "f.yaml", trainer_overrides(model_dir, data, tmp_path / "f", **base))
    assert commands.main(["train", str(config)]) == 0
    for row in read_metrics(tmp_path / "f" / "metrics.jsonl"):
        assert row["actor/ref_kl"] >= 0 and row["flowrl/log_z_grad_norm"] > 0
        assert row["reward/min"] <= row["reward/mean"] <= row["reward/max"]
        assert 0 <= row["reward/accuracy"] <= 1
        assert {"reward/by_source/math_dapo/mean", "reward/by_source/synthetic_digit_sum/accuracy"} <= set(
            row
        )
        assert "loss" not in row and "reward/advantage_mean" not in row and row["actor/advantage_abs"] > 0

    grpo = trainer_overrides(model_dir, data_file, tmp_path / "g", **{"algorithm.name": "grpo"})
    assert commands.main(["train", str(write_config(tmp_path / "g.yaml", grpo))]) == 0
    for row in read_metrics(tmp_path / "g" / "metrics.jsonl"):
        assert not any("ref_kl" in k or "log_z" in k for k in row), "no reference, no head: not logged"
    capsys.readouterr()


def test_step_line_keeps_small_times_and_gives_the_eta() -> None:
    line = format_step_line(3, 10, {"reward/mean": 0.5, "perf/step_time_s": 0.0412}, eta_s=754.0)
    assert line == "step 3/10 | reward 0.5 | 0.0412s | eta 12m34s"
    assert "eta" not in format_step_line(10, 10, {"perf/step_time_s": 1.0}, eta_s=0.0)


# -- graceful stop: real signals to a real `flowrl train` process ---------------------------------------


def start_training(config: Path, *args: str, reward_sleep_s: float = 0.05) -> subprocess.Popen[str]:
    """``flowrl train`` in its own process; each reward call sleeps ``reward_sleep_s``."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "SLOW_REWARD_S": str(reward_sleep_s),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "flowrl.commands", "train", str(config), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_steps(run: Path, count: int, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{count} steps not logged in {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_continues(
    model_dir: Path, data_file: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    run = tmp_path / "run"
    extra = {
        "train.total_steps": 200,
        "train.save_every": 0,  # only the stop writes a checkpoint
        "train.tensorboard": "true",
        "reward.function": "tests.helpers.flaky_rewards:slow_digit_share",
    }
    config = write_config(tmp_path / "c.yaml", trainer_overrides(model_dir, data_file, run, **extra))
    proc = start_training(config)
    wait_for_steps(run, 2, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    stopped = steps(run)
    assert stopped == list(range(1, len(stopped) + 1)) and len(stopped) < 200
    assert checkpoint_steps(run) == [stopped[-1]]  # the last completed step, and no other
    assert f"stopped at step {stopped[-1]}, checkpoint written; continue with: flowrl train" in err
    assert "--resume" in err.splitlines()[-1] and "Traceback" not in err

    total = stopped[-1] + 2
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowrl.commands",
            "train",
            str(config),
            f"train.total_steps={total}",
            "--resume",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert steps(run) == list(range(1, total + 1))  # no step twice, none missing
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = [e.step for e in events.Scalars("reward/mean")]
    assert sorted(logged) == list(range(1, total + 1))


@pytest.mark.slow
def test_a_second_signal_exits_at_once_without_a_checkpoint(
    model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    extra = {
        "train.total_steps": 200,
        "train.save_every": 0,
        "reward.function": "tests.helpers.flaky_rewards:slow_digit_share",
    }
    config = write_config(tmp_path / "c.yaml", trainer_overrides(model_dir, data_file, run, **extra))
    proc = start_training(config, reward_sleep_s=0.5)  # 16 samples: about 8 s of scoring per step
    wait_for_steps(run, 1, proc)
    time.sleep(1.0)  # into step 2's scoring (a signal during its rollout would abandon it at once)
    proc.send_signal(signal.SIGINT)
    time.sleep(2.5)  # past the window in which repeats count as the same stop; still scoring step 2
    assert proc.poll() is None, "the first signal waits for the step"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT
    assert "SIGINT again: exiting now, without a checkpoint" in err
    assert checkpoint_steps(run) == [] and steps(run) == [1]


def test_a_run_that_cannot_fit_is_refused_before_loading(
    data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The 32B model on this machine's memory: the plan is printed and the run refused, naming changes."""
    big = REPO / "tests" / "plan_fixtures" / "qwen2.5-32b"
    run = tmp_path / "run"
    items = trainer_overrides(big, data_file, run)
    code, out, err = run_cli(["train", str(write_config(tmp_path / "big.yaml", items))], capsys)
    assert code == 2 and "memory plan" in out and "does NOT fit" in out
    assert "does not fit" in err and "--force" in err and not run.exists()
    code, _, err = run_cli(["train", str(write_config(tmp_path / "big.yaml", items)), "--force"], capsys)
    assert code == 2 and "does not fit" not in err  # forced past the plan, it fails later (no tokenizer)
