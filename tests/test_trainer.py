"""The trainer end to end on a tiny random model: CLI, log-probs, micro-batches, resume, bad input."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from flowrl import commands
from flowrl.batching import micro_batch
from flowrl.checkpoint import HEAD_FILE, MODEL_DIR, latest_checkpoint
from flowrl.config import load_config
from flowrl.data import synthetic
from flowrl.data.schema import write_rows
from flowrl.export import export_checkpoint
from flowrl.logging import read_metrics
from flowrl.objectives.flowrl import BETA, flowrl_loss, sequence_importance_weight
from flowrl.objectives.masked import masked_mean, masked_sum
from flowrl.partition import LOG_Z_PREFIX
from flowrl.policy import Policy, load_model, load_tokenizer
from flowrl.rollout import HFRolloutEngine, SamplingParams
from flowrl.trainer import Trainer
from tests.conftest import trainer_overrides as overrides
from tests.conftest import write_config


def test_train_cli_two_steps_updates_every_parameter(
    model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "run.yaml", overrides(model_dir, data_file, tmp_path / "run", **{"train.plot": "true"})
    )
    assert commands.main(["train", str(config)]) == 0
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["actor/loss"]) and math.isfinite(r["flowrl/log_z"]) for r in rows)
    assert (tmp_path / "run" / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "samples.jsonl").exists()

    final = latest_checkpoint(tmp_path / "run" / "checkpoints")
    before = load_model(str(model_dir)).state_dict()
    after = load_model(str(final / MODEL_DIR)).state_dict()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == [], f"parameters not updated: {unchanged}"


def test_trainer_updates_the_head(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    trainer = Trainer(load_config(None, overrides(model_dir, data_file, tmp_path / "run")))
    head0 = {k: v.clone() for k, v in trainer.policy.log_z_head.state_dict().items()}
    trainer.fit()
    head1 = trainer.policy.log_z_head.state_dict()
    assert head0 and all(not torch.equal(head0[k], head1[k]) for k in head0)
    saved = load_file(str(latest_checkpoint(tmp_path / "run" / "checkpoints") / HEAD_FILE))
    assert set(saved) == {LOG_Z_PREFIX + k for k in head1}
    assert all(torch.equal(saved[LOG_Z_PREFIX + k], head1[k]) for k in head1)


@pytest.fixture(scope="module")
def softcapped_model_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Gemma 2 (its forward soft-caps the logits: cap * tanh(z / cap)) with the demo's tokenizer;
    a cap of 2 bends logits of this size."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = load_tokenizer(str(model_dir))
    config = AutoConfig.for_model(
        "gemma2", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=len(tokenizer), final_logit_softcapping=2.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("gemma2") / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("which", ["qwen2", "gemma2"])
def test_logprobs_equal_independent_recomputation(which: str, request: pytest.FixtureRequest) -> None:
    """The trainer's log-probs, the engine's sampling log-probs and the model's own logits agree (Gemma 2:
    through its logit soft-cap, which the policy applies as the model's forward does)."""
    model_dir = request.getfixturevalue("model_dir" if which == "qwen2" else "softcapped_model_dir")
    attention = "sdpa" if which == "qwen2" else "eager"
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), attn_implementation=attention).eval()
    engine = HFRolloutEngine(
        model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, show_progress=False
    )
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("sum 7:", "sum 12:", "sum 9:")]
    temperature = 0.7
    torch.manual_seed(0)
    batch = engine.generate(
        prompts, SamplingParams(n=2, temperature=temperature, max_new_tokens=6, return_logprobs=True)
    )
    policy = Policy(model, logprob_chunk_size=3)  # several chunks
    with torch.no_grad():
        ours = policy(
            batch.input_ids, batch.attention_mask, batch.prompt_ids.shape[1], temperature=temperature
        )
    # independently: each sequence alone, no padding, full logits, plain log_softmax
    for i in range(batch.input_ids.shape[0]):
        prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
        response = batch.response_ids[i][batch.response_mask[i].bool()]
        ids = torch.cat([prompt, response])[None]
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1] / temperature
        expected = torch.log_softmax(logits.float(), -1).gather(-1, response[:, None]).squeeze(-1)
        got = ours.logprobs[i][batch.response_mask[i].bool()]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # and the engine's sampling log-probs are the same distribution's
        sampled = batch.sampling_logprobs[i][batch.response_mask[i].bool()]
        torch.testing.assert_close(sampled, expected, atol=1e-4, rtol=1e-4)
    assert torch.all(ours.logprobs[batch.response_mask == 0] == 0)


def _one_rollout(trainer: Trainer) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed batch of 4 prompts x 4 samples, rewards spread over [0, 1], and its advantages, sampled
    from a policy moved away from the reference (at the reference, FlowRL's group log Z would be 0)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainer.policy.model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    indices = trainer.sampler.next(4)
    rollout = trainer.engine.generate([trainer.prompts.prompt_ids[i] for i in indices], trainer.sampling)
    rewards = torch.linspace(0, 1, rollout.response_ids.shape[0])
    valid = torch.ones_like(rewards, dtype=torch.bool)
    advantages = trainer.objective.advantage_fn(
        rewards, rollout.response_mask.float(), None, None, num_samples_per_prompt=4, valid=valid
    )
    return rollout, rewards, valid, advantages


def _recorded_update(trainer: Trainer, *args: Any) -> tuple[dict[str, float], torch.Tensor]:
    """``trainer.actor.update(*args)`` over one mini-batch: its metrics and the gradient it stepped with."""
    seen: list[torch.Tensor] = []
    step, policy = trainer.optimizer.step, trainer.policy

    def recording_step() -> None:
        seen.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]))
        step()

    trainer.optimizer.step = recording_step  # type: ignore[method-assign]
    torch.manual_seed(2)
    metrics = trainer.actor.update(*args, step=trainer.step)
    (grads,) = seen
    assert grads.abs().sum() > 0
    assert all(p.grad is None for p in trainer.policy.parameters()), "released right after the step"
    return metrics, grads


@pytest.mark.parametrize("algorithm", ["flowrl", "flowrl_group", "grpo"])
def test_update_does_not_depend_on_micro_batch_size(
    algorithm: str, model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    results = []
    for micro in (1, 3, 8):
        cfg = load_config(
            None,
            overrides(
                model_dir,
                data_file,
                tmp_path / f"m{micro}",
                **{
                    "train.micro_batch_size": micro,
                    "train.logprob_micro_batch_size": micro + 1,  # the reference pass's own size
                    "train.mini_batch_size": 16,  # all 16 sequences: the one mini-batch the test means
                    "log_z.dropout": 0.0,
                    "algorithm.name": algorithm.removesuffix("_group"),
                    "log_z.mode": "group" if algorithm.endswith("_group") else "head",
                },
            ),
        )
        trainer = Trainer(cfg)
        rollout, rewards, valid, advantages = _one_rollout(trainer)
        ref = (
            trainer.actor.logprobs(trainer.ref_policy, rollout, with_entropy=False)[0]
            if trainer.ref_policy is not None
            else None
        )
        old = log_z = None
        if (
            trainer.actor.log_z_per_group
        ):  # as the loop does: log-probs before the update, then the group estimate
            old = trainer.actor.logprobs(trainer.policy, rollout, with_entropy=False)[0]
            log_z = trainer.actor.group_log_z(valid, advantages, old, ref, rollout.response_mask.float())
            assert log_z.view(4, 4)[:, 0].std() > 1e-3  # one value per prompt, and they differ
        metrics, grads = _recorded_update(
            trainer, rollout, torch.arange(len(rewards)), advantages, old, ref, log_z
        )
        results.append((metrics["actor/loss"], grads))
    for loss, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5, abs=1e-7)
        torch.testing.assert_close(grads, results[0][1], atol=1e-6, rtol=1e-4)


def test_group_mode_update_equals_the_group_estimate_inside_the_graph(
    model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    """The trainer's group mode (estimate computed before the update, detached, micro-batches of 3 that
    cut across groups) steps with the gradient of the whole batch's loss with the estimate computed in
    the same forward and the gradient flowing through it (objectives.group_log_z: the envelope argument)."""
    items = overrides(
        model_dir,
        data_file,
        tmp_path / "run",
        **{
            "train.micro_batch_size": 3,
            "train.mini_batch_size": 16,
            "log_z.mode": "group",
            "optim.max_grad_norm": 1e9,  # the raw gradient: no clipping
        },
    )
    trainer = Trainer(load_config(None, items))
    assert trainer.actor.log_z_per_group and trainer.policy.log_z_head is None
    rollout, rewards, valid, advantages = _one_rollout(trainer)
    mask = rollout.response_mask.float()
    ref = trainer.actor.logprobs(trainer.ref_policy, rollout, with_entropy=False)[0]
    old = trainer.actor.logprobs(trainer.policy, rollout, with_entropy=False)[0]

    # expected: one forward over all 16 rows, the group mean of beta r_hat + ell_ref - ell in the graph
    mb = micro_batch(rollout, torch.arange(16))
    w = mb.response_width
    out = trainer.policy(mb.input_ids, mb.attention_mask, mb.prompt_length, temperature=1.0)
    m = mask[:, :w]
    target = BETA * advantages + masked_mean(ref[:, :w], m, dim=-1) - masked_mean(out.logprobs, m, dim=-1)
    weight = sequence_importance_weight(masked_sum(out.logprobs.detach() - old[:, :w], m, dim=-1), "clamp")
    in_graph = ((weight * target).view(4, 4).sum(1) / weight.view(4, 4).sum(1)).repeat_interleave(4)
    assert in_graph.requires_grad
    loss, _ = flowrl_loss(out.logprobs, old[:, :w], ref[:, :w], in_graph, advantages, m)
    loss.backward()
    expected = torch.cat([p.grad.flatten() for p in trainer.policy.parameters() if p.grad is not None])
    trainer.policy.zero_grad(set_to_none=True)

    log_z = trainer.actor.group_log_z(valid, advantages, old, ref, mask)
    torch.testing.assert_close(log_z, in_graph.detach(), atol=1e-6, rtol=1e-6)
    assert log_z.view(4, 4)[:, 0].std() > 1e-3
    metrics, grads = _recorded_update(trainer, rollout, torch.arange(16), advantages, old, ref, log_z)
    assert metrics["actor/loss"] == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(grads, expected, atol=1e-6, rtol=1e-4)


def test_group_mode_builds_saves_and_exports_no_head(
    model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    items = overrides(model_dir, data_file, tmp_path / "run", **{"log_z.mode": "group"})
    trainer = Trainer(load_config(None, items))
    assert trainer.policy.log_z_head is None
    assert all(g.get("name") != "log_z_head" for g in trainer.optimizer.param_groups)
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    rows = trainer.fit().metrics
    assert all(math.isfinite(r["actor/loss"]) and math.isfinite(r["flowrl/log_z"]) for r in rows)
    assert all("flowrl/log_z_grad_norm" not in r for r in rows)  # no head to pull on
    assert all(not torch.equal(p, before[n]) for n, p in trainer.policy.named_parameters())
    final = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert not (final / HEAD_FILE).exists() or not load_file(str(final / HEAD_FILE))
    info = export_checkpoint(final, tmp_path / "exported")
    assert info["log_z_head"] is None and not (tmp_path / "exported" / "log_z_head").exists()


def test_unknown_log_z_mode_is_refused_with_the_choices(tmp_path: Path) -> None:
    items = [f"model.path={tmp_path}", f"data.train_files=[{tmp_path / 'x.jsonl'}]", "log_z.mode=mean"]
    with pytest.raises(ValueError, match="log_z.mode='mean': choose 'head' .* or 'group'"):
        load_config(None, items)


REFERENCE_STARTED = threading.Event()
REWARD_THREADS: list[tuple[str, bool]] = []


def reward_waiting_for_the_reference(response: str, example: dict) -> float:
    """Scores like the demo, but first waits for the reference pass to start: it can only start while
    scoring is under way if the two run side by side."""
    REWARD_THREADS.append((threading.current_thread().name, REFERENCE_STARTED.wait(timeout=30)))
    return synthetic.reward(response, example).score


def test_reference_pass_runs_beside_scoring(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    settings = {
        "reward.function": "tests.test_trainer:reward_waiting_for_the_reference",
        "train.total_steps": 1,
        "train.overlap_reference": True,  # the default on CUDA; off by default on CPU
    }
    cfg = load_config(None, overrides(model_dir, data_file, tmp_path, **settings))
    trainer = Trainer(cfg)
    assert trainer.ref_policy is not None
    passes: list[str] = []
    no_grad = trainer.actor.logprobs

    def recorded(policy, rollout, *, with_entropy):
        if policy is trainer.ref_policy:
            passes.append(threading.current_thread().name)
            REFERENCE_STARTED.set()
        return no_grad(policy, rollout, with_entropy=with_entropy)

    REFERENCE_STARTED.clear()
    REWARD_THREADS.clear()
    trainer.actor.logprobs = recorded
    trainer.fit()
    main = threading.main_thread().name
    assert passes and all(name != main for name in passes)  # the reference pass: a second thread
    assert REWARD_THREADS and all(name == main and started for name, started in REWARD_THREADS)


def test_stop_and_resume_equals_straight_run(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    common = {"train.save_every": 2, "train.sample_every": 0, "train.mini_batch_size": 4}
    straight = tmp_path / "straight"
    Trainer(
        load_config(None, overrides(model_dir, data_file, straight, **common, **{"train.total_steps": 4}))
    ).fit()
    resumed = tmp_path / "resumed"
    Trainer(
        load_config(None, overrides(model_dir, data_file, resumed, **common, **{"train.total_steps": 2}))
    ).fit()
    cfg = load_config(None, overrides(model_dir, data_file, resumed, **common, **{"train.total_steps": 4}))
    Trainer(cfg, resume=True).fit()
    a, b = read_metrics(straight / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for key in (
            "actor/loss",
            "reward/mean",
            "flowrl/log_z",
            "rollout/response_length",
            "optim/grad_norm",
        ):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-9), (ra["step"], key)


def test_export_leaves_the_head_out(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    Trainer(load_config(None, overrides(model_dir, data_file, tmp_path / "run"))).fit()
    final = latest_checkpoint(tmp_path / "run" / "checkpoints")
    weights = {}
    for f in (final / MODEL_DIR).glob("*.safetensors"):
        weights.update(load_file(str(f)))
    assert weights and not any("log_z" in k for k in weights)
    assert all(k.startswith(LOG_Z_PREFIX) for k in load_file(str(final / HEAD_FILE)))


def test_failed_rewards_are_counted_and_left_out(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    cfg = load_config(
        None,
        overrides(
            model_dir,
            data_file,
            tmp_path / "run",
            **{"reward.function": "tests.helpers.flaky_rewards:every_third_fails", "train.total_steps": 1},
        ),
    )
    result = Trainer(cfg).fit()
    row = result.metrics[0]
    assert row["reward/failed"] > 0 and row["reward/status_error"] == row["reward/failed"]
    assert math.isfinite(row["actor/loss"])


def test_all_rewards_failing_stops_the_run(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    cfg = load_config(
        None,
        overrides(
            model_dir,
            data_file,
            tmp_path / "run",
            **{"reward.function": "tests.helpers.flaky_rewards:always_nan"},
        ),
    )
    with pytest.raises(RuntimeError, match="(?i)every reward|all"):
        Trainer(cfg).fit()


def test_long_prompts_are_skipped_and_reported(model_dir: Path, tmp_path: Path) -> None:
    rows = synthetic.rows()
    rows[0]["prompt"][0]["content"] = "sum " + "9" * 40 + ":"
    data = write_rows(rows, tmp_path / "train.jsonl")
    trainer = Trainer(load_config(None, overrides(model_dir, data, tmp_path / "run")))
    assert len(trainer.prompts.examples) == len(rows) - 1
    report = [json.loads(x) for x in (tmp_path / "run" / "skipped_prompts.jsonl").read_text().splitlines()]
    assert len(report) == 1 and report[0]["row"] == 0 and report[0]["reason"] == "prompt too long"


def test_empty_dataset_is_refused(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no rows"):
        Trainer(load_config(None, overrides(model_dir, tmp_path / "empty.jsonl", tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_missing_model_directory_names_the_fix(data_file: Path, tmp_path: Path) -> None:
    cfg = load_config(None, overrides(tmp_path / "nope", data_file, tmp_path / "run"))
    with pytest.raises(ValueError, match="does not exist"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


def test_tokenizer_without_pad_token_gets_eos(model_dir: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(str(model_dir))
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "tok")
    reloaded = load_tokenizer(str(tmp_path / "tok"))
    assert reloaded.pad_token_id == reloaded.eos_token_id and reloaded.padding_side == "left"


def test_unknown_config_key_is_named_with_the_closest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"optim\.lrr.*did you mean 'optim\.lr'"):
        load_config(None, ["model.path=x", "data.train_files=[a.jsonl]", "optim.lrr=1e-6"])
    with pytest.raises(ValueError, match="did you mean 'beta'"):
        load_config(None, ["model.path=x", "data.train_files=[a.jsonl]", "algorithm.loss.betta=3"])
    with pytest.raises(ValueError, match="not one of"):
        load_config(None, ["model.path=x", "data.train_files=[a.jsonl]", "algorithm.name=ppo2"])
    with pytest.raises(ValueError, match=r"rollout.batch_size \(decode slots\) must be >= 1"):
        load_config(None, ["model.path=x", "data.train_files=[a.jsonl]", "rollout.batch_size=0"])


def test_cli_reports_bad_config_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(
        tmp_path / "bad.yaml", ["model.path=x", "data.train_files=[a.jsonl]", "train.totl_steps=3"]
    )
    assert commands.main(["train", str(config)]) == 2
    assert "train.total_steps" in capsys.readouterr().err


def test_log_every_thins_console_lines_not_metrics(
    model_dir: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = overrides(
        model_dir, data_file, tmp_path / "run", **{"train.total_steps": 3, "train.log_every": 2}
    )
    config = write_config(tmp_path / "run.yaml", items)
    assert commands.main(["train", str(config)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/3", "3/3"]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize(("algorithm", "kl_coef", "loaded"), [("grpo", 0.0, False), ("grpo", 0.05, True)])
def test_grpo_loads_the_reference_only_for_its_kl(
    model_dir: Path, data_file: Path, tmp_path: Path, algorithm: str, kl_coef: float, loaded: bool
) -> None:
    items = overrides(model_dir, data_file, tmp_path / "run", **{"algorithm.name": algorithm})
    trainer = Trainer(load_config(None, [*items, f"algorithm.loss.kl_coef={kl_coef}"]))
    assert (trainer.ref_policy is not None) == loaded
    assert math.isfinite(trainer.fit().metrics[-1]["actor/loss"])


def test_optimizer_offloaded_to_the_host_trains_as_the_plain_one(
    model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    from flowrl.optim import HostAdamW

    runs = {}
    for offload in (False, True):
        items = overrides(
            model_dir, data_file, tmp_path / str(offload), **{"train.offload_optimizer": offload}
        )
        trainer = Trainer(load_config(None, items))
        assert isinstance(trainer.optimizer, HostAdamW) == offload
        runs[offload] = (
            trainer.fit().metrics,
            {n: p.detach().clone() for n, p in trainer.policy.named_parameters()},
        )
        if offload:  # the states are on the host side, none beside the device's weights
            assert not trainer.optimizer.state and trainer.optimizer.host.state
    (plain, plain_w), (host, host_w) = runs[False], runs[True]
    for a, b in zip(plain, host, strict=True):
        assert a["actor/loss"] == pytest.approx(b["actor/loss"], rel=1e-5)
    for name, value in plain_w.items():
        torch.testing.assert_close(host_w[name], value, atol=1e-6, rtol=1e-5)
