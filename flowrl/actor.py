"""The policy's side of one RL step: log-probs without gradient, advantages, and the update.

Shape legend: N sequences of the step on this rank (the samples of one prompt contiguous), T response
tokens; "the step's" tensors are every rank's, gathered in rank order (N x world size rows).

:class:`Actor` holds what these read (the policy, its optimizer, the objective, the config and the
data-parallel group) so the loop calls them with the step's tensors only:

* :meth:`Actor.logprobs`: (N, T) log-probs and entropies of a policy (the reference or the current one)
  in micro-batches, without gradient;
* :meth:`Actor.advantages`: the objective's advantages over the whole step (batch statistics global);
* :meth:`Actor.group_log_z`: log Z per prompt under ``log_z.mode=group``, before the update;
* :meth:`Actor.update`: mini-batch AdamW steps with micro-batch gradient accumulation. Every
  micro-batch loss is divided by its mini-batch's unit count (summed over the ranks), so the summed
  gradient is the mini-batch mean's whatever the micro-batch size or the rank count; metrics are
  accumulated as detached tensors and read once, at the end.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowrl import sharding
from flowrl.batching import Micro, logprobs_no_grad, micro_batch, micro_batches, minibatch_plan
from flowrl.config import Config
from flowrl.distributed import DataParallel, derive_seed
from flowrl.objectives import Objective
from flowrl.objectives.masked import masked_mean
from flowrl.optim import StepInBackward
from flowrl.policy import Policy
from flowrl.rollout import RolloutBatch
from flowrl.streams import stream_keys


class Actor:
    """The policy, its optimizer and the objective, with the config's options for each.

    Args:
        cfg: the run's config.
        policy: the policy being trained (sharded under ``train.strategy=fsdp2``).
        optimizer: its optimizer (with the log Z head's group when there is a head).
        objective: the run's objective.
        dp: this process's place among the data-parallel processes.
        sharded: the policy is sharded (FSDP reduce-scatters gradients in backward).
        bf16: forwards run under bfloat16 autocast.
        stepper: under ``train.optimizer_in_backward``, the optimizer's steps run in backward
            (one process, one micro-batch per step, no clipping: the config holds to that).
    """

    def __init__(
        self,
        cfg: Config,
        policy: Policy,
        optimizer: torch.optim.Optimizer,
        objective: Objective,
        dp: DataParallel,
        *,
        sharded: bool,
        bf16: bool,
        stepper: StepInBackward | None = None,
    ) -> None:
        self.cfg, self.policy, self.optimizer, self.objective, self.dp = cfg, policy, optimizer, objective, dp
        self.stepper = stepper
        self.sharded, self.bf16, self.device = sharded, bf16, dp.device
        self.temperature = cfg.rollout.temperature
        self.num_samples = cfg.rollout.num_samples_per_prompt
        # log_z.mode=group: log Z estimated per group before each update (no head; prepare_models built none)
        self.log_z_per_group = objective.uses_log_z and not objective.needs_log_z_head(cfg.log_z.mode)

    def autocast(self) -> Any:
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def logprobs(
        self, policy: torch.nn.Module, rollout: RolloutBatch, *, with_entropy: bool
    ) -> tuple[Tensor, Tensor | None]:
        """(N, T) log-probs (and entropies) of every sequence, without gradient, in micro-batches of
        ``train.logprob_micro_batch_size`` (no activations are kept, so they can be larger)."""
        t = self.cfg.train
        size = t.logprob_micro_batch_size or 2 * t.micro_batch_size
        return logprobs_no_grad(
            policy,
            rollout,
            size=size,
            temperature=self.temperature,
            autocast=self.autocast,
            with_entropy=with_entropy,
        )

    def needs_old_logprobs(self, num_valid: int) -> bool:
        """Whether the current policy's log-probs are needed before the update: when the step's
        ``num_valid`` sequences make more than one optimizer step (for exactly one, they equal the
        update's own and are skipped), for REINFORCE++'s KL (it reads both), and for the group log Z."""
        t = self.cfg.train
        updates_per_rollout = math.ceil(num_valid / t.mini_batch_size) * t.epochs_per_rollout
        return updates_per_rollout > 1 or self.objective.advantage_uses_ref_logprobs or self.log_z_per_group

    def advantages(
        self,
        rewards: Tensor,
        valid: Tensor,
        response_mask: Tensor,
        old_logprobs: Tensor | None,
        ref_logprobs: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """The objective's advantages: the whole step's ((N x world size,) or (N x world size, T) padded
        to the widest) and this rank's rows of them ((N,) or (N, T), its own width).

        ``rewards`` and ``valid`` are already the step's (gathered); the per-token inputs are this rank's
        and get gathered here, so batch-level statistics (REINFORCE++'s whitening) are global.
        """
        gather = self.dp.gather
        step_advantages = self.objective.advantage_fn(
            rewards,
            gather(response_mask),
            None if old_logprobs is None else gather(old_logprobs),
            None if ref_logprobs is None else gather(ref_logprobs),
            num_samples_per_prompt=self.num_samples,
            valid=valid,
            **self.cfg.algorithm.advantage,
        )
        num_local, width = response_mask.shape
        mine = step_advantages[self.dp.rank * num_local : (self.dp.rank + 1) * num_local]
        return step_advantages, mine[:, :width] if mine.dim() == 2 else mine

    def advantage_abs(self, step_advantages: Tensor, step_valid: Tensor, response_mask: Tensor) -> float:
        """The mean absolute advantage over the step's scored sequences (for per-token advantages: over
        their response tokens); ``response_mask`` is this rank's."""
        if step_advantages.dim() == 1:
            return float(step_advantages[step_valid].abs().mean())
        step_mask = self.dp.gather(response_mask)[step_valid]
        return float(masked_mean(step_advantages[step_valid].abs(), step_mask))

    def group_log_z(
        self, valid: Tensor, advantages: Tensor, logprobs: Tensor, ref_logprobs: Tensor | None, mask: Tensor
    ) -> Tensor:
        """(N,) this rank's log Z per sequence under ``log_z.mode=group``: each prompt's group estimate.

        Computed once, before the update, from the log-probs of the policy as it is now (no gradient),
        over whole groups (a rank holds whole prompts); micro-batches then cut across groups freely.
        With one optimizer step per batch this is the exact minimizer at the policy being updated; with
        several, the one at the sampling policy, held for the batch like the advantages (log Z is a
        per-prompt baseline: see :func:`~flowrl.objectives.group_log_z`).
        """
        return self.objective.group_log_z_fn(
            logprobs,
            logprobs,
            ref_logprobs,
            advantages,
            mask,
            num_samples_per_prompt=self.num_samples,
            valid=valid,
            **self.cfg.algorithm.loss,
        )

    def entropy(self, entropy: Tensor, mask: Tensor) -> float:
        """The mean per-token entropy over every rank's response tokens, from a no-gradient pass."""
        totals = self.dp.sum_dict({"entropy": float((entropy * mask).sum()), "tokens": float(mask.sum())})
        return totals["entropy"] / max(totals["tokens"], 1.0)

    def update(
        self,
        rollout: RolloutBatch,
        rows: Tensor,
        advantages: Tensor,
        old_logprobs: Tensor | None,
        ref_logprobs: Tensor | None,
        log_z: Tensor | None = None,
        *,
        step: int,
    ) -> dict[str, float]:
        """Mini-batch AdamW steps over the step's valid sequences; returns metrics averaged over them.

        Args:
            rollout: this rank's N sequences.
            rows: (R,) indices of this rank's sequences to train on (those with a usable reward).
            advantages: (N,) or (N, T) this rank's advantages.
            old_logprobs: (N, T), or None when the batch makes one optimizer step.
            ref_logprobs: (N, T), or None when the objective does not read them.
            log_z: (N,) log Z per sequence under ``log_z.mode=group`` (:meth:`group_log_z`); None when
                the head computes it (or the objective has none).
            step: the RL step, which seeds the mini-batch plan and the head's dropout.

        The mini-batches are a single process's (:func:`~flowrl.batching.minibatch_plan` over every
        rank's rows); each rank runs the members it holds and the gradients are summed across ranks.
        """
        t, dp = self.cfg.train, self.dp
        num_local = rollout.response_ids.shape[0]
        offset = dp.rank * num_local
        mine = torch.zeros(num_local, dtype=torch.bool, device=self.device)
        mine[rows.to(self.device)] = True
        step_rows = dp.gather(mine).nonzero().squeeze(-1)  # positions in the step's sequences
        # Per-sequence sums, kept as detached tensors (no device sync per micro-batch), read once at the end.
        sums: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # the optimizer's own parameter objects: under fsdp2 the modules show gathered ones after a forward
        head_params = [
            p for g in self.optimizer.param_groups if g.get("name") == "log_z_head" for p in g["params"]
        ]
        plans = [
            minibatch_plan(step_rows, size=t.mini_batch_size, seed=t.seed, step=step, epoch=epoch)
            for epoch in range(t.epochs_per_rollout)
        ]
        show = t.progress and dp.is_main and sys.stderr.isatty()
        bar = tqdm(total=sum(map(len, plans)), desc="update", disable=not show, leave=False)
        for epoch, plan in enumerate(plans):
            # the head's dropout: a stream per sequence, keyed by its position in the step (any K)
            base = torch.tensor([derive_seed(t.seed, "log_z_dropout", step, epoch)], device=self.device)
            keys = stream_keys(base, num_local * dp.world_size)[offset : offset + num_local]
            for mini in plan:
                local = mini[(mini >= offset) & (mini < offset + num_local)] - offset
                self.optimizer.zero_grad(set_to_none=True)
                # with a stepper, each parameter is stepped in backward as its gradient completes
                with self.stepper.backward() if self.stepper is not None else nullcontext():
                    loss = self._accumulate(
                        local, rollout, advantages, old_logprobs, ref_logprobs, keys, sums, log_z
                    )
                if self.stepper is not None:
                    grad_norm, head_norm = self.stepper.grad_norm(params), self.stepper.grad_norm(head_params)
                else:
                    if not self.sharded:  # FSDP has reduce-scattered them already, in backward
                        dp.all_reduce_grads(params)
                    # before clipping: how hard the loss pulls on the head itself
                    head_norm = sharding.grad_norm(head_params) if head_params else None
                    grad_norm = sharding.clip_grad_norm_(params, self.cfg.optim.max_grad_norm)
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)  # gradients are not held through the rollout
                if head_params:
                    sums["log_z_grad_norm"] += head_norm * len(mini)
                # Every metric is a mean over sequences: weight each mini-batch by its size. This rank's
                # loss is its part of the mini-batch loss, so the sum over ranks is the whole.
                sums["loss"] += loss * len(mini)
                sums["grad_norm"] += grad_norm.detach() * len(mini)  # alike on every rank
                bar.update(1)
        bar.close()
        keys_ = list(sums)
        totals = dict(
            zip(keys_, torch.stack([sums[k].float() for k in keys_]).tolist(), strict=True)
        )  # 1 sync
        alike = {k: totals.pop(k) for k in ("grad_norm", "log_z_grad_norm") if k in totals}  # not summed
        totals = dp.sum_dict(totals)
        count = len(step_rows) * t.epochs_per_rollout
        entropy_sum, entropy_tokens = totals.pop("entropy_sum", None), totals.pop("entropy_tokens", None)
        out = {k: v / count for k, v in totals.items()}
        out["actor/loss"] = out.pop("loss")
        if entropy_sum is not None:
            out["actor/entropy"] = entropy_sum / max(entropy_tokens, 1.0)
        out["optim/grad_norm"] = alike["grad_norm"] / count
        if "log_z_grad_norm" in alike:
            out["flowrl/log_z_grad_norm"] = alike["log_z_grad_norm"] / count
        out["optim/num_minibatches"] = float(sum(map(len, plans)))
        return out

    def _accumulate(
        self,
        local: Tensor,
        rollout: RolloutBatch,
        advantages: Tensor,
        old_logprobs: Tensor | None,
        ref_logprobs: Tensor | None,
        dropout_keys: Tensor,
        sums: dict[str, Tensor],
        log_z: Tensor | None = None,
    ) -> Tensor:
        """Forward and backward over this rank's members ``local`` of one mini-batch, in micro-batches;
        adds their metrics (times their sizes) to ``sums`` and returns this rank's part of the loss."""
        obj, options = self.objective, dict(self.cfg.algorithm.loss)
        head = obj.uses_log_z and log_z is None  # the policy's head gives log Z (else: given, per sequence)
        # The global mini-batch's unit count, so the summed gradients are its mean's.
        normalizer = self.dp.sum(float(obj.count_units(rollout.response_mask[local].float(), **options)))
        micro: list[Micro | None] = list(micro_batches(local, rollout, self.cfg.train.micro_batch_size))
        if self.sharded:  # every rank runs as many forwards (collectives) as the busiest one
            micro += [None] * (sharding.lockstep_count(len(micro)) - len(micro))
        total = torch.zeros((), device=self.device)
        for mb in micro:
            zero_weighted = mb is None  # a pass that only keeps this rank in step
            if mb is None:
                mb = micro_batch(rollout, torch.zeros(1, dtype=torch.long, device=self.device))
            w, rows = mb.response_width, mb.rows
            with self.autocast():
                out = self.policy(
                    mb.input_ids,
                    mb.attention_mask,
                    mb.prompt_length,
                    temperature=self.temperature,
                    with_log_z=head,
                    with_entropy=old_logprobs is None,
                    detach_log_z_input=self.cfg.log_z.detach_input,
                    exclude_last_prompt_token=self.cfg.log_z.exclude_last_prompt_token,
                    log_z_dropout_keys=dropout_keys[rows] if head else None,
                )
            mask = rollout.response_mask[rows, :w].float()
            tensors: dict[str, Tensor | None] = {
                "logprobs": out.logprobs,
                "old_logprobs": out.logprobs.detach() if old_logprobs is None else old_logprobs[rows, :w],
                "advantages": advantages[rows] if advantages.dim() == 1 else advantages[rows, :w],
                "response_mask": mask,
            }
            if obj.uses_ref_logprobs:  # None without a reference model (GRPO at kl_coef 0)
                tensors["ref_logprobs"] = None if ref_logprobs is None else ref_logprobs[rows, :w]
            if obj.uses_log_z:
                tensors["log_z"] = out.log_z if head else log_z[rows]
            loss, metrics = obj.loss_fn(**tensors, **options, normalizer=normalizer)
            if zero_weighted:
                (loss * 0).backward()
                continue
            loss.backward()
            total = total + loss.detach()
            for key, value in metrics.items():
                sums[key] += value.detach().float() * len(rows)
            if out.entropy is not None:
                sums["entropy_sum"] += (out.entropy.detach() * mask).sum()
                sums["entropy_tokens"] += mask.sum()
        return total

    def model_state_bytes(self) -> int:
        """Bytes this rank holds of the policy's parameters and the optimizer's states (shards only)."""
        states = self.optimizer.state.values()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]  # the sharded ones
        frozen = [p for p in self.policy.parameters() if not p.requires_grad]
        tensors = [*params, *frozen, *(v for s in states for v in s.values() if torch.is_tensor(v))]
        return sum(sharding.local(t).numel() * t.element_size() for t in tensors)
