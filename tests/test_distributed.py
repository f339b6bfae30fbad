"""Data-parallel training under a real ``torchrun --nproc_per_node 2`` (CPU, gloo) against one process.

The trainer is built so that K processes compute what one process computes (see flowrl.trainer's
docstring): the same responses (each prompt's samples seeded by its position), the same mini-batches, the
gradient of the global mini-batch mean. So a 2-process run must match a 1-process run up to float
rounding, a resumed 2-process run must match both, and only rank 0 logs and saves.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from flowrl import distributed
from flowrl.checkpoint import HEAD_FILE, MODEL_DIR, list_checkpoints
from flowrl.config import load_config
from flowrl.data import synthetic
from flowrl.data.prompts import PromptSampler
from flowrl.logging import read_metrics
from flowrl.trainer import Trainer
from tests.conftest import trainer_overrides, write_config

REPO = Path(__file__).resolve().parents[1]
PROMPTS_PER_RANK = 2
SAMPLES = 4
TORCHRUN_TIMEOUT_S = 120  # a deadlock shows up as this timeout, not as a hung test session
COMPARED = ("actor/loss", "reward/mean", "reward/std", "optim/grad_norm", "rollout/response_length")


def digit_share(response: str, example: Mapping[str, Any]) -> float:
    """A reward a random tiny model gets varied values of: the share of digits in the response."""
    return sum(c.isdigit() for c in response) / max(1, len(response))


FAIL_GROUND_TRUTHS = "FLOWRL_TEST_FAIL_GROUND_TRUTHS"
_calls = itertools.count()


def fails_on_some_prompts_then_everywhere(response: str, example: Mapping[str, Any]) -> float:
    """NaN in step 1 for the prompts whose ground truth is listed in $FLOWRL_TEST_FAIL_GROUND_TRUTHS,
    normal in step 2, NaN from step 3 on. Steps are counted by calls, as one process or one rank of
    WORLD_SIZE makes them."""
    per_step = 2 * PROMPTS_PER_RANK * SAMPLES // int(os.environ.get("WORLD_SIZE", "1"))
    step = next(_calls) // per_step + 1
    failing = os.environ[FAIL_GROUND_TRUTHS].split(",")
    if step >= 3 or (step == 1 and example["reward_model"]["ground_truth"] in failing):
        return math.nan
    return digit_share(response, example)


def overrides(model_dir: Path, data_file: Path, out: Path, **extra: object) -> list[str]:
    settings = {
        "rollout.num_samples_per_prompt": SAMPLES,
        # 3 decode slots, aligned with nothing: rows join mid-decode differently in 1 and 2 processes,
        # and the responses are still the same (per-prompt seeds, per-sequence streams)
        "rollout.batch_size": 3,
        "train.prompts_per_step": 2 * PROMPTS_PER_RANK,
        # 4 mini-batches of 4 of the 16 sequences: random, uneven shares per rank (sometimes none)
        "train.mini_batch_size": 4,
        "train.micro_batch_size": 2,
        "train.save_every": 1,
        "train.keep_checkpoints": 3,
        # the default log Z dropout (0.1): masks come from per-sequence streams, the same in any K
        "reward.function": "tests.test_distributed:digit_share",
    }
    return trainer_overrides(model_dir, data_file, out, **{**settings, **extra})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(config: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    """``torchrun --nproc_per_node 2 -m flowrl.commands train CONFIG ARGS`` and its environment."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "flowrl.commands",
        "train",
        str(config),
        *args,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONFAULTHANDLER"] = "1"  # a crashing rank prints where it was
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return command, env


def torchrun(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``torchrun ... train CONFIG ARGS`` from the repository root to its end."""
    command, env = torchrun_command(config, *args)
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S
    )


def worker_pid(parent: int, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (a child of ``parent`` with RANK=rank in its environment)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"no worker of rank {rank} under {parent}")


@contextmanager
def one_thread() -> Iterator[None]:
    """torchrun gives each process one thread; the reference run uses one too (and is faster for it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_process(model_dir: Path, data_file: Path, out: Path, **extra: object) -> list[dict[str, Any]]:
    with one_thread():
        return Trainer(load_config(None, overrides(model_dir, data_file, out, **extra))).fit().metrics


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(checkpoint / HEAD_FILE))
    for f in (checkpoint / MODEL_DIR).glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    return tensors


def assert_same_run(got: list[dict[str, Any]], expected: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(got, expected, strict=True):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), (a["step"], key)


def assert_same_weights(got: Path, expected: Path) -> None:
    """``got``'s weights are ``expected``'s up to float rounding.

    The ranks sum in another order than one process, and Adam carries that rounding on: it changes each
    update by a small part of the update's own size, which the learning rate sets (0.1 for the head here,
    0.01 for the model), not the gradient's. So the tolerance is 1e-4 plus 1% of the most the expected
    run moved the tensor in its last step (read from the checkpoint before ``expected``, when kept). A
    wrong gradient or a lost optimizer state changes an update by about its whole size.
    """
    a, b = weights(got), weights(expected)
    assert a.keys() == b.keys() and a
    kept = list_checkpoints(expected.parent)
    at = kept.index(expected)
    before = weights(kept[at - 1]) if at > 0 else {}
    for key in a:
        moved = (b[key] - before[key]).abs().max().item() if key in before else 0.0
        torch.testing.assert_close(a[key], b[key], atol=1e-4 + 1e-2 * moved, rtol=1e-4, msg=key)


@pytest.mark.slow  # torchrun: several processes
def test_torchrun_matches_one_process_and_resumes(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    expected = single_process(model_dir, data_file, tmp_path / "single", **{"train.total_steps": 3})
    ours = {"flowrl/log_z", *COMPARED}
    assert len({r["reward/mean"] for r in expected}) == 3, "the reward must vary for the test to mean much"

    run = tmp_path / "dp"
    config = write_config(tmp_path / "dp.yaml", overrides(model_dir, data_file, run))
    first = torchrun(config, "train.total_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    lines = first.stdout.splitlines()
    # rank 0 alone prints, logs and saves
    assert [line.split(" |")[0] for line in lines if line.startswith("step ")] == ["step 1/2", "step 2/2"]
    assert sum(line.startswith("checkpoint: ") for line in lines) == 2
    assert sum(line.startswith("samples at step") for line in lines) == 2
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_000001", "step_000002"]
    assert not list((run / "checkpoints").glob(".tmp*"))
    assert_same_run(read_metrics(run / "metrics.jsonl"), expected[:2], tuple(ours))
    assert_same_weights(run / "checkpoints" / "step_000002", tmp_path / "single/checkpoints/step_000002")

    resumed = torchrun(config, "train.total_steps=3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sum("resumed from" in line and "at step 2" in line for line in resumed.stdout.splitlines()) == 1
    assert_same_run(read_metrics(run / "metrics.jsonl"), expected, tuple(ours))
    assert_same_weights(run / "checkpoints" / "step_000003", tmp_path / "single/checkpoints/step_000003")


@pytest.mark.slow  # torchrun: several processes
def test_torchrun_group_log_z_matches_one_process(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    """log_z.mode=group: each rank draws whole prompts and samples all of a prompt's responses itself, so
    every group is whole on one rank and its estimate is the one process's. The same metrics (log Z and
    the residual included) and the same weights as one process, with no head (an empty head file)."""
    group = {"log_z.mode": "group", "train.total_steps": 2}
    expected = single_process(model_dir, data_file, tmp_path / "single", **group)
    assert len({r["reward/mean"] for r in expected}) == 2, "the reward must vary for the test to mean much"
    assert all(r["flowrl/log_z"] != 0 for r in expected)

    run = tmp_path / "dp"
    config = write_config(tmp_path / "dp.yaml", overrides(model_dir, data_file, run, **group))
    result = torchrun(config)
    assert result.returncode == 0, result.stderr[-3000:]
    keys = ("flowrl/log_z", "flowrl/residual_abs", *COMPARED)
    assert_same_run(read_metrics(run / "metrics.jsonl"), expected, keys)
    for step in ("step_000001", "step_000002"):
        checkpoint = run / "checkpoints" / step
        assert not load_file(str(checkpoint / HEAD_FILE))  # the layout's head file, empty: no head
        assert_same_weights(checkpoint, tmp_path / "single/checkpoints" / step)


@pytest.mark.slow  # torchrun: several processes
def test_torchrun_reinforce_pp_failed_rewards_and_stop(
    model_dir: Path, data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REINFORCE++ (batch whitening over every rank's tokens) with failing rewards.

    Step 1: every prompt of rank 1 fails, so rank 1 trains on nothing yet joins every collective.
    Step 2: all rewards usable; a per-rank whitening would differ from the single process here.
    Step 3: every reward fails on every rank: both ranks raise, nothing hangs.
    """
    global _calls
    rows = synthetic.rows()
    step_one = PromptSampler(len(rows), seed=0, shuffle=True).next(2 * PROMPTS_PER_RANK)
    rank_one = [rows[i]["reward_model"]["ground_truth"] for i in step_one[PROMPTS_PER_RANK:]]
    monkeypatch.setenv(FAIL_GROUND_TRUTHS, ",".join(rank_one))
    extra = {
        "algorithm.name": "reinforce_pp",
        "reward.function": "tests.test_distributed:fails_on_some_prompts_then_everywhere",
        "train.total_steps": 3,
        "train.sample_every": 0,
    }
    _calls = itertools.count()
    with pytest.raises(RuntimeError, match="every reward in this batch failed"):
        single_process(model_dir, data_file, tmp_path / "single", **extra)
    expected = read_metrics(tmp_path / "single" / "metrics.jsonl")
    assert expected[0]["reward/failed"] == PROMPTS_PER_RANK * SAMPLES and expected[1]["reward/failed"] == 0

    run = tmp_path / "dp"
    config = write_config(tmp_path / "dp.yaml", overrides(model_dir, data_file, run, **extra))
    result = torchrun(config)  # returns (the timeout would raise if a rank waited forever)
    assert result.returncode != 0
    assert "every reward in this batch failed" in result.stderr, result.stderr[-3000:]
    keys = (*COMPARED, "reward/failed", "reward/status_error")
    assert_same_run(read_metrics(run / "metrics.jsonl"), expected, keys)
    assert_same_weights(run / "checkpoints" / "step_000002", tmp_path / "single/checkpoints/step_000002")


@pytest.mark.slow  # torchrun: several processes
def test_torchrun_refuses_optimizer_steps_in_backward(
    model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    extra = {"train.optimizer_in_backward": "true", "optim.max_grad_norm": 0, "train.micro_batch_size": 4}
    config = write_config(tmp_path / "dp.yaml", overrides(model_dir, data_file, tmp_path / "dp", **extra))
    result = torchrun(config)
    assert result.returncode != 0
    assert "run it in one process" in result.stderr and "train.strategy=fsdp2" in result.stderr, (
        result.stderr[-3000:]
    )
    assert not (tmp_path / "dp" / "checkpoints").exists()  # refused before any step


def test_rollout_does_not_depend_on_how_prompts_are_split(
    model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    with one_thread():
        trainer = Trainer(load_config(None, overrides(model_dir, data_file, tmp_path / "run")))
    trainer.step = 5
    indices = trainer.sampler.next(2 * PROMPTS_PER_RANK)
    whole = trainer._rollout(indices, 0)
    halves = [trainer._rollout(indices[:PROMPTS_PER_RANK], 0)]
    halves.append(trainer._rollout(indices[PROMPTS_PER_RANK:], PROMPTS_PER_RANK))

    def responses(batch: Any) -> list[list[int]]:
        pairs = zip(batch.response_ids, batch.response_mask, strict=True)
        return [ids[mask.bool()].tolist() for ids, mask in pairs]

    assert responses(whole) == responses(halves[0]) + responses(halves[1])
    assert len(set(map(tuple, responses(whole)))) > 1
    trainer.step = 6
    assert responses(trainer._rollout(indices, 0)) != responses(whole), "each step samples anew"


def test_prompts_per_step_must_divide_among_processes() -> None:
    with pytest.raises(ValueError, match=r"train\.prompts_per_step=6 must be divisible.*\(4\).*=8"):
        distributed.DataParallel(rank=1, world_size=4).split(6, "train.prompts_per_step")
    assert distributed.DataParallel(rank=1, world_size=4).split(8, "train.prompts_per_step") == 2


def test_plain_launch_never_touches_torch_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    dp = distributed.setup("cpu")
    assert (dp.rank, dp.world_size, dp.is_main, dp.enabled) == (0, 1, True, False)
    assert not torch.distributed.is_initialized()
    x = torch.arange(3)
    assert dp.gather(x) is x and dp.sum(2.5) == 2.5 and dp.broadcast_object("a") == "a"


def test_one_gpu_index_for_many_processes_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="train.device=cuda"):
        distributed.setup("cuda:1")
    assert not torch.distributed.is_initialized()


def test_derived_seeds_differ_per_part() -> None:
    seeds = {distributed.derive_seed(0, "rollout", step, pos) for step in range(50) for pos in range(50)}
    assert len(seeds) == 2500 and all(0 <= s < 2**63 for s in seeds)
    assert distributed.derive_seed(0, "rollout", 2, 0) != distributed.derive_seed(1, "rollout", 1, 0)


@pytest.mark.slow  # torchrun: several processes
def test_torchrun_a_signal_to_one_rank_stops_every_rank_at_the_same_step(
    model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    """SIGTERM reaches rank 1 alone; rank 0 must stop at the same step (else it would wait forever in
    the next collective), write the checkpoint of that step, and the run must resume from it."""
    run = tmp_path / "dp"
    extra = {
        "train.total_steps": 200,
        "train.save_every": 0,
        "train.sample_every": 0,
        "reward.function": "tests.helpers.flaky_rewards:slow_digit_share",
    }
    config = write_config(tmp_path / "dp.yaml", overrides(model_dir, data_file, run, **extra))
    command, env = torchrun_command(config)
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env={**env, "SLOW_REWARD_S": "0.05"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + TORCHRUN_TIMEOUT_S
        while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.kill(worker_pid(proc.pid, 1), signal.SIGTERM)
        out, err = proc.communicate(timeout=TORCHRUN_TIMEOUT_S)
    finally:
        proc.kill()
    logged = [int(r["step"]) for r in read_metrics(run / "metrics.jsonl")]
    assert logged == list(range(1, len(logged) + 1)) and len(logged) < 200
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [f"step_{logged[-1]:06d}"]
    assert f"stopped at step {logged[-1]}, checkpoint written" in err, err[-3000:]

    total = logged[-1] + 1
    resumed = torchrun(config, f"train.total_steps={total}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [int(r["step"]) for r in read_metrics(run / "metrics.jsonl")] == list(range(1, total + 1))


@pytest.mark.slow  # torchrun: several processes
def test_fsdp2_matches_one_process_holds_half_and_resumes(
    model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    """train.strategy=fsdp2 on 2 gloo processes: the metrics and weights of one process, about half the
    parameter and optimizer bytes per rank, and a resume that continues the same run."""
    expected = single_process(model_dir, data_file, tmp_path / "single", **{"train.total_steps": 3})
    run = tmp_path / "fsdp"
    config = write_config(
        tmp_path / "fsdp.yaml", overrides(model_dir, data_file, run, **{"train.strategy": "fsdp2"})
    )
    first = torchrun(config, "train.total_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    got = read_metrics(run / "metrics.jsonl")
    assert_same_run(got, expected[:2], ("flowrl/log_z", *COMPARED))
    assert_same_weights(run / "checkpoints" / "step_000002", tmp_path / "single/checkpoints/step_000002")
    for sharded, whole in zip(got, expected, strict=False):
        assert 0.45 < sharded["perf/model_state_gb"] / whole["perf/model_state_gb"] < 0.6

    resumed = torchrun(config, "train.total_steps=3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(read_metrics(run / "metrics.jsonl"), expected, ("flowrl/log_z", *COMPARED))
    assert_same_weights(run / "checkpoints" / "step_000003", tmp_path / "single/checkpoints/step_000003")


@pytest.mark.slow  # torchrun: several processes
def test_fsdp2_with_bf16_compute_trains_float32_weights(
    model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    """train.strategy=fsdp2 with train.bf16=true on 2 gloo processes (the GPU default, here on CPU): the
    run trains, its checkpoint holds float32 weights that moved, and it resumes."""
    run = tmp_path / "fsdp-bf16"
    extra = {"train.strategy": "fsdp2", "train.bf16": True}
    config = write_config(tmp_path / "fsdp-bf16.yaml", overrides(model_dir, data_file, run, **extra))
    first = torchrun(config, "train.total_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [1, 2]
    assert all(math.isfinite(r[key]) for r in metrics for key in COMPARED)
    trained = weights(run / "checkpoints" / "step_000002")
    initial = {k: v for f in model_dir.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert {v.dtype for v in trained.values()} == {torch.float32}
    assert any(not torch.equal(trained[k], v) for k, v in initial.items())
    resumed = torchrun(config, "train.total_steps=3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


@contextmanager
def one_rank_group() -> Iterator[None]:
    """A gloo process group of this process alone (FSDP2 runs at world size 1 too)."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp2_bf16_compute_reads_bf16_weights_and_keeps_float32_shards(model_dir: Path) -> None:
    """train.bf16 under fsdp2, CPU included: rollout and forwards read bf16 gathered weights (what a GPU
    run's MixedPrecisionPolicy does), shards and gradients stay float32, the entropy path works, and
    the gradients (the tied embedding's, added in place, included) are those of a bf16 copy."""
    from flowrl import sharding
    from flowrl.models import embedding_gradient_in_place
    from flowrl.policy import Policy, load_model

    torch.manual_seed(0)
    ids = torch.randint(0, 20, (2, 7))  # the tiny vocabulary; tokens repeat, as the in-place rows must add
    mask = torch.ones_like(ids)
    copy = Policy(load_model(str(model_dir)).to(torch.bfloat16))
    want = copy(ids, mask, 3, with_entropy=True)
    want.logprobs.sum().backward()
    expected = {n: p.grad.float() for n, p in copy.named_parameters()}

    model = load_model(str(model_dir))
    assert embedding_gradient_in_place(model)
    policy = Policy(model)
    with one_rank_group():
        units = sharding.shard_policy(policy, mixed_precision=True)
        with sharding.gathered(units):
            assert {p.dtype for p in policy.parameters()} == {torch.bfloat16}
        assert {sharding.local(p).dtype for p in policy.parameters()} == {torch.float32}
        got = policy(ids, mask, 3, with_entropy=True)
        assert got.entropy is not None and got.entropy.dtype == torch.float32
        torch.testing.assert_close(got.logprobs, want.logprobs)
        got.logprobs.sum().backward()
        grads = {n: p.grad.full_tensor() for n, p in policy.named_parameters()}
    assert grads.keys() == expected.keys() and {g.dtype for g in grads.values()} == {torch.float32}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=2e-2, atol=1e-3, msg=name)
