"""FlowRL on TRL: the loss equals flowrl_loss, the head trains, saves and loads the project's way,
stays out of vLLM's weights; end to end in one process and under a real 2-process torchrun launch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "trl", reason="TRL is not installed: pip install -e '.[trl]' to test flowrl.integrations.trl"
)

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from flowrl.checkpoint import HEAD_FILE, load_log_z_head, save_log_z_head  # noqa: E402
from flowrl.data import synthetic  # noqa: E402
from flowrl.data.schema import write_rows  # noqa: E402
from flowrl.integrations.trl import (  # noqa: E402
    GROUP_LOG_Z,
    LOG_Z_MODULE,
    MAX_PROMPT_LENGTH,
    PROCESSED_LOGPROBS,
    FlowRLConfig,
    FlowRLReward,
    FlowRLTrainer,
    exclude_log_z_from_vllm_sync,
    gathered_group_log_z,
    new_log_z_head,
    prompt_keys,
    trl_dataset,
)
from flowrl.objectives import flowrl_loss, group_log_z  # noqa: E402
from flowrl.partition import LOG_Z_PREFIX, LogZHead, is_log_z_param, pool_prompt_states  # noqa: E402
from flowrl.policy import load_model, load_tokenizer  # noqa: E402
from tests.helpers.trl_group_log_z_probe import digit_share  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "trl" / "train_flowrl_trl.py"
PROBE = REPO / "tests" / "helpers" / "trl_group_log_z_probe.py"
TINY = dict(hidden_size=32, num_layers=1, num_heads=2)
TEMPERATURE = 0.7  # != 1, so a missing temperature scaling would show
CPU_RUN = dict(use_cpu=True, bf16=False, report_to="none", save_strategy="no", gradient_checkpointing=False)
BATCH = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=6, logging_steps=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, **TINY)


def make_trainer(model_dir: Path, output_dir: Path, **config: object) -> FlowRLTrainer:
    tokenizer = load_tokenizer(str(model_dir))
    args = FlowRLConfig(output_dir=str(output_dir), **{**CPU_RUN, **BATCH, **config})
    return FlowRLTrainer(
        str(model_dir),
        reward_funcs=FlowRLReward(synthetic.reward),
        args=args,
        train_dataset=trl_dataset(synthetic.rows(), tokenizer),
        processing_class=tokenizer,
    )


@pytest.fixture(scope="module")
def trained(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[FlowRLTrainer, dict]:
    """Two optimizer steps in one process; log_z_dropout=0 so later forwards are deterministic."""
    trainer = make_trainer(
        model_dir,
        tmp_path_factory.mktemp("run"),
        max_steps=2,
        learning_rate=1e-3,
        log_z_lr=1e-2,
        log_z_dropout=0.0,
        temperature=TEMPERATURE,
    )
    head0 = {k: v.clone() for k, v in trainer.log_z_head.state_dict().items()}
    trainer.train()
    return trainer, head0


def test_training_updates_the_head_in_its_own_param_group(trained: tuple[FlowRLTrainer, dict]) -> None:
    trainer, head0 = trained
    head1 = trainer.log_z_head.state_dict()
    assert head0 and all(not torch.equal(head0[k], head1[k]) for k in head0)
    assert getattr(trainer.model, LOG_Z_MODULE) is trainer.log_z_head

    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert all(math.isfinite(r["flowrl/log_z"]) for r in trainer.state.log_history if "loss" in r)

    groups = {g.get("name"): g for g in trainer.optimizer.param_groups}
    head_ids = {id(p) for p in trainer.log_z_head.parameters()}
    assert {id(p) for p in groups[LOG_Z_MODULE]["params"]} == head_ids
    assert groups[LOG_Z_MODULE]["initial_lr"] == 1e-2
    others = [p for g in trainer.optimizer.param_groups if g.get("name") != LOG_Z_MODULE for p in g["params"]]
    assert others and not head_ids & {id(p) for p in others}
    # TRL loaded a reference model for FlowRL while its KL coefficient stays 0 in the config
    assert trainer.ref_model is not None and trainer.args.beta == 0.0


@pytest.mark.parametrize(
    ("sequence_weighting", "old_logprobs_from"),
    [("mean", "trainer"), ("length", "trainer"), ("mean", "rollout")],
)
def test_loss_equals_flowrl_loss_on_the_same_tensors(
    trained: tuple[FlowRLTrainer, dict],
    sequence_weighting: str,
    old_logprobs_from: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trainer, _ = trained
    monkeypatch.setitem(trainer._flowrl_kwargs, "sequence_weighting", sequence_weighting)
    monkeypatch.setattr(trainer.args, "flowrl_old_logprobs", old_logprobs_from)
    model, args = trainer.model, trainer.args
    pad = trainer.processing_class.pad_token_id
    torch.manual_seed(3)
    # 4 sequences: left-padded prompts of lengths 5, 3, 4, 5; right-padded completions of 4, 2, 3, 1
    prompt_lengths, completion_lengths, P, T = [5, 3, 4, 5], [4, 2, 3, 1], 5, 4
    prompt_ids = torch.randint(4, 20, (4, P))
    prompt_mask = (torch.arange(P) >= P - torch.tensor(prompt_lengths)[:, None]).long()
    completion_ids = torch.randint(4, 20, (4, T))
    completion_mask = (torch.arange(T) < torch.tensor(completion_lengths)[:, None]).long()
    prompt_ids, completion_ids = (
        prompt_ids.masked_fill(prompt_mask == 0, pad),
        completion_ids.masked_fill(completion_mask == 0, pad),
    )
    advantages = torch.tensor([1.2, -0.4, 0.0, -0.8])
    ref_logprobs = -torch.rand(4, T) * completion_mask
    old_logprobs = -torch.rand(4, T) * completion_mask
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "ref_per_token_logps": ref_logprobs,
        "old_per_token_logps": old_logprobs,
        "num_items_in_batch": completion_mask.sum(),  # one process, steps_per_generation 1
    }
    old_in_loss = old_logprobs
    if old_logprobs_from == "rollout":  # vLLM's sampling log-probs; NaN where vLLM could not score a token
        sampled = -torch.rand(4, T) * completion_mask
        sampled[0, 1] = float("nan")
        inputs["sampling_per_token_logps"] = sampled
        old_in_loss = torch.where(torch.isnan(sampled), old_logprobs, sampled)
    model.train()
    trainer.current_gradient_accumulation_steps = 2
    model.zero_grad()
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    got_grads = [p.grad.clone() for p in trainer.log_z_head.parameters()]

    # independently: a plain forward, full logits, log_softmax at the sampling temperature
    model.zero_grad()
    ids, mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, P - 1 : -1] / TEMPERATURE
    logprobs = torch.log_softmax(logits.float(), -1).gather(-1, completion_ids[..., None]).squeeze(-1)
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    log_z = trainer.log_z_head(pool_prompt_states(hidden[:, :P], prompt_mask))
    expected, expected_metrics = flowrl_loss(
        logprobs * completion_mask,
        old_in_loss,
        ref_logprobs,
        log_z,
        advantages,
        completion_mask,
        beta=args.flowrl_beta,
        importance_weight=args.flowrl_importance_weight,
        max_importance_weight=args.flowrl_max_importance_weight,
        sequence_weighting=sequence_weighting,
    )
    (expected / 2).backward()  # divided by the 2 accumulation steps
    torch.testing.assert_close(loss, expected / 2, atol=1e-5, rtol=1e-5)
    for got, want in zip(got_grads, (p.grad for p in trainer.log_z_head.parameters()), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # the objective's metrics, under the objective's names, with the objective's values
    for name, value in expected_metrics.items():
        assert trainer._metrics["train"][name][-1] == pytest.approx(value.item(), rel=1e-4, abs=1e-6), name
    model.zero_grad()


def _objective_metric_names() -> set[str]:
    """The names flowrl_loss reports, from a one-sequence call."""
    one = torch.zeros(1, 2)
    _, metrics = flowrl_loss(one, one, one, torch.zeros(1), torch.zeros(1), torch.ones(1, 2))
    return set(metrics)


def test_logged_metric_names_are_the_objective_names(trained: tuple[FlowRLTrainer, dict]) -> None:
    """The adapter logs what the project's trainer logs under the same names (docs/metrics.md): no
    prefix, nothing renamed; TRL's and the Trainer's own metrics keep theirs."""
    trainer, _ = trained
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert rows
    names = _objective_metric_names()
    assert {"actor/ppo_kl", "actor/ref_kl", "flowrl/importance_weight_clipped_frac"} <= names
    for row in rows:
        ours = {k for k in row if k.startswith(("flowrl/", "actor/"))}
        assert ours == names | {"actor/entropy"}
        assert row["actor/ppo_kl"] >= 0 and row["actor/ref_kl"] >= 0  # k3: never negative
        assert 0 <= row["flowrl/importance_weight_clipped_frac"] <= 1
        assert not {"entropy", "kl", "flowrl/loss", "flowrl/ref_kl", "flowrl/ppo_kl"} & set(row)


def test_log_z_ignores_left_padding(trained: tuple[FlowRLTrainer, dict]) -> None:
    trainer, _ = trained
    model = trainer.model
    short, long = torch.tensor([[7, 8, 9]]), torch.tensor([[5, 6, 7, 8, 9]])
    pad = trainer.processing_class.pad_token_id
    batch = torch.cat([torch.cat([torch.full((1, 2), pad), short], 1), long])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])

    def log_z(ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        labels = torch.full_like(ids, -100)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True,
                        log_z_prompt_length=ids.shape[1])  # fmt: skip
        return out.log_z

    batched = log_z(batch, mask)
    torch.testing.assert_close(batched[0], log_z(short, torch.ones_like(short))[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1], log_z(long, torch.ones_like(long))[0], atol=1e-5, rtol=1e-5)


def test_save_model_keeps_the_head_beside_the_weights(
    trained: tuple[FlowRLTrainer, dict], tmp_path: Path
) -> None:
    trainer, _ = trained
    trainer.save_model(str(tmp_path))
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert weights and not [k for k in weights if is_log_z_param(k)]
    head = trainer.log_z_head.state_dict()
    saved = load_file(str(tmp_path / HEAD_FILE))
    assert set(saved) == {LOG_Z_PREFIX + k for k in head}
    # the project's loaders read both: the policy alone, and the head into a fresh LogZHead
    exported = load_model(str(tmp_path)).state_dict()
    policy = {k: v for k, v in trainer.model.state_dict().items() if not is_log_z_param(k)}
    assert set(exported) == set(policy) and all(torch.equal(exported[k], policy[k]) for k in policy)
    fresh = LogZHead(trainer.log_z_head.hidden_size, num_layers=trainer.args.log_z_num_layers)
    load_log_z_head(fresh, tmp_path / HEAD_FILE)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in head.items())
    # resuming from that directory restores the head
    with torch.no_grad():
        for p in trainer.log_z_head.parameters():
            p.add_(1.0)
    trainer._load_from_checkpoint(str(tmp_path))
    assert all(torch.equal(trainer.log_z_head.state_dict()[k], v) for k, v in head.items())


def test_resume_restores_the_head_and_its_optimizer_state(model_dir: Path, tmp_path: Path) -> None:
    config = dict(max_steps=2, save_strategy="steps", save_steps=1, learning_rate=1e-3, log_z_lr=1e-2)
    first = make_trainer(model_dir, tmp_path / "a", **config)
    first.train()
    assert (tmp_path / "a" / "checkpoint-1" / HEAD_FILE).is_file()
    resumed = make_trainer(model_dir, tmp_path / "b", **config)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    # step 2 again, from step 1's policy, head, optimizer state and RNG: the same loss and the same head
    losses = {r["step"]: r["loss"] for r in first.state.log_history if "loss" in r}
    again = {r["step"]: r["loss"] for r in resumed.state.log_history if "loss" in r}
    assert again == {1: losses[1], 2: pytest.approx(losses[2], rel=1e-5)}  # step 1 is the checkpoint's log
    for k, v in first.log_z_head.state_dict().items():
        torch.testing.assert_close(resumed.log_z_head.state_dict()[k], v)


def test_head_saved_by_the_project_starts_the_trl_head(model_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(11)
    project_head = LogZHead(TINY["hidden_size"])
    save_log_z_head(project_head, tmp_path / HEAD_FILE)
    trainer = make_trainer(
        model_dir, tmp_path / "run", max_steps=1, log_z_init_path=str(tmp_path / HEAD_FILE)
    )
    ours = trainer.log_z_head.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in project_head.state_dict().items())


def test_vllm_weight_sync_leaves_out_the_head(trained: tuple[FlowRLTrainer, dict]) -> None:
    from trl.distributed import DistributedBackend
    from trl.generation.vllm_generation import VLLMGeneration

    trainer, _ = trained
    # VLLMGeneration without starting vLLM (not installed here): only its weight stream is exercised
    generation = VLLMGeneration.__new__(VLLMGeneration)
    generation.model, generation.accelerator = trainer.model, trainer.accelerator
    generation._dist = DistributedBackend(trainer.accelerator)
    unfiltered = [name for name, _ in generation._iter_named_params()]
    assert any(is_log_z_param(n) for n in unfiltered)
    exclude_log_z_from_vllm_sync(generation)
    sent = [name for name, _ in generation._iter_named_params()]
    assert sent == [n for n in unfiltered if not is_log_z_param(n)] and sent


class _FakeVLLMClient:
    def __init__(self, logprobs_mode: str) -> None:
        self.logprobs_mode = logprobs_mode

    def get_server_info(self) -> dict:  # trl's VLLMClient.get_server_info: the server's VllmConfig
        return {"model_config": {"logprobs_mode": self.logprobs_mode}}


@pytest.mark.parametrize("logprobs_mode", ["raw_logprobs", PROCESSED_LOGPROBS])
def test_rollout_logprobs_from_a_vllm_server_must_be_processed(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logprobs_mode: str
) -> None:
    """flowrl_old_logprobs='rollout' with a server: FlowRL keeps TRL's vLLM correction (and with it TRL's
    own logprobs-mode check) off, so it asks the server itself and refuses raw log-probs."""
    import trl.trainer.grpo_trainer as grpo

    class FakeVLLMGeneration:  # TRL's VLLMGeneration without a server: a weight stream and a client
        def __init__(self, model, accelerator, **kwargs) -> None:
            self.model, self.accelerator = model, accelerator
            self.vllm_client = _FakeVLLMClient(logprobs_mode)

        def _iter_named_params(self):
            yield from self.model.named_parameters()

    monkeypatch.setattr(grpo, "VLLMGeneration", FakeVLLMGeneration)
    config = dict(use_vllm=True, vllm_mode="server", flowrl_old_logprobs="rollout")
    if logprobs_mode == PROCESSED_LOGPROBS:
        trainer = make_trainer(model_dir, tmp_path, **config)
        assert trainer.args.flowrl_old_logprobs == "rollout"
    else:
        with pytest.raises(ValueError, match="--logprobs-mode raw_logprobs.*processed_logprobs"):
            make_trainer(model_dir, tmp_path, **config)


def test_prompts_over_the_cap_are_removed_and_counted(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """flowrl_max_prompt_length (the paper's 2048 by default): prompts longer than the cap, in the tokens
    the trainer generates from, leave the dataset before training; the count is logged and kept."""
    tokenizer = load_tokenizer(str(model_dir))
    rows = synthetic.rows()
    texts = list(trl_dataset(rows, tokenizer)["prompt"])  # plain text: the tiny tokenizer has no template
    lengths = [len(ids) for ids in tokenizer(text=texts)["input_ids"]]
    cap = sorted(lengths)[len(lengths) // 2]
    too_long = sum(n > cap for n in lengths)
    assert 0 < too_long < len(rows), "the tiny dataset's prompts must straddle the cap"
    assert (
        FlowRLConfig(output_dir=str(tmp_path), **CPU_RUN).flowrl_max_prompt_length
        == MAX_PROMPT_LENGTH
        == 2048
    )
    with caplog.at_level("WARNING"):
        trainer = make_trainer(model_dir, tmp_path, flowrl_max_prompt_length=cap, max_steps=1)
    assert trainer.prompts_filtered["train"] == {
        "total": len(rows), "kept": len(rows) - too_long, "filtered": too_long, "max_prompt_length": cap,
    }  # fmt: skip
    assert f"removed {too_long} of {len(rows)} train prompts" in caplog.text
    kept = [len(ids) for ids in tokenizer(text=list(trainer.train_dataset["prompt"]))["input_ids"]]
    assert len(kept) == len(rows) - too_long and max(kept) <= cap
    trainer.train()  # trains on what is left
    with pytest.raises(ValueError, match="every train prompt is longer"):
        make_trainer(model_dir, tmp_path, flowrl_max_prompt_length=min(lengths) - 1)
    uncapped = make_trainer(model_dir, tmp_path, flowrl_max_prompt_length=None)
    assert len(uncapped.train_dataset) == len(rows) and uncapped.prompts_filtered == {}


# --- log_z_mode="group": no head, each prompt's log Z estimated from all of its completions -------------


@pytest.fixture(scope="module")
def group_trained(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[FlowRLTrainer, dict]:
    out = tmp_path_factory.mktemp("group")
    tokenizer = load_tokenizer(str(model_dir))
    args = FlowRLConfig(
        output_dir=str(out),
        **{**CPU_RUN, **BATCH, "save_strategy": "steps"},
        log_z_mode="group",
        max_steps=2,
        learning_rate=1e-3,
        temperature=TEMPERATURE,
        save_steps=2,
    )
    trainer = FlowRLTrainer(
        str(model_dir),
        reward_funcs=FlowRLReward(digit_share),
        args=args,
        train_dataset=trl_dataset(synthetic.rows(), tokenizer),
        processing_class=tokenizer,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return trainer, before


def test_group_mode_trains_the_policy_without_a_head(group_trained: tuple[FlowRLTrainer, dict]) -> None:
    trainer, before = group_trained
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["flowrl/log_z"]) for r in rows)
    assert any(r["loss"] > 0 for r in rows), "the rewards must vary for the loss to mean something"
    after = dict(trainer.model.named_parameters())
    assert set(after) == set(before) and any(not torch.equal(before[n], after[n]) for n in before)
    # no head anywhere: not built, not a submodule, not in the optimizer
    assert trainer.log_z_head is None and not hasattr(trainer.model, LOG_Z_MODULE)
    assert not [n for n in after if is_log_z_param(n)]
    assert all(g.get("name") != LOG_Z_MODULE for g in trainer.optimizer.param_groups)
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in after.values() if p.requires_grad}


def test_group_mode_checkpoint_holds_the_policy_alone(
    group_trained: tuple[FlowRLTrainer, dict], tmp_path: Path
) -> None:
    trainer, _ = group_trained
    checkpoint = Path(trainer.args.output_dir) / "checkpoint-2"
    trainer.save_model(str(tmp_path))
    for directory in (checkpoint, tmp_path):
        weights = load_file(str(directory / "model.safetensors"))
        assert weights and not [k for k in weights if is_log_z_param(k)]
        assert not (directory / HEAD_FILE).exists()
    exported = load_model(str(tmp_path)).state_dict()
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in exported.items())
    trainer._load_from_checkpoint(str(checkpoint))  # resuming needs no head file


@pytest.mark.parametrize("sequence_weighting", ["mean", "length"])
def test_group_estimate_equals_group_log_z_on_the_batch(
    group_trained: tuple[FlowRLTrainer, dict], sequence_weighting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One generation batch of two prompts x 4 completions: the log Z the trainer puts into the batch is
    flowrl.objectives.group_log_z on that batch, with ell from an independent forward of the policy."""
    trainer, _ = group_trained
    monkeypatch.setitem(trainer._flowrl_kwargs, "sequence_weighting", sequence_weighting)
    model = trainer.model
    model.train()
    rows = [trainer.train_dataset[i] for i in (0, 0, 0, 0, 3, 3, 3, 3)]  # TRL's layout: n in a row
    torch.manual_seed(5)
    out = trainer._generate_and_score_completions(rows)
    log_z = out[GROUP_LOG_Z]
    assert log_z.shape == (8,) and not log_z.requires_grad

    prompt_ids, prompt_mask = out["prompt_ids"], out["prompt_mask"]
    completion_ids, mask = out["completion_ids"], out["completion_mask"]
    P = prompt_ids.shape[1]
    with torch.no_grad():
        ids, attention = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, mask], 1)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, P - 1 : -1] / TEMPERATURE
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, completion_ids[..., None]).squeeze(-1)
    logprobs = logprobs * mask
    expected = group_log_z(
        logprobs, logprobs, out["ref_per_token_logps"], out["advantages"], mask,
        num_samples_per_prompt=4, **trainer._flowrl_kwargs,
    )  # fmt: skip
    torch.testing.assert_close(log_z, expected, atol=1e-5, rtol=1e-5)
    assert torch.all(log_z[:4] == log_z[0]) and torch.all(log_z[4:] == log_z[4])
    assert out["advantages"].abs().sum() > 0 and not torch.allclose(log_z[0], log_z[4])

    # the loss takes log Z from the batch: a micro-batch's gradient is flowrl_loss's with it
    out["num_items_in_batch"] = mask.sum()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer._compute_loss(model, out)
    assert trainer._metrics["train"]["flowrl/log_z"][-1] == pytest.approx(float(log_z.mean()), rel=1e-5)
    assert math.isfinite(loss.item())


def _split_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Three prompts x 4 completions, off-policy (weights from the clamp), ragged lengths."""
    gen = torch.Generator().manual_seed(seed)
    n_rows, width = 12, 5
    mask = (torch.arange(width) < torch.randint(1, width + 1, (n_rows, 1), generator=gen)).long()
    logprobs = -torch.rand(n_rows, width, generator=gen) * 3 * mask
    return {
        "logprobs": logprobs,
        "old_logprobs": (logprobs + 0.4 * torch.randn(n_rows, width, generator=gen)) * mask,
        "ref_logprobs": -torch.rand(n_rows, width, generator=gen) * 3 * mask,
        "advantages": torch.randn(n_rows, generator=gen),
        "response_mask": mask,
        "keys": torch.tensor([11] * 4 + [22] * 4 + [33] * 4),
    }


OPTIONS = dict(beta=2.0, max_importance_weight=1.5, sequence_weighting="length")


def _two_processes(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """gathered_group_log_z on two "processes" (threads exchanging through a barrier, as accelerate's
    gather does): rows 0-5 and 6-11, so the second prompt's completions are split 2 + 2."""
    import threading

    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def run(rank: int) -> None:
        def gather(tensor: torch.Tensor) -> torch.Tensor:
            slots[rank] = tensor
            barrier.wait()
            gathered = torch.cat(slots)
            barrier.wait()  # both have read before the next gather overwrites
            return gathered

        local = {k: v[6 * rank : 6 * rank + 6] for k, v in batch.items()}
        results[rank] = gathered_group_log_z(
            **local, num_generations=4, gather=gather, process_index=rank, **OPTIONS
        )

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_group_estimate_across_processes_equals_one_process() -> None:
    batch = _split_batch()
    one = gathered_group_log_z(**batch, num_generations=4, gather=lambda t: t, process_index=0, **OPTIONS)
    expected = group_log_z(
        *(batch[k] for k in ("logprobs", "old_logprobs", "ref_logprobs", "advantages", "response_mask")),
        num_samples_per_prompt=4, **OPTIONS,
    )  # fmt: skip
    torch.testing.assert_close(one, expected)
    first, second = _two_processes(batch)
    torch.testing.assert_close(torch.cat([first, second]), expected)
    assert first[4] == second[0] == second[1]  # the split prompt: one value on both sides
    # a process alone would have estimated the split prompt from its own two completions
    alone = gathered_group_log_z(
        **{k: v[:6] for k, v in batch.items()},
        num_generations=4,
        gather=lambda t: t,
        process_index=0,
        **OPTIONS,
    )
    assert not torch.allclose(alone[4:6], first[4:6])


def test_group_estimate_refuses_a_run_of_rows_with_different_prompts() -> None:
    batch = _split_batch()
    batch["keys"][5] = 99
    with pytest.raises(RuntimeError, match="holds completions of different prompts"):
        gathered_group_log_z(**batch, num_generations=4, gather=lambda t: t, process_index=0, **OPTIONS)
    keys = prompt_keys(
        torch.tensor([[0, 7, 8], [7, 8, 9], [5, 7, 8]]), torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1]])
    )
    assert keys[0] == keys[2] != keys[1]  # left padding does not count


def test_reward_adapter_scores_rows_and_reports_failures() -> None:
    def flaky(response: str, example: dict) -> float:
        if "boom" in response:
            raise RuntimeError("boom")
        return synthetic.reward(response, example).score

    logged: dict[str, float] = {}
    rows = synthetic.rows((7, 7, 7))
    scores = FlowRLReward(flaky, num_workers=1)(
        prompts=["sum 7:"] * 3,
        completions=[" \\boxed{34}", " \\boxed{35}", "boom"],
        reward_model=[r["reward_model"] for r in rows],
        data_source=[r["data_source"] for r in rows],
        completion_ids=[[1], [2], [3]],
        trainer_state=None,
        log_metric=logged.__setitem__,
    )
    assert scores == [1.0, 0.0, None]
    assert logged["reward/status_error"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(beta=0.04), "KL coefficient"),
        (dict(scale_rewards="batch"), "scale_rewards"),
        (dict(entropy_coef=0.01), "entropy"),
        (dict(vllm_importance_sampling_correction=True), "flowrl_old_logprobs='rollout'"),
        (dict(flowrl_old_logprobs="rollout"), "use_vllm"),
        (dict(flowrl_importance_weight="clamped"), "unknown importance_weight 'clamped'.*flowrl_<name>"),
        (dict(flowrl_clip_eps=1.5, flowrl_importance_weight="clip"), "clip_eps must be in"),
        (dict(flowrl_max_prompt_length=0), "flowrl_max_prompt_length must be >= 1"),
        (dict(log_z_mode="heads"), "unknown log_z_mode 'heads'; use one of head, group"),
        (dict(log_z_mode="group", num_generations=1), "needs at least 2 per prompt; got num_generations=1"),
        (dict(log_z_mode="group", num_generations_eval=1), "set num_generations_eval >= 2"),
        (dict(log_z_mode="group", log_z_init_path="head.safetensors"), "drop log_z_init_path"),
    ],
)
def test_config_refuses_settings_that_would_change_the_objective(
    overrides: dict, match: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=match):
        FlowRLConfig(output_dir=str(tmp_path), **{**CPU_RUN, **BATCH, **overrides})


def test_the_loss_fields_are_the_objectives_options(tmp_path: Path) -> None:
    """FlowRLConfig's flowrl_* loss fields are FlowRLLossOptions field by field: its defaults and help
    (written once, next to the loss), shown by --help, and handed to the loss as those options."""
    import dataclasses

    from trl import TrlParser

    from flowrl.objectives import FlowRLLossOptions
    from flowrl.partition import DROPOUT, NUM_LAYERS

    fields = {f.name: f for f in dataclasses.fields(FlowRLConfig)}
    for name in FlowRLLossOptions.names():
        assert fields[f"flowrl_{name}"].default == FlowRLLossOptions.default_of(name), name
        assert FlowRLLossOptions.help_of(name) in fields[f"flowrl_{name}"].metadata["help"], name
    assert (fields["log_z_num_layers"].default, fields["log_z_dropout"].default) == (NUM_LAYERS, DROPOUT)
    args = FlowRLConfig(output_dir=str(tmp_path), **CPU_RUN, flowrl_beta=3.0)
    assert args.loss_options() == FlowRLLossOptions(beta=3.0)
    shown = " ".join(TrlParser([FlowRLConfig]).format_help().split())
    assert "--flowrl_beta FLOWRL_BETA" in shown and "inverse temperature of the target" in shown
    assert "--log_z_mode LOG_Z_MODE" in shown


def test_example_configs_parse() -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from trl import TrlParser

    for name in ("zero3.yaml", "zero3_multinode.yaml"):
        config = load_config_from_file(str(REPO / "examples" / "trl" / name))
        assert config.distributed_type == "DEEPSPEED" and config.deepspeed_config["zero_stage"] == 3
        assert config.deepspeed_config["zero3_save_16bit_model"], "save_model would write no head without it"
    parser = TrlParser([FlowRLConfig])
    (args,) = parser.parse_args_and_config(
        ["--config", str(REPO / "examples" / "trl" / "flowrl_math.yaml"), "--output_dir", "unused"]
        + ["--bf16", "false", "--use_cpu", "true"]
    )
    assert args.flowrl_beta == 15.0 and args.use_vllm and args.learning_rate == 1e-6
    assert args.flowrl_max_prompt_length == 2048  # the paper's prompt cap


@pytest.mark.slow  # torchrun: several processes
def test_two_process_torchrun_trains_and_saves(model_dir: Path, tmp_path: Path) -> None:
    """The example script under torchrun: 2 gloo processes (accelerate MULTI_CPU); the script reports
    the world size it saw, since a launcher that silently starts one process would also pass."""
    data = write_rows(synthetic.rows(), tmp_path / "train.jsonl")
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(SCRIPT),
    ]
    command += ["--model_name_or_path", str(model_dir), "--train_files", str(data), "--output_dir", str(out)]
    command += [
        "--reward_function",
        "flowrl.data.synthetic:reward",
        "--max_steps",
        "2",
        "--disable_tqdm",
        "true",
    ]
    command += ["--learning_rate", "1e-3", "--log_z_lr", "1e-2"]
    for key, value in {**CPU_RUN, **BATCH}.items():
        command += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["distributed_type"] == "DistributedType.MULTI_CPU"
    rows = len(synthetic.rows())  # the paper's 2048-token cap removes none of these short prompts
    assert info["prompts_filtered"]["train"] == {
        "total": rows,
        "kept": rows,
        "filtered": 0,
        "max_prompt_length": 2048,
    }
    assert f"train: 0 of {rows} prompts longer than 2048 tokens removed" in result.stdout
    losses = [r["loss"] for r in info["log_history"] if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert not [k for k in load_file(str(out / "model.safetensors")) if is_log_z_param(k)]
    initial = new_log_z_head(
        TINY["hidden_size"], FlowRLConfig(output_dir=str(tmp_path), **CPU_RUN)
    ).state_dict()
    saved = load_file(str(out / HEAD_FILE))
    assert set(saved) == {LOG_Z_PREFIX + k for k in initial}
    assert all(not torch.equal(saved[LOG_Z_PREFIX + k], v) for k, v in initial.items())


def _joined(records: list[dict]) -> dict[str, torch.Tensor]:
    """The records of one call on every process, rows concatenated in process order (each process pads
    its completions to its own longest, so the per-token tensors are padded to the longest of all)."""
    width = max(r["response_mask"].shape[1] for r in records)
    joined = {}
    for name in ("logprobs", "old_logprobs", "ref_logprobs", "response_mask"):
        joined[name] = torch.cat(
            [torch.nn.functional.pad(r[name], (0, width - r[name].shape[1])) for r in records]
        )
    for name in ("advantages", "keys"):
        joined[name] = torch.cat([r[name] for r in records])
    return joined


@pytest.mark.slow  # torchrun: several processes
def test_two_process_group_log_z_equals_one_process(model_dir: Path, tmp_path: Path) -> None:
    """log_z_mode='group' under torchrun (2 gloo processes): 3 prompts x 4 completions per generation
    batch, 6 rows per process, so the second prompt's completions are split 2 + 2. Every estimate each
    process made equals the one process's estimate on the whole batch (both processes' rows joined):
    flowrl.objectives.group_log_z, and the adapter's own function with a gather over one process."""
    data = write_rows(synthetic.rows(), tmp_path / "train.jsonl")
    out, records = tmp_path / "out", tmp_path / "records"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(PROBE), str(records)]
    command += ["--model_name_or_path", str(model_dir), "--train_files", str(data), "--output_dir", str(out)]
    command += ["--reward_function", "tests.helpers.trl_group_log_z_probe:digit_share"]
    command += [
        "--log_z_mode",
        "group",
        "--max_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--disable_tqdm",
        "true",
    ]
    for key, value in {**CPU_RUN, **BATCH, "per_device_train_batch_size": 6}.items():
        command += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2
    losses = [r["loss"] for r in info["log_history"] if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert not (out / HEAD_FILE).exists()
    assert not [k for k in load_file(str(out / "model.safetensors")) if is_log_z_param(k)]

    calls = sorted({int(p.stem.split("_call")[1]) for p in records.glob("rank0_call*.pt")})
    assert calls == [0, 1]  # one generation batch per optimizer step
    for call in calls:
        ranks = [torch.load(records / f"rank{rank}_call{call}.pt") for rank in (0, 1)]
        assert all(r["keys"].shape == (6,) for r in ranks)
        first, second = ranks[0]["keys"], ranks[1]["keys"]
        # prompt A x 4 + B x 2 | B x 2 + C x 4: B's completions are on both processes
        assert torch.all(first[:4] == first[0]) and torch.all(second[2:] == second[2])
        assert first[4] == first[5] == second[0] == second[1] != first[0]
        got = torch.cat([r["log_z"] for r in ranks])
        batch = _joined(ranks)
        options = dict(ranks[0]["options"])
        num_generations = options.pop("num_generations")
        assert num_generations == 4 and options["beta"] == 15.0
        tensors = [
            batch[k] for k in ("logprobs", "old_logprobs", "ref_logprobs", "advantages", "response_mask")
        ]
        expected = group_log_z(*tensors, num_samples_per_prompt=4, **options)
        torch.testing.assert_close(got, expected)
        one_process = gathered_group_log_z(
            *tensors, batch["keys"], num_generations=4, gather=lambda t: t, process_index=0, **options
        )
        torch.testing.assert_close(got, one_process)
        assert batch["advantages"].abs().sum() > 0, "the rewards must vary for the test to mean much"
        # the split prompt's estimate uses all four completions: not what either process's two give
        halves = [
            group_log_z(*(t[rows] for t in tensors), num_samples_per_prompt=2, **options)[0]
            for rows in (slice(4, 6), slice(6, 8))
        ]
        assert all(not torch.isclose(h, got[4]) for h in halves)


def test_peft_lora_trains_adapters_and_head_with_the_base_as_reference(
    model_dir: Path, tmp_path: Path
) -> None:
    """FlowRLTrainer with a peft LoraConfig: the base stays frozen, adapters and head train, the head is
    never wrapped nor saved with the adapters, and the reference is the model with adapters disabled."""
    from peft import LoraConfig

    tokenizer = load_tokenizer(str(model_dir))
    args = FlowRLConfig(
        output_dir=str(tmp_path / "run"),
        **{**CPU_RUN, **BATCH},
        max_steps=2,
        learning_rate=5e-2,
        log_z_lr=1e-2,
        log_z_dropout=0.0,
    )
    trainer = FlowRLTrainer(
        str(model_dir),
        reward_funcs=FlowRLReward(synthetic.reward),
        args=args,
        train_dataset=trl_dataset(synthetic.rows(), tokenizer),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    base = {
        n: p.detach().clone()
        for n, p in trainer.model.named_parameters()
        if "lora_" not in n and "log_z_head" not in n
    }
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    head = {k: v.clone() for k, v in trainer.log_z_head.state_dict().items()}
    head_params = {n: p for n, p in trainer.model.named_parameters() if "log_z_head" in n}
    assert head_params and all(p.requires_grad and "lora_" not in n for n, p in head_params.items())
    assert not any("base_layer" in n for n in head_params), "LoRA never wraps the head"
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(base[n], after[n]) for n in base), "the base is frozen"
    assert any(not torch.equal(lora[n], after[n]) for n in lora), "the adapters trained"
    assert any(not torch.equal(head[k], v) for k, v in trainer.log_z_head.state_dict().items())
    trainer.save_model(str(tmp_path / "out"))
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved) and not any("log_z" in k for k in saved)
    assert (tmp_path / "out" / "log_z_head.safetensors").is_file()
