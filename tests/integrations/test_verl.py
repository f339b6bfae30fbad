"""FlowRL on verl 0.9, on CPU: the registered loss equals flowrl_loss on verl's data structures and is
invariant to micro-batch and data-parallel splits; importing (or verl's plugin mechanisms) registers the
loss, the engine and the trainer; the head runs inside the model's forward with gradients; verl's real
FSDP2 engine (one gloo rank) trains a step whose loss and gradients match a plain transformers
computation; the head's tensors leave the rollout weight streams and the Hugging Face weights and land in
log_z_head.safetensors.

Needs verl (``make test-verl``, a separate environment: verl pins transformers <5.11); skipped without.
Not tested here (needs GPUs): more than one rank, bf16, flash-attn packing, vLLM, Ray workers; docs/verl.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import subprocess
import sys
import types
from functools import partial
from pathlib import Path

import pytest

pytest.importorskip(
    "verl", reason="verl is not installed (it needs its own environment: make test-verl, see docs/verl.md)"
)

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from verl.plugin.platform.platform_base import PlatformBase  # noqa: E402
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn  # noqa: E402
from verl.trainer.ppo.utils import need_reference_policy  # noqa: E402
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, get_trainer_cls  # noqa: E402
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass, validate_config  # noqa: E402
from verl.utils.metric import AggregationType  # noqa: E402
from verl.utils.py_functional import rename_dict  # noqa: E402
from verl.workers.engine import EngineRegistry  # noqa: E402
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead  # noqa: E402
from verl.workers.engine.utils import prepare_micro_batches  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

from flowrl.checkpoint import HEAD_FILE, load_log_z_head, save_log_z_head  # noqa: E402
from flowrl.integrations.verl import (  # noqa: E402
    FLOWRL_MODEL_TYPE,
    LOSS_MODE,
    TRAINER_MODE,
    FlowRLFSDPEngine,
    FlowRLLossOptions,
    FlowRLTrainerSync,
    LogZCapture,
    LogZSettings,
    compute_policy_loss_flowrl,
    flowrl_actor_loss,
    without_log_z_params,
)
from flowrl.integrations.verl.engine import micro_batch_prompt_positions  # noqa: E402
from flowrl.integrations.verl.head import LOG_Z_MODULE, prompt_positions  # noqa: E402
from flowrl.integrations.verl.loss import GROUP_LOG_Z, group_log_z_by_uid  # noqa: E402
from flowrl.integrations.verl.main import compose_config, propagate_plugin  # noqa: E402
from flowrl.integrations.verl.reward import compute_score  # noqa: E402
from flowrl.integrations.verl.trainer import (  # noqa: E402
    FLOWRL_DEFAULTS,
    apply_log_z_settings,
    flowrl_section,
    unprefix_flowrl_metrics,
)
from flowrl.objectives import flowrl_loss, group_log_z  # noqa: E402
from flowrl.objectives.masked import masked_mean  # noqa: E402
from flowrl.partition import LOG_Z_PREFIX, LogZHead, is_log_z_param, pool_prompt_states  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OPTIONS = FlowRLLossOptions(beta=15.0, importance_weight="clamp")
# (prompt length, response length) per sequence: ragged, so padding and packing both matter.
LENGTHS = [(3, 4), (5, 2), (2, 6), (4, 1), (6, 3), (3, 5)]
REQUIRED = ["data.train_files=/data/train.parquet", "actor_rollout_ref.model.path=/models/policy"]


# ---------------------------------------------------------------------------------------------
# A micro-batch as verl's engine sees it


def engine_output(logprobs: torch.Tensor, log_z: torch.Tensor, lengths: list) -> dict[str, torch.Tensor]:
    """The engine's model output: nested (B, prompt + response) log-probs, where response token t of a
    sequence with prompt length P sits at position P - 1 + t (the state before a token predicts it), as
    verl's engine lays it out; and log Z (B,)."""
    rows = []
    for b, (p, r) in enumerate(lengths):
        filler = torch.full((p - 1,), -7.0)  # prompt positions: never read by the loss
        rows.append(torch.cat([filler, logprobs[b, :r], torch.tensor([-9.0])]))
    offsets = torch.tensor([0] + [p + r for p, r in lengths]).cumsum(0)
    return {"log_probs": torch.nested.nested_tensor_from_jagged(torch.cat(rows), offsets), "log_z": log_z}


@dataclasses.dataclass
class Batch:
    data: object  # the TensorDict handed to the loss closure (nested, no padding)
    lengths: list  # (prompt length, response length) per sequence
    logprobs: torch.Tensor  # (B, T) leaf: the response log-probs inside the engine's output
    log_z: torch.Tensor  # (B,) leaf
    old: torch.Tensor  # (B, T) padded, zeros on padding
    ref: torch.Tensor
    advantages: torch.Tensor  # (B, T) GRPO-style broadcast
    mask: torch.Tensor  # (B, T) bool

    def model_output(self) -> dict[str, torch.Tensor]:
        return engine_output(self.logprobs, self.log_z, self.lengths)


def nested(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def make_batch(lengths=LENGTHS, *, seed: int = 0, filler: bool = False) -> Batch:
    """A micro-batch with verl's engine layout; with ``filler`` the last sequence has no response tokens
    (verl's padding samples: response_mask all zero)."""
    gen = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(r for _, r in lengths)
    mask = torch.tensor([[j < r for j in range(t)] for _, r in lengths])
    if filler:
        mask[-1] = False
    logprobs = (-torch.rand(b, t, generator=gen) * 2).requires_grad_(True)
    old = torch.where(mask, logprobs.detach() + 0.3 * torch.randn(b, t, generator=gen), 0.0)
    ref = torch.where(mask, -torch.rand(b, t, generator=gen) * 2, 0.0)
    scores = torch.randn(b, generator=gen)
    advantages = torch.where(mask, scores.unsqueeze(1), 0.0)  # verl's GRPO: the score on every token
    log_z = torch.randn(b, generator=gen).requires_grad_(True)
    prompts = [torch.randint(3, 20, (p,), generator=gen) for p, _ in lengths]
    responses = [torch.randint(3, 20, (r,), generator=gen) for _, r in lengths]
    fields = {
        "prompts": nested(prompts),
        "responses": nested(responses),
        "input_ids": nested([torch.cat([p, r]) for p, r in zip(prompts, responses, strict=True)]),
        "position_ids": nested([torch.arange(p + r) for p, r in lengths]),
        "response_mask": nested([mask[i, :r].long() for i, (_, r) in enumerate(lengths)]),
        "old_log_probs": nested([old[i, :r] for i, (_, r) in enumerate(lengths)]),
        "ref_log_prob": nested([ref[i, :r] for i, (_, r) in enumerate(lengths)]),
        "advantages": nested([advantages[i, :r] for i, (_, r) in enumerate(lengths)]),
    }
    fields["loss_mask"] = fields["response_mask"]
    data = tu.get_tensordict(tensor_dict=fields, non_tensor_dict={"use_remove_padding": True})
    return Batch(data, list(lengths), logprobs, log_z, old, ref, advantages, mask)


def set_global_counts(data, *, global_batch_size: int, batch_num_tokens: int, dp_size: int = 1) -> None:
    tu.assign_non_tensor(
        data, dp_size=dp_size, global_batch_size=global_batch_size, batch_num_tokens=batch_num_tokens
    )


@pytest.fixture(scope="module")
def actor_config():
    """verl's own actor config dataclass, built from the composed FlowRL config (as the trainer does)."""
    config = compose_config([*REQUIRED, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"])
    return omega_conf_to_dataclass(config.actor_rollout_ref.actor)


def reference_loss(batch: Batch, **kwargs):
    """flowrl_loss on the same tensors, given directly (padded), without any verl code in between."""
    return flowrl_loss(
        batch.logprobs,
        batch.old,
        batch.ref,
        batch.log_z,
        masked_mean(batch.advantages, batch.mask, dim=-1),
        batch.mask,
        beta=OPTIONS.beta,
        importance_weight=OPTIONS.importance_weight,
        **kwargs,
    )


def closure_loss(actor_config, batch: Batch):
    return flowrl_actor_loss(actor_config, batch.model_output(), batch.data, options=OPTIONS)


# ---------------------------------------------------------------------------------------------
# Registration and plugin glue


def test_importing_registers_the_loss_engine_and_trainer() -> None:
    assert POLICY_LOSS_REGISTRY[LOSS_MODE] is compute_policy_loss_flowrl
    assert get_policy_loss_fn("flowrl") is compute_policy_loss_flowrl
    for backend in ("fsdp", "fsdp2"):
        for device in ("cuda", "npu"):
            assert EngineRegistry._engines[FLOWRL_MODEL_TYPE][backend][device] is FlowRLFSDPEngine
    assert EngineRegistry._engines["language_model"]["fsdp2"]["cuda"] is FSDPEngineWithLMHead  # untouched
    assert get_trainer_cls(TRAINER_MODE) is FlowRLTrainerSync
    assert issubclass(FlowRLTrainerSync, PPOTrainerSync) and TRAINER_REGISTRY["sync"] is PPOTrainerSync


PROBE = (
    "import verl\n"
    "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY\n"
    "from verl.workers.engine import EngineRegistry\n"
    "from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY\n"
    "print('flowrl' in POLICY_LOSS_REGISTRY, 'flowrl_language_model' in EngineRegistry._engines,"
    " 'flowrl_sync' in TRAINER_REGISTRY)\n"
)


@pytest.mark.parametrize("route", ["VERL_USE_EXTERNAL_MODULES", "verl.plugins entry point"])
def test_a_fresh_verl_process_registers_flowrl_through_verls_plugin_loading(
    route: str, tmp_path: Path
) -> None:
    """What every Ray worker does: `import verl` alone must register FlowRL, through the env var the
    launcher sets, or through the entry point proposed for pyproject.toml (simulated by a dist-info)."""
    if route == "VERL_USE_EXTERNAL_MODULES":
        env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "auto"}
        env["VERL_USE_EXTERNAL_MODULES"] = "flowrl.integrations.verl"
    else:
        env = _entry_point_env(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "True True True", out.stderr[-3000:]


def _entry_point_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose `import verl` loads FlowRL through a verl.plugins entry point only (the
    one pyproject.toml declares, simulated by a dist-info on PYTHONPATH)."""
    info = tmp_path / "flowrl_verl_probe-0.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flowrl-verl-probe\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[verl.plugins]\nflowrl = flowrl.integrations.verl\n")
    env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "auto"}
    env.pop("VERL_USE_EXTERNAL_MODULES", None)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    return env


def test_a_plugin_that_fails_to_import_says_why_where_verl_would_not(tmp_path: Path) -> None:
    """verl logs a failing entry point at DEBUG and a flowrl_sync run then dies with "Unknown trainer";
    the plugin logs the cause at ERROR and leaves a flowrl_sync trainer that raises it."""
    probe = (
        "import sys\n"
        "sys.modules['flowrl.objectives'] = None  # a broken dependency of the plugin\n"
        "import verl\n"
        "from verl.trainer.ppo.v1.trainer_base import get_trainer_cls\n"
        "try:\n"
        "    get_trainer_cls('flowrl_sync')(config=None)\n"
        "except RuntimeError as exc:\n"
        "    print('RAISED', exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=_entry_point_env(tmp_path), cwd=REPO, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FlowRL's verl plugin (flowrl.integrations.verl) failed to import" in out.stderr
    assert "flowrl.objectives" in out.stderr
    raised = [line for line in out.stdout.splitlines() if line.startswith("RAISED")]
    assert raised and "failed to import" in raised[0] and "flowrl.objectives" in raised[0], out.stdout[-2000:]
    assert "Unknown trainer" not in out.stdout + out.stderr


def test_the_trainer_installs_a_picklable_flowrl_closure_on_the_actor_workers(
    actor_config, monkeypatch
) -> None:
    """on_init_end sends flowrl_actor_loss (with verl's actor config and FlowRL's options) to the actor
    workers via set_loss_fn, the RPC that Ray ships by pickling; the unpickled closure computes the loss."""
    config = compose_config(
        [*REQUIRED, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "flowrl.beta=7"]
    )

    class RecordingWorkerGroup:
        def set_loss_fn(self, loss_fn):
            self.loss_fn = loss_fn

    monkeypatch.setattr(PPOTrainerSync, "on_init_end", lambda self: None)  # its weight sync needs workers
    trainer = object.__new__(FlowRLTrainerSync)
    trainer.config, trainer.actor_rollout_wg = config, RecordingWorkerGroup()
    trainer.flowrl_options, _ = flowrl_section(config)
    trainer.on_init_end()
    shipped = pickle.loads(pickle.dumps(trainer.actor_rollout_wg.loss_fn))
    assert shipped.func is flowrl_actor_loss and shipped.keywords["options"].beta == 7.0
    batch = make_batch()
    set_global_counts(batch.data, global_batch_size=6, batch_num_tokens=int(batch.mask.sum()))
    loss, _ = shipped(model_output=batch.model_output(), data=batch.data, dp_group=None)
    expected, _ = flowrl_loss(
        batch.logprobs, batch.old, batch.ref, batch.log_z, masked_mean(batch.advantages, batch.mask, dim=-1),
        batch.mask, beta=7.0,
    )  # fmt: skip
    torch.testing.assert_close(loss, expected)


# ---------------------------------------------------------------------------------------------
# The loss on verl's data structures


def test_the_closure_equals_flowrl_loss_on_the_same_tensors(actor_config) -> None:
    batch = make_batch()
    set_global_counts(batch.data, global_batch_size=len(LENGTHS), batch_num_tokens=int(batch.mask.sum()))
    loss, metrics = closure_loss(actor_config, batch)
    expected, expected_metrics = reference_loss(batch)
    torch.testing.assert_close(loss, expected)
    for name, value in expected_metrics.items():
        assert metrics[name].aggregation == AggregationType.MEAN
        assert metrics[name].aggregate() == pytest.approx(float(value), rel=1e-5, abs=1e-6)
    # exactly the objective's names; the loss is the engine's own "loss" metric (actor/loss), not repeated
    assert set(metrics) == set(expected_metrics)
    assert {"actor/ppo_kl", "actor/ref_kl", "flowrl/importance_weight_clipped_frac"} <= set(metrics)
    got = torch.autograd.grad(loss, [batch.logprobs, batch.log_z])
    want = torch.autograd.grad(expected, [batch.logprobs, batch.log_z])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert got[1].abs().sum() > 0 and got[0][batch.mask].abs().sum() > 0


def test_the_trainer_logs_flowrl_metrics_under_their_own_names(actor_config, monkeypatch) -> None:
    """verl's _update_actor prefixes every actor metric with actor/ (rename_dict); the FlowRL trainer
    takes it off the flowrl/* names again, so verl logs the names the project's trainer and TRL log."""
    batch = make_batch()
    set_global_counts(batch.data, global_batch_size=len(LENGTHS), batch_num_tokens=int(batch.mask.sum()))
    _, metrics = closure_loss(actor_config, batch)
    worker_metrics = {**{k: m.aggregate() for k, m in metrics.items()}, "loss": 1.5, "grad_norm": 0.3}

    def verl_update_actor(self, batch, metrics):  # what PPOTrainer._update_actor does with the names
        metrics.update(rename_dict(worker_metrics, "actor/"))
        return batch

    monkeypatch.setattr(PPOTrainerSync, "_update_actor", verl_update_actor)
    trainer = object.__new__(FlowRLTrainerSync)
    trainer.log_z_settings = LogZSettings()
    logged = {"training/global_step": 1}
    assert trainer._update_actor("batch", metrics=logged) == "batch"
    assert not any(k.startswith("actor/flowrl/") for k in logged)
    assert {k for k in metrics if k.startswith("flowrl/")} <= set(logged)
    assert {"actor/ppo_kl", "actor/ref_kl", "actor/loss", "actor/grad_norm", "training/global_step"} <= set(
        logged
    )
    assert unprefix_flowrl_metrics({"actor/flowrl/log_z": 1, "actor/flowrl_x": 2, "flowrl/a": 3}) == {
        "flowrl/log_z": 1,
        "actor/flowrl_x": 2,
        "flowrl/a": 3,
    }


def test_token_mean_weights_sequences_by_length(actor_config) -> None:
    config = dataclasses.replace(actor_config, loss_agg_mode="token-mean", global_batch_info={})
    batch = make_batch(seed=1)
    set_global_counts(batch.data, global_batch_size=len(LENGTHS), batch_num_tokens=int(batch.mask.sum()))
    loss, _ = closure_loss(config, batch)
    expected, _ = reference_loss(batch, sequence_weighting="length")
    torch.testing.assert_close(loss, expected)


def test_filler_sequences_count_in_the_batch_size_but_add_nothing(actor_config) -> None:
    """verl pads batches with samples whose response mask is all zero; like agg_loss, FlowRL leaves them
    out of the sum and keeps them in global_batch_size (the mini-batch's size is fixed)."""
    batch = make_batch(seed=2, filler=True)
    set_global_counts(batch.data, global_batch_size=len(LENGTHS), batch_num_tokens=int(batch.mask.sum()))
    loss, _ = closure_loss(actor_config, batch)
    real = slice(0, len(LENGTHS) - 1)
    expected, _ = flowrl_loss(
        batch.logprobs[real], batch.old[real], batch.ref[real], batch.log_z[real],
        masked_mean(batch.advantages, batch.mask, dim=-1)[real], batch.mask[real],
        beta=OPTIONS.beta, normalizer=float(len(LENGTHS)),
    )  # fmt: skip
    torch.testing.assert_close(loss, expected)
    (grad_log_z,) = torch.autograd.grad(loss, [batch.log_z])
    assert grad_log_z[-1] == 0 and grad_log_z[:-1].abs().min() > 0


@pytest.mark.parametrize("loss_agg_mode", ["seq-mean-token-mean", "token-mean"])
def test_the_reduction_does_not_change_with_micro_batches_or_data_parallel_size(
    actor_config, loss_agg_mode
) -> None:
    """verl's own splitters: fixed micro-batch sizes, dynamic (token-budget, reordering) micro-batches, and
    two data-parallel ranks (whose gradients FSDP averages). Losses and gradients match the whole batch."""
    config = dataclasses.replace(actor_config, loss_agg_mode=loss_agg_mode, global_batch_info={})
    batch = make_batch(seed=3)
    counts = dict(global_batch_size=len(LENGTHS), batch_num_tokens=int(batch.mask.sum()))
    set_global_counts(batch.data, **counts)
    whole, _ = closure_loss(config, batch)
    whole_grads = torch.autograd.grad(whole, [batch.logprobs, batch.log_z])

    def accumulate(micro_batches, dp_size=1):
        total = 0.0
        for micro in micro_batches:
            loss, _ = flowrl_actor_loss(config, _model_output_for(batch, micro), micro, options=OPTIONS)
            total = total + loss
        return total

    splits = {}
    for name, extra in {
        "fixed micro-batches of 2": dict(use_dynamic_bsz=False, micro_batch_size_per_gpu=2),
        "dynamic micro-batches of <= 10 tokens": dict(use_dynamic_bsz=True, max_token_len_per_gpu=10),
    }.items():
        data = batch.data.clone()
        tu.assign_non_tensor(data, **extra)
        micro_batches, _ = prepare_micro_batches(data)
        assert len(micro_batches) > 1
        splits[name] = accumulate(micro_batches)
    ranks = [tu.index_select_tensor_dict(batch.data, idx) for idx in ([0, 2, 4], [1, 3, 5])]
    per_rank = []
    for rank in ranks:
        set_global_counts(rank, **counts, dp_size=2)
        per_rank.append(accumulate([rank]))
    splits["2 data-parallel ranks (gradients averaged)"] = sum(per_rank) / 2
    for name, total in splits.items():
        torch.testing.assert_close(total, whole, msg=name)
        for g, w in zip(torch.autograd.grad(total, [batch.logprobs, batch.log_z]), whole_grads, strict=True):
            torch.testing.assert_close(g, w, msg=name)


@pytest.mark.parametrize(
    ("loss_agg_mode", "loss_scale_factor"),
    [
        ("seq-mean-token-mean", None),
        ("token-mean", None),
        ("seq-mean-token-sum-norm", None),  # verl's default factor: the padded response length
        ("seq-mean-token-sum-norm", 4096),  # actor.loss_scale_factor, a constant
    ],
)
def test_each_mode_aggregates_as_verls_agg_loss_does(actor_config, loss_agg_mode, loss_scale_factor) -> None:
    """verl's own agg_loss (with loss_scale_factor, as ppo_loss passes it) on a loss matrix that holds each
    sequence's w * delta**2 on its response tokens is the oracle: loss and gradients match on two
    data-parallel shards, and the factor divides the loss."""
    from verl.trainer.ppo.core_algos import agg_loss

    config = dataclasses.replace(
        actor_config, loss_agg_mode=loss_agg_mode, loss_scale_factor=loss_scale_factor, global_batch_info={}
    )
    batch = make_batch(seed=5, filler=True)
    counts = dict(global_batch_size=len(LENGTHS), batch_num_tokens=int(batch.mask.sum()))
    total = 0.0
    for rows in ([0, 2, 4], [1, 3, 5]):
        shard = tu.index_select_tensor_dict(batch.data, rows)
        set_global_counts(shard, **counts, dp_size=2)
        loss, _ = flowrl_actor_loss(config, _model_output_for(batch, shard), shard, options=OPTIONS)
        total = total + loss / 2  # FSDP averages the ranks' gradients
    terms = torch.cat(
        [
            flowrl_loss(
                batch.logprobs[i : i + 1], batch.old[i : i + 1], batch.ref[i : i + 1], batch.log_z[i : i + 1],
                masked_mean(batch.advantages, batch.mask, dim=-1)[i : i + 1], batch.mask[i : i + 1],
                beta=OPTIONS.beta,
            )[0].reshape(1)
            if batch.mask[i].any() else torch.zeros(1)
            for i in range(len(LENGTHS))
        ]
    )  # fmt: skip
    expected = 0.0
    for rows in ([0, 2, 4], [1, 3, 5]):
        horizon = max(LENGTHS[i][1] for i in rows)  # the shard's padded response length
        mask = batch.mask[rows][:, :horizon].float()
        loss_mat = terms[rows].unsqueeze(1) * mask
        expected = expected + agg_loss(
            loss_mat, mask, loss_agg_mode, dp_size=2, loss_scale_factor=loss_scale_factor, **counts
        ) / 2  # fmt: skip
    torch.testing.assert_close(total, expected)
    for got, want in zip(
        torch.autograd.grad(total, [batch.logprobs, batch.log_z], retain_graph=True),
        torch.autograd.grad(expected, [batch.logprobs, batch.log_z]),
        strict=True,
    ):
        torch.testing.assert_close(got, want)
    if loss_scale_factor is not None:
        unscaled = dataclasses.replace(config, loss_scale_factor=1, global_batch_info={})
        shard = tu.index_select_tensor_dict(batch.data, [0, 2, 4])
        set_global_counts(shard, **counts, dp_size=2)
        one, _ = flowrl_actor_loss(unscaled, _model_output_for(batch, shard), shard, options=OPTIONS)
        scaled, _ = flowrl_actor_loss(config, _model_output_for(batch, shard), shard, options=OPTIONS)
        torch.testing.assert_close(scaled * loss_scale_factor, one)


def _model_output_for(batch: Batch, micro) -> dict[str, torch.Tensor]:
    """The engine's output for a micro-batch: rows of the whole batch's output, picked by their prompts."""
    prompts = [p.tolist() for p in batch.data["prompts"].unbind()]
    order = [prompts.index(p.tolist()) for p in micro["prompts"].unbind()]
    return engine_output(batch.logprobs[order], batch.log_z[order], [batch.lengths[i] for i in order])


def test_the_stock_ppo_loss_with_loss_mode_flowrl_fails_with_the_fix(actor_config) -> None:
    """verl's own closure cannot hand the policy loss log Z and the reference log-probs: refuse, say why."""
    batch = make_batch()
    set_global_counts(batch.data, global_batch_size=6, batch_num_tokens=int(batch.mask.sum()))
    with pytest.raises(ValueError, match="trainer_mode=flowrl_sync"):
        ppo_loss(actor_config, batch.model_output(), batch.data)


def test_the_closure_names_what_is_missing(actor_config) -> None:
    batch = make_batch()
    set_global_counts(batch.data, global_batch_size=6, batch_num_tokens=int(batch.mask.sum()))
    with pytest.raises(ValueError, match="model_type=flowrl_language_model"):
        flowrl_actor_loss(
            actor_config, {"log_probs": batch.model_output()["log_probs"]}, batch.data, options=OPTIONS
        )
    with pytest.raises(ValueError, match="use_kl_loss=true"):
        flowrl_actor_loss(
            actor_config, batch.model_output(), batch.data.exclude("ref_log_prob"), options=OPTIONS
        )


# ---------------------------------------------------------------------------------------------
# Config


def test_the_composed_config_is_a_flowrl_run_and_bad_overrides_name_the_fix() -> None:
    config = compose_config([*REQUIRED, "flowrl.log_z.num_layers=1"])
    assert config.trainer.v1.trainer_mode == TRAINER_MODE
    assert config.actor_rollout_ref.model.model_type == FLOWRL_MODEL_TYPE
    options, settings = flowrl_section(config)
    assert options == FlowRLLossOptions() and settings.num_layers == 1
    apply_log_z_settings(config, settings)
    assert LogZSettings.from_override_config(config.actor_rollout_ref.model.override_config) == settings
    for override, fix in [
        ("algorithm.adv_estimator=gae", "adv_estimator=grpo"),
        ("actor_rollout_ref.actor.use_kl_loss=false", "use_kl_loss=true"),
        ("actor_rollout_ref.actor.kl_loss_coef=0.001", "kl_loss_coef"),
        ("actor_rollout_ref.actor.loss_agg_mode=token-sum", "seq-mean-token-mean"),
        ("actor_rollout_ref.actor.loss_scale_factor=4096", "loss_scale_factor=4096 applies to"),
        ("actor_rollout_ref.actor.strategy=fsdp", "fsdp2"),
        ("flowrl.importance_weight=sometimes", "clamp"),
    ]:
        with pytest.raises(ValueError, match=fix):
            compose_config([*REQUIRED, override])


SCRIPTS = sorted((REPO / "configs" / "verl").glob("*.sh"))


def script_overrides(script: Path, tmp_path: Path, model_path: str = "/models/policy") -> list[str]:
    """The KEY=VALUE overrides a launch script passes to the launcher (the launch itself needs GPUs)."""
    echo = tmp_path / "python"
    echo.write_text('#!/bin/sh\nshift 2\nprintf "%s\\n" "$@"\n')  # drops "-m flowrl.integrations.verl.main"
    echo.chmod(0o755)
    env = {**os.environ, "PYTHON": str(echo), "MODEL_PATH": model_path, "DATA_DIR": "/data"}
    out = subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, check=True, timeout=60
    )
    return out.stdout.splitlines()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_paper_launch_scripts_compose_valid_flowrl_configs(script: Path, tmp_path: Path) -> None:
    """Each script's overrides against verl's real config schema and verl's own validation."""
    config = compose_config(script_overrides(script, tmp_path))
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=False)
    assert config.actor_rollout_ref.actor.policy_loss.loss_mode == LOSS_MODE
    assert config.actor_rollout_ref.rollout.n == 8 and config.data.max_response_length == 8192
    assert config.actor_rollout_ref.actor.ppo_mini_batch_size == 32  # prompts: 256 sequences per step


class _Built(Exception):
    """Raised by the stand-in for verl's TrainingWorker with the config verl built for it."""


class _RecordingTrainingWorker:
    def __init__(self, config) -> None:
        raise _Built(config)


def _leaves(value, prefix: str, out: dict) -> dict:
    """Flatten dataclasses and mappings into dotted leaves (objects such as tokenizers are left out)."""
    if dataclasses.is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if hasattr(value, "items"):
        for key, item in value.items():
            _leaves(item, f"{prefix}.{key}", out)
    elif value is None or isinstance(value, (str, int, float, bool, list, tuple)):
        out[prefix] = list(value) if isinstance(value, tuple) else value
    return out


def what_verl_reads(config) -> dict:
    """The values a FlowRL run consumes, built from a composed config by verl's own code.

    * ``engine.*``: the TrainingWorkerConfig (model, engine, optimizer, checkpoint configs) that verl's
      real ``ActorRolloutRefWorker.init_model`` builds for the actor's FSDP engine, after the FlowRL
      trainer has written the head's settings into the model config (the engine reads nothing else);
    * ``loss.*``: what the FlowRL loss closure reads from verl's ActorConfig, and the FlowRL options;
    * ``rollout.*``: the RolloutConfig ``init_model`` builds for vLLM/SGLang;
    * ``driver.*``: the sections verl's trainer, dataset and reward loop read from the DictConfig itself
      (data, trainer, reward, algorithm), and the one actor key the trainer reads there
      (``ppo_mini_batch_size``, verl/trainer/ppo/v1/trainer_base.py).

    An ActorConfig field outside these (``actor.grad_clip``, which nothing in verl 0.9.1 reads) is not
    included: a key that changes nothing here is dead.
    """
    import copy

    from omegaconf import OmegaConf
    from verl.workers.engine_workers import ActorRolloutRefWorker

    config = copy.deepcopy(config)
    options, settings = flowrl_section(config)
    apply_log_z_settings(config, settings)  # what FlowRLTrainerSync does before the workers start
    worker = object.__new__(ActorRolloutRefWorker)
    worker.config, worker.role, worker.actor_worker_cls = (
        config.actor_rollout_ref,
        "actor",
        _RecordingTrainingWorker,
    )
    worker.distillation_enabled, worker.distillation_config, worker._omega_profiler_config = False, None, {}
    with pytest.raises(_Built) as built:
        ActorRolloutRefWorker.init_model(worker)
    actor = worker.loss_fn.keywords["config"]
    loss = {
        "loss_agg_mode": actor.loss_agg_mode,
        "loss_mode": actor.policy_loss.loss_mode,
        "loss_scale_factor": actor.loss_scale_factor,
        "options": options,
    }
    driver = {
        key: OmegaConf.to_container(config[key], resolve=True)
        for key in ("data", "trainer", "reward", "algorithm")
    }
    driver["ppo_mini_batch_size"] = config.actor_rollout_ref.actor.ppo_mini_batch_size
    view: dict = {}
    _leaves(built.value.args[0], "engine", view)
    _leaves(loss, "loss", view)
    _leaves(omega_conf_to_dataclass(config.actor_rollout_ref.rollout), "rollout", view)
    _leaves(driver, "driver", view)
    return view


def _changed_value(key: str, value: str, other_model: Path) -> str:
    """A different valid value for an override: flipped, doubled, halved, or another choice/name."""
    choices = {"actor_rollout_ref.rollout.name": "sglang", "flowrl.importance_weight": "clip"}
    if key in choices:
        return choices[key]
    if key == "actor_rollout_ref.model.path":
        return str(other_model)
    if value in ("true", "false"):
        return "false" if value == "true" else "true"
    for kind, change in ((int, lambda v: v * 2 if v > 0 else v - 1), (float, lambda v: v / 2)):
        try:
            return str(change(kind(value)))
        except ValueError:
            pass
    return value + "_changed"


def _matches(found, wanted: str) -> bool:
    if isinstance(found, bool) or isinstance(found, str):
        return str(found).lower() == wanted.lower()
    if isinstance(found, (int, float)):
        try:
            return float(found) == float(wanted)
        except ValueError:
            return False
    return False


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_launch_script_key_reaches_what_verl_reads(
    script: Path, tmp_path: Path, model_dir: Path
) -> None:
    """Change one override at a time and see the new value arrive in what verl builds and reads
    (:func:`what_verl_reads`): a key verl parses but never reads (the scripts' former
    ``actor.grad_clip=1.0``; clipping is ``actor.optim.clip_grad``) changes nothing there and fails."""
    import shutil

    other_model = tmp_path / "other_model"
    shutil.copytree(model_dir, other_model)
    overrides = script_overrides(script, tmp_path, model_path=str(model_dir))
    base = what_verl_reads(compose_config(overrides))
    assert base["engine.optimizer_config.clip_grad"] == 1.0  # the paper's grad clip reaches the engine
    dead = []
    for i, override in enumerate(overrides):
        key, value = override.split("=", 1)
        changed = _changed_value(key, value, other_model)
        try:
            view = what_verl_reads(compose_config([*overrides[:i], f"{key}={changed}", *overrides[i + 1 :]]))
        except Exception as exc:  # verl's own validation read the new value and refused it: it is live
            if key.rsplit(".", 1)[-1] not in str(exc):
                raise
            continue
        arrived = [
            name for name, found in view.items() if found != base.get(name) and _matches(found, changed)
        ]
        if not arrived:
            dead.append(f"{key} ({value} -> {changed})")
    assert not dead, f"overrides that reach nothing verl reads: {dead}"


def test_the_logger_is_the_console_unless_wandb_is_configured(monkeypatch, tmp_path: Path) -> None:
    """verl's default trainer.logger is [console, wandb], and W&B without credentials fails at its login;
    the launcher logs to the console unless W&B can log in (or the user chose)."""
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    assert list(compose_config(REQUIRED).trainer.logger) == ["console"]
    chosen = compose_config([*REQUIRED, "trainer.logger=[console,tensorboard]"])
    assert list(chosen.trainer.logger) == ["console", "tensorboard"]
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert list(compose_config(REQUIRED).trainer.logger) == ["console", "wandb"]
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert list(compose_config(REQUIRED).trainer.logger) == ["console"]
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert list(compose_config(REQUIRED).trainer.logger) == ["console", "wandb"]


def test_the_launcher_makes_every_ray_process_import_the_plugin(monkeypatch) -> None:
    """Through the environment of a local Ray cluster and the runtime environment run_ppo merges."""
    from omegaconf import OmegaConf
    from verl.trainer.constants_ppo import get_ppo_ray_runtime_env

    monkeypatch.setenv("VERL_USE_EXTERNAL_MODULES", "other.plugin")
    config = compose_config(REQUIRED)
    propagate_plugin(config)
    assert os.environ["VERL_USE_EXTERNAL_MODULES"] == "other.plugin,flowrl.integrations.verl"
    runtime_env = OmegaConf.merge(get_ppo_ray_runtime_env(config), config.ray_kwargs.ray_init.runtime_env)
    assert runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES == "other.plugin,flowrl.integrations.verl"
    assert config.actor_rollout_ref.model.external_lib == "flowrl.integrations.verl"


def test_the_reward_function_scores_as_the_projects_trainer_does() -> None:
    """reward.custom_reward_function.path=pkg://flowrl.integrations.verl.reward (the launch scripts')."""
    assert compute_score("math_dapo", "So it is 4.\nAnswer: 4", "4") == 1.0
    # DAPO data: -1 when wrong (docs/algorithm.md#math)
    assert compute_score("math_dapo", "Answer: 5", "4") == -1.0
    assert compute_score("aime24", "The answer is \\boxed{7}.", "7") == 1.0
    with pytest.raises(ValueError, match="no reward function"):
        compute_score("no_such_source", "Answer: 1", "1")


# ---------------------------------------------------------------------------------------------
# The head inside the model's forward


def tiny_policy(model_dir: Path, settings: LogZSettings | None = None):
    from transformers import AutoModelForCausalLM

    settings = LogZSettings(dropout=0.0) if settings is None else settings
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(0)
    head = LogZHead(model.config.hidden_size, num_layers=settings.num_layers, dropout=settings.dropout)
    return model, LogZCapture(model, head, settings)


def test_the_head_is_a_submodule_whose_keys_carry_the_prefix(model_dir: Path) -> None:
    model, capture = tiny_policy(model_dir)
    assert getattr(model, LOG_Z_MODULE) is capture.head
    head_keys = [k for k in model.state_dict() if is_log_z_param(k)]
    assert head_keys and all(k.startswith(LOG_Z_PREFIX) for k in head_keys)
    assert {k[len(LOG_Z_PREFIX) :] for k in head_keys} == set(capture.head.state_dict())


def test_padded_layout_log_z_equals_pooling_each_prompt_alone(model_dir: Path) -> None:
    """verl without remove-padding: right-padded [prompt | response] rows. log Z comes out of the same
    forward as the logits, equals head(mean of the prompt's own final states), and trains the head."""
    model, capture = tiny_policy(model_dir)
    batch = make_batch()
    lengths = torch.tensor([p + r for p, r in LENGTHS])
    tu.assign_non_tensor(batch.data, use_remove_padding=False)
    index, mask = micro_batch_prompt_positions(batch.data)
    ids = torch.nested.to_padded_tensor(batch.data["input_ids"], 0)
    attention = (torch.arange(ids.shape[1]) < lengths.unsqueeze(1)).long()
    capture.arm(index, mask)
    logits = model(input_ids=ids, attention_mask=attention).logits
    log_z = capture.pop()
    for b, prompt in enumerate(batch.data["prompts"].unbind()):
        alone = model.base_model(input_ids=prompt.unsqueeze(0)).last_hidden_state
        expected = capture.head(pool_prompt_states(alone, torch.ones(1, len(prompt))))
        torch.testing.assert_close(log_z[b : b + 1], expected, atol=1e-5, rtol=1e-5)
    (log_z.sum() + 0 * logits.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in capture.head.parameters())
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0  # log Z's input is not detached


def test_packed_layout_pools_exactly_each_prompts_positions(model_dir: Path) -> None:
    """verl with remove-padding: one row of all sequences back to back (its varlen attention keeps them
    apart on GPU; here only the position bookkeeping is checked, against the same forward's states)."""
    model, capture = tiny_policy(model_dir)
    batch = make_batch()
    index, mask = micro_batch_prompt_positions(batch.data)
    packed = batch.data["input_ids"].values().unsqueeze(0)
    states = {}
    hook = model.base_model.register_forward_hook(lambda m, a, out: states.update(h=out.last_hidden_state))
    capture.arm(index, mask)
    model(input_ids=packed, position_ids=batch.data["position_ids"].values().unsqueeze(0))
    hook.remove()
    log_z = capture.pop()
    start = 0
    for b, (p, r) in enumerate(LENGTHS):
        expected = capture.head(states["h"][0, start : start + p].mean(0, keepdim=True))
        torch.testing.assert_close(log_z[b : b + 1], expected)
        start += p + r
    assert torch.equal(packed[0][index][mask], torch.cat(list(batch.data["prompts"].unbind())))


def test_prompt_lengths_read_from_padded_prompts_too() -> None:
    """The trainer may hand the prompts left-padded with an attention mask instead of nested."""
    batch = make_batch()
    width = max(p for p, _ in LENGTHS)
    prompts = torch.stack(
        [torch.cat([torch.zeros(width - len(p), dtype=p.dtype), p]) for p in batch.data["prompts"].unbind()]
    )
    attention = torch.stack([(torch.arange(width) >= width - p).long() for p, _ in LENGTHS])
    data = batch.data.exclude("prompts")
    data["prompts"] = prompts
    data["attention_mask"] = torch.cat([attention, torch.ones(len(LENGTHS), 1, dtype=torch.long)], 1)
    for got, want in zip(
        micro_batch_prompt_positions(data), micro_batch_prompt_positions(batch.data), strict=True
    ):
        assert torch.equal(got, want)


def test_unarmed_forwards_run_no_head_and_detach_input_stops_the_backbone_gradient(
    model_dir: Path,
) -> None:
    model, capture = tiny_policy(model_dir, LogZSettings(dropout=0.0, detach_input=True))
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids)  # a log-prob pass: nothing armed
    with pytest.raises(RuntimeError, match="arm"):
        capture.pop()
    index, mask = prompt_positions(torch.tensor([4]), torch.tensor([2]), packed=True)
    capture.arm(index, mask)
    model(input_ids=ids)
    capture.pop().sum().backward()
    assert model.model.embed_tokens.weight.grad is None
    assert all(p.grad is not None for p in capture.head.parameters())


# ---------------------------------------------------------------------------------------------
# Weights: rollout sync, checkpoint file, Hugging Face export


def test_the_weight_filter_drops_every_head_key_and_keeps_the_rest(model_dir: Path) -> None:
    model, _ = tiny_policy(model_dir)
    state = model.state_dict()
    consumed = []

    def stream():
        for name, tensor in state.items():
            consumed.append(name)  # producing an item may be a collective: all must be produced
            yield name, tensor

    kept = dict(without_log_z_params(stream()))
    assert consumed == list(state)
    assert set(kept) == {k for k in state if not k.startswith(LOG_Z_PREFIX)} and not any(
        map(is_log_z_param, kept)
    )
    assert any(k.startswith(LOG_Z_PREFIX) for k in state)
    # (name, shard, spec) triples of get_per_tensor_param_shard, and FSDP1-style wrapped names
    triples = [("module.log_z_head.layers.0.weight", 1, None), ("module.model.norm.weight", 2, None)]
    assert list(without_log_z_params(triples)) == [triples[1]]


# ---------------------------------------------------------------------------------------------
# verl's real FSDP2 engine, on CPU: one gloo rank, a CPU platform for verl's device layer


class CPUPlatform(PlatformBase):
    """verl ships CUDA/NPU/ROCm platforms only; this lets its engine code run on CPU with gloo.
    Test-only: verl's engine is registered for cuda/npu, and no CPU run is supported by verl itself."""

    device_name = property(lambda self: "cpu")
    vendor_name = property(lambda self: "cpu")
    device_module = property(lambda self: _CPU_MODULE)

    def is_available(self):
        return True

    def current_device(self):
        return "cpu"

    def device_count(self):
        return 1

    def set_device(self, device_index):
        pass

    def synchronize(self, device_index=None):
        pass

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    def manual_seed_all(self, seed):
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings):
        pass

    def empty_cache(self):
        pass

    def get_device_capability(self, device_index=0):
        return None, None

    def communication_backend_name(self):
        return "gloo"

    def visible_devices_envvar(self):
        return "CPU_VISIBLE_DEVICES"

    def nvtx_range(self, msg):
        return contextlib.nullcontext()

    def profiler_start(self):
        pass

    def profiler_stop(self):
        pass

    def ray_resource_name(self):
        return "CPU"

    def ray_noset_envvars(self):
        return []

    def is_ipc_supported(self):
        return False

    def cudart(self):
        return None


_CPU_MODULE = types.SimpleNamespace(
    **{name: getattr(torch.cpu, name) for name in dir(torch.cpu) if not name.startswith("_")},
    **{
        name: (lambda *args, **kwargs: 0)
        for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved")
    },
    mem_get_info=lambda *args, **kwargs: (0, 0),
    empty_cache=lambda: None,
    get_rng_state=torch.get_rng_state,  # verl's checkpoints save and restore the device RNG
    set_rng_state=torch.set_rng_state,
)


@pytest.fixture(scope="module")
def cpu_engine(model_dir: Path, tmp_path_factory):
    """A factory of verl FSDP2 engines of model type flowrl_language_model on the tiny model."""
    from verl.plugin.platform import platform_manager
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig

    if torch.distributed.is_initialized():
        pytest.skip("another test left a torch.distributed process group in this process")
    previous = platform_manager._current_platform
    platform_manager.set_platform(CPUPlatform())
    store = tmp_path_factory.mktemp("dist") / "store"
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    registry = EngineRegistry._engines[FLOWRL_MODEL_TYPE]["fsdp2"]
    registry["cpu"] = FlowRLFSDPEngine

    def build(
        *,
        forward_only: bool = False,
        initialize: bool = True,
        init_path: str | None = None,
        lora_rank: int = 0,
        mode: str = "head",
    ) -> FlowRLFSDPEngine:
        settings = LogZSettings(mode=mode, num_layers=3, dropout=0.0, init_path=init_path)
        model_config = HFModelConfig(
            path=str(model_dir),
            override_config={"attn_implementation": "sdpa", **settings.to_override_config()},
            use_remove_padding=False,  # the packed path needs flash-attn's varlen kernels (GPU)
            enable_gradient_checkpointing=False,
            model_type=FLOWRL_MODEL_TYPE,
            lora_rank=lora_rank,  # verl's defaults otherwise: target_modules all-linear, alpha 16
        )
        fp32 = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
        engine_config = FSDPEngineConfig(
            strategy="fsdp2", use_torch_compile=False, forward_only=forward_only, mixed_precision=fp32
        )
        optimizer_config = FSDPOptimizerConfig(
            lr=1e-2,
            weight_decay=0.0,
            total_training_steps=10,
            clip_grad=1e9,  # gradients kept as computed
        )
        checkpoint_config = CheckpointConfig(save_contents=["model", "optimizer", "extra", "hf_model"])
        engine = EngineRegistry.new(
            model_type=FLOWRL_MODEL_TYPE,
            backend="fsdp2",
            model_config=model_config,
            engine_config=engine_config,
            optimizer_config=optimizer_config,
            checkpoint_config=checkpoint_config,
        )
        if initialize:
            engine.initialize()
        return engine

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VERL_ENGINE_DEVICE", "cpu")
        yield build
    registry.pop("cpu")
    torch.distributed.destroy_process_group()
    platform_manager._current_platform = previous


def engine_batch(**extra):
    batch = make_batch(seed=4)
    tu.assign_non_tensor(
        batch.data,
        use_remove_padding=False,
        use_dynamic_bsz=False,
        micro_batch_size_per_gpu=2,
        use_fused_kernels=False,
        temperature=1.0,
        global_batch_size=len(LENGTHS),
        **extra,
    )
    return batch


def full_state(engine) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor().detach().clone() for k, v in engine.module.state_dict().items()}


def expected_step(
    state: dict[str, torch.Tensor], model_dir: Path, batch: Batch
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The same step computed without verl: a plain transformers model with the engine's weights, each
    sequence alone, log Z from the prompt's own final states, flowrl_loss; its loss and gradients."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    head = LogZHead(model.config.hidden_size, num_layers=3, dropout=0.0)
    model.load_state_dict({k: v for k, v in state.items() if not is_log_z_param(k)})
    head.load_state_dict({k[len(LOG_Z_PREFIX) :]: v for k, v in state.items() if is_log_z_param(k)})
    rows, log_z = [], []
    pairs = zip(batch.data["prompts"].unbind(), batch.data["responses"].unbind(), strict=True)
    for prompt, response in pairs:
        ids = torch.cat([prompt, response]).unsqueeze(0)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        rows.append(torch.log_softmax(logits, -1).gather(-1, response.unsqueeze(-1)).squeeze(-1))
        states = model.base_model(input_ids=prompt.unsqueeze(0)).last_hidden_state
        log_z.append(head(pool_prompt_states(states, torch.ones(1, len(prompt)))))
    logprobs = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    loss, _ = flowrl_loss(
        logprobs, batch.old, batch.ref, torch.cat(log_z), masked_mean(batch.advantages, batch.mask, dim=-1),
        batch.mask, beta=OPTIONS.beta,
    )  # fmt: skip
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    grads.update({LOG_Z_PREFIX + name: p.grad for name, p in head.named_parameters()})
    return loss.detach(), grads


def test_the_fsdp2_engine_trains_flowrl_end_to_end(cpu_engine, model_dir: Path, actor_config) -> None:
    """verl's engine with FlowRL's model type: the head is built into the FSDP2 model, log Z comes out of
    the forward, and the summed micro-batch losses and the gradients of every parameter (the head's
    included) equal flowrl_loss's computed without verl; the optimizer step moves every parameter."""
    engine = cpu_engine()
    head_names = [n for n, _ in engine.module.named_parameters() if is_log_z_param(n)]
    assert head_names and all(n.startswith(LOG_Z_PREFIX) for n in head_names)
    before = full_state(engine)
    batch = engine_batch()
    loss_fn = partial(flowrl_actor_loss, config=actor_config, options=OPTIONS)
    with engine.train_mode():
        out = engine.train_batch(batch.data, loss_function=loss_fn)
        grads = {n: p.grad.full_tensor() for n, p in engine.module.named_parameters()}  # zeroed on exit
    assert len(out["loss"]) == 3  # three micro-batches of two
    expected_loss, expected_grads = expected_step(before, model_dir, batch)
    assert sum(out["loss"]) == pytest.approx(float(expected_loss), rel=1e-4)
    assert {"flowrl/log_z", "flowrl/residual", "actor/ref_kl", "grad_norm"} <= set(out["metrics"])
    assert "actor/pg_loss" not in out["metrics"]
    assert set(grads) == set(expected_grads) and any(map(is_log_z_param, grads))
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    after = full_state(engine)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged


def test_the_head_backward_does_not_depend_on_the_logits_backward(cpu_engine) -> None:
    """FSDP2 gathers the root's parameters for backward when a gradient reaches the root's outputs; log
    Z is not one of them, so a backward through log Z alone must still find the head's weights."""
    engine = cpu_engine()
    batch = engine_batch()
    ids = torch.nested.to_padded_tensor(batch.data["input_ids"], 0)
    lengths = batch.data["input_ids"].offsets().diff()
    engine.log_z.arm(*micro_batch_prompt_positions(batch.data))
    engine.module(input_ids=ids, attention_mask=(torch.arange(ids.shape[1]) < lengths.unsqueeze(1)).long())
    engine.log_z.pop().sum().backward()
    for name, p in engine.module.named_parameters():
        if is_log_z_param(name):
            assert p.grad is not None and p.grad.full_tensor().abs().sum() > 0, name


def test_log_prob_passes_run_no_head(cpu_engine) -> None:
    """Old and reference log-prob passes (no loss function) return log-probs and no log Z."""
    engine = cpu_engine()
    batch = engine_batch()
    with engine.eval_mode():
        out = engine.infer_batch(batch.data, loss_function=None)
    assert "log_probs" in out["model_output"] and "log_z" not in out["model_output"]


def test_the_reference_engine_has_no_head(cpu_engine) -> None:
    """The reference policy is built from a copy of the actor's model config, so it has FlowRL's model
    type too; it is forward-only and gets no head. (Only the module build is run: verl wraps a
    forward-only model with a pinned-memory CPU offload, which needs an accelerator.)"""
    engine = cpu_engine(forward_only=True, initialize=False)
    module = engine._build_module()
    assert engine.log_z is None and not hasattr(module, LOG_Z_MODULE)
    assert not any(is_log_z_param(n) for n in module.state_dict())


def test_the_rollout_weight_streams_leave_out_the_head(cpu_engine) -> None:
    engine = cpu_engine()
    everything = set(engine.module.state_dict())
    expected = {n for n in everything if not is_log_z_param(n)}
    assert expected != everything
    full, _ = engine.get_per_tensor_param()
    assert {name for name, _ in full} == expected
    shards, _ = engine.get_per_tensor_param_shard()
    assert {name for name, *_ in shards} == expected


def test_the_head_can_start_from_a_head_file_of_the_project(
    cpu_engine, model_dir: Path, tmp_path: Path
) -> None:
    """flowrl.log_z.init_path: a log_z_head.safetensors saved by the project's trainer (or by TRL's or
    this adapter) seeds the head; rank 0 loads it and FSDP broadcasts it."""
    from transformers import AutoConfig

    torch.manual_seed(123)
    trained = LogZHead(AutoConfig.from_pretrained(model_dir).hidden_size, num_layers=3, dropout=0.0)
    save_log_z_head(trained, tmp_path / HEAD_FILE)
    engine = cpu_engine(init_path=str(tmp_path / HEAD_FILE))
    state = full_state(engine)
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(state[LOG_Z_PREFIX + name], value)


def test_checkpoints_write_the_projects_head_file_and_a_head_free_hf_model(
    cpu_engine, tmp_path: Path
) -> None:
    """The head lives beside the policy in a checkpoint: out of verl's model shards, the HF model and
    config.json; in its own per-rank shard file, log_z_head.safetensors (the project's format) and
    log_z_head.json (its settings)."""
    import json

    from transformers import AutoModelForCausalLM

    from flowrl.integrations.verl.engine import HEAD_SETTINGS_FILE

    engine = cpu_engine()
    state = full_state(engine)
    engine.save_checkpoint(str(tmp_path), global_step=1)
    saved = load_file(str(tmp_path / HEAD_FILE))
    head_state = {k: v for k, v in state.items() if is_log_z_param(k)}
    assert set(saved) == set(head_state)
    head = LogZHead(engine.log_z.head.hidden_size, num_layers=3)
    load_log_z_head(head, tmp_path / HEAD_FILE)  # the project's loader (strict)
    for name, value in head.state_dict().items():
        torch.testing.assert_close(value, head_state[LOG_Z_PREFIX + name])
    assert json.loads((tmp_path / HEAD_SETTINGS_FILE).read_text())["num_layers"] == 3
    model_shards = torch.load(tmp_path / "model_world_size_1_rank_0.pt", weights_only=False)
    head_shards = torch.load(tmp_path / "log_z_head_world_size_1_rank_0.pt", weights_only=False)
    assert set(model_shards) == set(state) - set(head_state) and set(head_shards) == set(head_state)
    hf_weights = load_file(str(tmp_path / "huggingface" / "model.safetensors"))
    assert hf_weights and not any(map(is_log_z_param, hf_weights))
    config = json.loads((tmp_path / "huggingface" / "config.json").read_text())
    assert not [key for key in config if key.startswith("flowrl")], config
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "huggingface", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name].to(value.dtype), msg=name)


def test_resume_restores_the_head_from_beside_the_model(cpu_engine, actor_config, tmp_path: Path) -> None:
    """verl's load_checkpoint with the head saved beside the model: after another training step, loading
    the checkpoint brings back every parameter (the head's included) and the head's AdamW state."""
    engine = cpu_engine()
    loss_fn = partial(flowrl_actor_loss, config=actor_config, options=OPTIONS)
    with engine.train_mode():
        engine.train_batch(engine_batch().data, loss_function=loss_fn)
    saved = full_state(engine)
    head_params = [p for n, p in engine.module.named_parameters() if is_log_z_param(n)]
    saved_moments = [engine.optimizer.state[p]["exp_avg"].full_tensor().clone() for p in head_params]
    engine.save_checkpoint(str(tmp_path), global_step=1)
    with engine.train_mode():
        engine.train_batch(engine_batch().data, loss_function=loss_fn)
    assert not torch.equal(full_state(engine)[head_names(engine)[0]], saved[head_names(engine)[0]])
    engine.load_checkpoint(str(tmp_path), del_local_after_load=False)
    restored = full_state(engine)
    assert set(restored) == set(saved)
    for name, value in saved.items():
        torch.testing.assert_close(restored[name], value, msg=name, rtol=0, atol=0)
    for p, moment in zip(head_params, saved_moments, strict=True):
        torch.testing.assert_close(engine.optimizer.state[p]["exp_avg"].full_tensor(), moment, rtol=0, atol=0)


def head_names(engine) -> list[str]:
    return [n for n in engine.module.state_dict() if is_log_z_param(n)]


def test_verl_lora_trains_adapters_and_the_whole_head(cpu_engine, actor_config, tmp_path: Path) -> None:
    """lora_rank > 0 with verl's default target_modules (all-linear): the head is not wrapped by peft
    (plain Linear weights, trainable, updated by a step), the base policy is frozen and its adapters
    train, and a checkpoint saves (it crashed when the head's layers were LoRA-wrapped)."""
    engine = cpu_engine(lora_rank=4)
    names = dict(engine.module.named_parameters())
    head = {n: p for n, p in names.items() if is_log_z_param(n)}
    assert head and not any("lora_" in n or "base_layer" in n for n in head), sorted(head)
    assert all(p.requires_grad for p in head.values())
    lora = {n for n, p in names.items() if "lora_" in n}
    assert lora and all(names[n].requires_grad for n in lora)
    frozen = {n for n, p in names.items() if not p.requires_grad}
    assert frozen and not (frozen & set(head)) and not (frozen & lora)
    optimized = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in head.values())
    before = full_state(engine)
    with engine.train_mode():
        engine.train_batch(
            engine_batch().data,
            loss_function=partial(flowrl_actor_loss, config=actor_config, options=OPTIONS),
        )
    after = full_state(engine)
    for name in head:
        assert not torch.equal(before[name], after[name]), name
    for name in frozen:
        assert torch.equal(before[name], after[name]), name
    engine.save_checkpoint(str(tmp_path), global_step=1)
    loaded = LogZHead(engine.log_z.head.hidden_size, num_layers=3)
    load_log_z_head(loaded, tmp_path / HEAD_FILE)
    for name, value in loaded.state_dict().items():
        (key,) = [n for n in head if n.endswith(LOG_Z_PREFIX + name)]
        torch.testing.assert_close(value, after[key])
    merged = tmp_path / "merged"  # verl's merger: the adapters to lora_adapter/, the base model clean
    out = _run_model_merger(
        "merge", "--backend", "fsdp", "--local_dir", str(tmp_path), "--target_dir", str(merged)
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    adapter = load_file(str(merged / "lora_adapter" / "adapter_model.safetensors"))
    assert adapter and not any(map(is_log_z_param, adapter))
    weights = load_file(str(merged / "model.safetensors"))
    assert weights and not any(map(is_log_z_param, weights))


def _run_model_merger(*args: str) -> subprocess.CompletedProcess:
    """``python -m verl.model_merger ARGS`` in a fresh process, as a verl user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "verl.model_merger", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_verls_model_merger_makes_a_clean_model_of_a_flowrl_checkpoint(cpu_engine, tmp_path: Path) -> None:
    """verl's own `model_merger merge --backend fsdp` on the engine's checkpoint: the merged model has no
    head tensor and no flowrl_* config key, transformers loads it with no unexpected or missing key and
    the weights of the trained policy, and `model_merger test` against the checkpoint's HF model passes."""
    import json

    from transformers import AutoModelForCausalLM

    engine = cpu_engine()
    state = full_state(engine)
    actor = tmp_path / "global_step_1" / "actor"
    engine.save_checkpoint(str(actor), global_step=1)
    merged = tmp_path / "merged"
    out = _run_model_merger(
        "merge", "--backend", "fsdp", "--local_dir", str(actor), "--target_dir", str(merged)
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    weights = load_file(str(merged / "model.safetensors"))
    assert weights and not any(map(is_log_z_param, weights)), sorted(weights)
    config = json.loads((merged / "config.json").read_text())
    assert not [k for k in config if k.startswith("flowrl")], config
    model, info = AutoModelForCausalLM.from_pretrained(merged, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    for name, value in model.state_dict().items():  # the merger writes bf16
        torch.testing.assert_close(value, state[name].to(value.dtype), msg=name)
    test = _run_model_merger(
        "test", "--backend", "fsdp", "--local_dir", str(actor), "--test_hf_dir", str(actor / "huggingface")
    )
    assert test.returncode == 0, test.stdout[-2000:] + test.stderr[-3000:]
    assert "FSDP checks passed" in test.stdout

    # flowrl export takes the checkpoint too: from huggingface/ as saved, and from the FSDP shards
    # through verl's merger when verl saved no Hugging Face weights (save_contents without hf_model)
    from flowrl.export import export_checkpoint, load_exported_head

    (tmp_path / "latest_checkpointed_iteration.txt").write_text("1")
    for source, out in [(tmp_path, tmp_path / "export"), (actor, tmp_path / "export_merged")]:
        if out.name == "export_merged":
            for weights in (actor / "huggingface").glob("*.safetensors"):
                weights.unlink()
        info = export_checkpoint(source, out)
        assert (
            info["step"] == 1 and info["log_z_head"]["num_layers"] == 3 and info["log_z_head"]["dropout"] == 0
        )
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["unexpected_keys"] and not info["missing_keys"], info
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, state[name].to(value.dtype), msg=name)
        assert not [k for k in json.loads((out / "config.json").read_text()) if k.startswith("flowrl")]
        head = load_exported_head(out)
        for name, value in head.state_dict().items():
            torch.testing.assert_close(value, state[LOG_Z_PREFIX + name])


# ---------------------------------------------------------------------------------------------
# flowrl.log_z.mode=group: no head; the driver estimates each uid group's log Z before the update


GROUP_CONFIG = [*REQUIRED, "flowrl.log_z.mode=group", "actor_rollout_ref.rollout.n=3"]


def driver_batch(seed: int = 7):
    """What the driver reads back from the TransferQueue before the actor update: 3 prompts x 3 responses
    in the order verl's balance_batch left them (groups scattered), plus a filler sample (its own pad
    uid, response mask all zero); nested per-token fields, uid a non-tensor field. Returns the
    TensorDict and the padded tensors."""
    gen = torch.Generator().manual_seed(seed)
    uids = ["u2", "u0", "u1", "u0", "u2", "pad0", "u1", "u0", "u2", "u1"]
    lengths = [3, 5, 2, 4, 1, 1, 5, 2, 3, 4]
    b, t = len(uids), max(lengths)
    mask = torch.tensor([[j < n for j in range(t)] for n in lengths])
    mask[uids.index("pad0")] = False
    old = torch.where(mask, -torch.rand(b, t, generator=gen) * 3, 0.0)
    ref = torch.where(mask, -torch.rand(b, t, generator=gen) * 3, 0.0)
    advantages = torch.where(mask, torch.randn(b, generator=gen).unsqueeze(1), 0.0)
    fields = {
        "response_mask": nested([mask[i, :n].long() for i, n in enumerate(lengths)]),
        "old_log_probs": nested([old[i, :n] for i, n in enumerate(lengths)]),
        "ref_log_prob": nested([ref[i, :n] for i, n in enumerate(lengths)]),
        "advantages": nested([advantages[i, :n] for i, n in enumerate(lengths)]),
        "uid": uids,
    }
    padded = {"old": old, "ref": ref, "advantages": advantages, "mask": mask, "uids": uids}
    return tu.get_tensordict(tensor_dict=fields), padded


def expected_group_log_z(padded: dict, options: FlowRLLossOptions, **kwargs) -> torch.Tensor:
    """group_log_z with contiguous groups (the rows of each uid gathered), put back in the batch order."""
    groups = ["u0", "u1", "u2"]
    order = [i for g in groups for i, uid in enumerate(padded["uids"]) if uid == g]
    rows = torch.tensor(order)
    mask = padded["mask"][rows]
    contiguous = group_log_z(
        padded["old"][rows], padded["old"][rows], padded["ref"][rows],
        masked_mean(padded["advantages"][rows], mask, dim=-1), mask,
        num_samples_per_prompt=3, beta=options.beta, importance_weight=options.importance_weight, **kwargs,
    )  # fmt: skip
    expected = torch.zeros(len(padded["uids"]))  # the filler: 0
    expected[rows] = contiguous
    return expected


@pytest.mark.parametrize("loss_agg_mode", ["seq-mean-token-mean", "token-mean"])
def test_group_log_z_by_uid_is_group_log_z_over_each_uid(loss_agg_mode: str) -> None:
    _, padded = driver_batch()
    got = group_log_z_by_uid(
        padded["uids"], padded["old"], padded["ref"], padded["advantages"], padded["mask"],
        options=OPTIONS, loss_agg_mode=loss_agg_mode,
    )  # fmt: skip
    weighting = "length" if loss_agg_mode == "token-mean" else "mean"
    torch.testing.assert_close(got, expected_group_log_z(padded, OPTIONS, sequence_weighting=weighting))
    for uid in ("u0", "u1", "u2"):
        values = {float(got[i]) for i, u in enumerate(padded["uids"]) if u == uid}
        assert len(values) == 1
    assert len({float(v) for v in got}) == 4  # three groups and the filler's 0


class FakeQueue:
    """The TransferQueue calls the driver makes: one batch, read back by field, written by field."""

    def __init__(self, data) -> None:
        self.data, self.put = data, None

    def kv_batch_get(self, keys, partition_id, select_fields):
        assert keys == KEYS and partition_id == "train"
        return self.data.select(*select_fields)

    def kv_batch_put(self, keys, partition_id, fields):
        assert keys == KEYS and partition_id == "train"
        self.put = fields
        return Meta(keys, fields=sorted(fields.keys()))


KEYS = [f"k{i}" for i in range(10)]


@dataclasses.dataclass
class Meta:  # the KVBatchMeta fields the driver reads
    keys: list
    partition_id: str = "train"
    fields: list | None = None

    def __len__(self) -> int:
        return len(self.keys)


def test_the_driver_writes_each_groups_log_z_before_the_actor_update(monkeypatch) -> None:
    import flowrl.integrations.verl.trainer as trainer_module

    config = compose_config(GROUP_CONFIG)
    data, padded = driver_batch()
    queue = FakeQueue(data)
    monkeypatch.setattr(trainer_module, "tq", queue)
    updated = []

    def verl_update_actor(self, batch, metrics):  # the workers then read the batch with the new field
        updated.append(batch)
        return batch

    monkeypatch.setattr(PPOTrainerSync, "_update_actor", verl_update_actor)
    trainer = object.__new__(FlowRLTrainerSync)
    trainer.config = config
    trainer.flowrl_options, trainer.log_z_settings = flowrl_section(config)
    assert trainer.log_z_settings.mode == "group"
    returned = trainer._update_actor(Meta(KEYS), metrics={})
    assert updated == [returned] and returned.fields == [GROUP_LOG_Z]
    written = queue.put[GROUP_LOG_Z]
    assert written.is_nested
    rows = written.unbind()
    assert [len(r) for r in rows] == [len(r) for r in data["response_mask"].unbind()]  # advantages' layout
    expected = expected_group_log_z(padded, trainer.flowrl_options)
    for row, value in zip(rows, expected, strict=True):
        torch.testing.assert_close(row, torch.full_like(row, float(value)))
    # head mode writes nothing
    queue.put = None
    trainer.log_z_settings = LogZSettings()
    trainer._update_actor(Meta(KEYS), metrics={})
    assert queue.put is None


def with_group_log_z(batch: Batch, log_z: torch.Tensor) -> Batch:
    """The micro-batch as the workers get it in group mode: each sample's log Z on its response tokens."""
    rows = [torch.full((r,), float(v)) for (_, r), v in zip(batch.lengths, log_z, strict=True)]
    batch.data[GROUP_LOG_Z] = nested(rows)
    return batch


def test_the_closure_takes_log_z_from_the_batch_in_group_mode(actor_config) -> None:
    batch = make_batch()
    log_z = torch.randn(len(LENGTHS), generator=torch.Generator().manual_seed(3))
    with_group_log_z(batch, log_z)
    set_global_counts(batch.data, global_batch_size=len(LENGTHS), batch_num_tokens=int(batch.mask.sum()))
    output = {"log_probs": batch.model_output()["log_probs"]}  # the engine gives no log_z without a head
    loss, metrics = flowrl_actor_loss(actor_config, output, batch.data, options=OPTIONS)
    batch.log_z = log_z
    expected, expected_metrics = reference_loss(batch)
    torch.testing.assert_close(loss, expected)
    assert metrics["flowrl/log_z"].aggregate() == pytest.approx(float(log_z.mean()), rel=1e-6)
    got = torch.autograd.grad(loss, batch.logprobs)[0]
    torch.testing.assert_close(got, torch.autograd.grad(expected, batch.logprobs)[0])
    del batch.data[GROUP_LOG_Z]
    with pytest.raises(ValueError, match="no log_z and the batch no flowrl_log_z"):
        flowrl_actor_loss(actor_config, output, batch.data, options=OPTIONS)


def test_group_mode_config_and_its_checks() -> None:
    assert FLOWRL_DEFAULTS["log_z"]["mode"] == "head"
    config = compose_config(GROUP_CONFIG)
    _, settings = flowrl_section(config)
    assert settings.mode == "group"
    apply_log_z_settings(config, settings)
    assert LogZSettings.from_override_config(config.actor_rollout_ref.model.override_config).mode == "group"
    for overrides, fix in [
        (["actor_rollout_ref.rollout.n=1"], "rollout.n=1: set it >= 2"),
        (["flowrl.log_z.mode=groups"], "flowrl.log_z.mode='groups' is unknown"),
        (["flowrl.log_z.init_path=/x/log_z_head.safetensors"], "init_path=null or mode=head"),
    ]:
        with pytest.raises(ValueError, match=fix):
            compose_config([*GROUP_CONFIG, *overrides])


def test_group_mode_engine_has_no_head_and_trains_on_the_batchs_log_z(
    cpu_engine, model_dir: Path, actor_config, tmp_path: Path
) -> None:
    """The FlowRL engine with flowrl.log_z.mode=group: no head in the model, the optimizer, the weight
    streams or a checkpoint; a training step with log Z from the batch has the loss and gradients of
    flowrl_loss computed without verl."""
    from transformers import AutoModelForCausalLM

    engine = cpu_engine(mode="group")
    assert engine.log_z is None and not head_names(engine)
    assert not hasattr(engine.module, LOG_Z_MODULE)
    optimized = [p for g in engine.optimizer.param_groups for p in g["params"]]
    assert len(optimized) == len(list(engine.module.parameters()))
    before = full_state(engine)
    batch = engine_batch()
    log_z = torch.tensor([0.5, -0.25, 1.0, 0.0, -1.5, 0.75])
    with_group_log_z(batch, log_z)
    loss_fn = partial(flowrl_actor_loss, config=actor_config, options=OPTIONS)
    with engine.train_mode():
        out = engine.train_batch(batch.data, loss_function=loss_fn)
        grads = {n: p.grad.full_tensor() for n, p in engine.module.named_parameters()}

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.load_state_dict(before)
    rows = []
    for prompt, response in zip(
        batch.data["prompts"].unbind(), batch.data["responses"].unbind(), strict=True
    ):
        logits = model(input_ids=torch.cat([prompt, response]).unsqueeze(0)).logits[0, len(prompt) - 1 : -1]
        rows.append(torch.log_softmax(logits, -1).gather(-1, response.unsqueeze(-1)).squeeze(-1))
    expected, _ = flowrl_loss(
        torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), batch.old, batch.ref, log_z,
        masked_mean(batch.advantages, batch.mask, dim=-1), batch.mask, beta=OPTIONS.beta,
    )  # fmt: skip
    expected.backward()
    assert sum(out["loss"]) == pytest.approx(expected.item(), rel=1e-4)
    assert out["metrics"]["flowrl/log_z"].aggregate() == pytest.approx(float(log_z.mean()), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)

    full, _ = engine.get_per_tensor_param()
    assert {name for name, _ in full} == set(before)
    engine.save_checkpoint(str(tmp_path), global_step=1)
    assert not (tmp_path / HEAD_FILE).exists() and not list(tmp_path.glob("log_z_head*"))
    hf_weights = load_file(str(tmp_path / "huggingface" / "model.safetensors"))
    assert hf_weights and not any(map(is_log_z_param, hf_weights))


def test_the_flowrl_section_is_the_objectives_loss_options() -> None:
    """One definition of FlowRL's options (flowrl.objectives.FlowRLLossOptions) for the project's trainer,
    TRL and verl: the section's defaults are its defaults; the sequence weighting is verl's
    loss_agg_mode, so the section refuses it and the options follow the actor's mode."""
    from flowrl.objectives import FlowRLLossOptions as Objectives

    assert FlowRLLossOptions is Objectives
    defaults = {k: v for k, v in FLOWRL_DEFAULTS.items() if k != "log_z"}
    assert defaults == {k: v for k, v in dict(Objectives()).items() if k != "sequence_weighting"}
    options, _ = flowrl_section(
        compose_config([*REQUIRED, "actor_rollout_ref.actor.loss_agg_mode=token-mean"])
    )
    assert options == Objectives(sequence_weighting="length")
    with pytest.raises(
        ValueError, match="flowrl.sequence_weighting .* actor_rollout_ref.actor.loss_agg_mode"
    ):
        compose_config([*REQUIRED, "+flowrl.sequence_weighting=length"])
