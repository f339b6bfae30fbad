"""The training loop, top to bottom: rollout -> score -> reference and old log-probs -> update -> log.

Shape legend: N sequences per RL step (prompts_per_step x num_samples_per_prompt, the samples of one
prompt contiguous), P prompt tokens, T response tokens. Under torchrun, N is this rank's share.

One RL step:
  1. take ``prompts_per_step`` prompts, sample ``num_samples_per_prompt`` responses each;
  2. score them (the reward registry, or the config's ``module:function``); failed rewards are counted
     and their samples left out of the update; a step where every reward failed stops the run;
  3. reference log-probs from the frozen copy, without gradient (on a GPU in a second thread while
     step 2 scores: ``train.overlap_reference``); old log-probs too when the batch makes more than one
     optimizer step (for exactly one, they equal the current ones and are skipped);
  4. advantages with the objective's advantage function (group-normalized rewards for FlowRL and GRPO);
     with ``log_z.mode=group``, FlowRL's log Z per prompt from the same no-gradient log-probs
     (:func:`~flowrl.objectives.group_log_z`), passed to the loss like the advantages;
  5. mini-batch AdamW steps with micro-batch gradient accumulation. Every micro-batch loss is divided
     by the mini-batch's unit count (``normalizer``), so the summed gradient is the mini-batch mean's,
     whatever the micro-batch size; micro-batches are cut from length-sorted rows and trimmed to their
     longest sequence, so little padding is computed;
  6. metrics: one console line, JSONL / TensorBoard / W&B, sample responses every ``sample_every``.

Before any weights load, :mod:`flowrl.preflight` checks the inputs and the output directory. A SIGINT or
SIGTERM (:mod:`flowrl.stopping`) is honoured at three points of a step, agreed across ranks: after the
rollout and after scoring, where the step is abandoned (nothing of it is applied), and at its end; then
the checkpoint of the last completed step is written and :meth:`Trainer.fit` returns.

Data parallelism (``torchrun --nproc_per_node K -m flowrl.cli train CONFIG.yaml``): K processes compute
what one process computes; :mod:`flowrl.distributed` says how (prompts, random streams, advantages,
mini-batches, metrics), :mod:`flowrl.sharding` what ``train.strategy=fsdp2`` adds.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowrl import checkpoint as ckpt
from flowrl import distributed, preflight, reports, sharding
from flowrl.batching import Micro, logprobs_no_grad, micro_batch, micro_batches, minibatch_plan
from flowrl.config import Config, to_yaml
from flowrl.data.prompts import PromptSampler, load_prompts
from flowrl.distributed import derive_seed
from flowrl.logging import MetricsLogger, plot_metrics, read_metrics
from flowrl.models import build_scheduler, needs_reference, prepare_models
from flowrl.objectives import OBJECTIVES, Objective
from flowrl.objectives.masked import masked_mean
from flowrl.policy import Policy, load_tokenizer
from flowrl.rewards.base import RewardResult, RewardStatus
from flowrl.rewards.registry import check_batch_usable, score_batch, status_counts
from flowrl.rollout import RolloutBatch, SamplingParams, build_engine
from flowrl.stopping import StopRequested
from flowrl.streams import stream_keys


def _run_now(fn: Any, *args: Any, **kwargs: Any) -> Future:
    """``fn(*args, **kwargs)`` run on this thread, as a finished future (the executor's interface)."""
    future: Future = Future()
    future.set_result(fn(*args, **kwargs))
    return future


@dataclass
class TrainResult:
    run_dir: Path
    metrics: list[dict[str, float]]
    policy: Policy
    tokenizer: Any
    stopped_by: int | None = None  # the signal that stopped the run early (its checkpoint is written)


class Trainer:
    """Holds the run's parts; :meth:`fit` is the loop. Build it with a :class:`~flowrl.config.Config`."""

    def __init__(
        self, cfg: Config, *, resume: bool = False, overwrite: bool = False, force: bool = False
    ) -> None:
        self.dp = distributed.setup(cfg.train.device)
        self.prompts_per_rank = self.dp.split(cfg.train.prompts_per_step, "train.prompts_per_step")
        self.cfg = cfg
        self.objective: Objective = OBJECTIVES[cfg.algorithm.name]
        self.run_dir = Path(cfg.train.output_dir)
        # Everything checkable without weights, before any load; nothing is written until it all passed.
        checked = preflight.check_run(cfg, resume=resume, overwrite=overwrite)
        self.device = self.dp.device
        self.bf16 = cfg.train.bf16 if cfg.train.bf16 is not None else self.device.type == "cuda"
        overlap = cfg.train.overlap_reference
        self.overlap_reference = overlap if overlap is not None else self.device.type == "cuda"
        torch.manual_seed(cfg.train.seed)  # the same on every rank: the log Z head starts alike

        resume_from = None
        if resume and self.dp.is_main:
            resume_from = ckpt.latest_intact_checkpoint(self.run_dir / ckpt.CHECKPOINTS_DIR)
        resume_from = self.dp.broadcast_object(resume_from)  # every rank resumes from rank 0's choice
        if resume and resume_from is None:
            self._print(
                f"note: --resume given but no checkpoint under {self.run_dir / 'checkpoints'}; starting fresh"
            )
        processes = f" | {self.dp.world_size} processes" if self.dp.enabled else ""
        self._print(
            f"flowrl train | {cfg.algorithm.name} | device {self.device}{processes} | run dir {self.run_dir}"
        )
        self._print(to_yaml(cfg))
        preflight.check_memory(
            cfg, world_size=self.dp.world_size, device=self.device, force=force, report=self._print
        )

        m = cfg.model
        self.tokenizer = load_tokenizer(m.path, trust_remote_code=m.trust_remote_code)
        self.prompts = load_prompts(checked.rows, checked.files, self.tokenizer, cfg.data.max_prompt_length)
        self.reward_fn = checked.reward_fn
        self.sharded = self.dp.enabled and cfg.train.strategy == "fsdp2"
        models = prepare_models(
            cfg,
            self.device,
            checkpoint=resume_from,
            needs_reference=needs_reference(cfg),
            uses_log_z=self.objective.uses_log_z,
            shard=self.sharded,
        )
        self.policy, self.ref_policy, self.optimizer = models.policy, models.reference, models.optimizer
        # log_z.mode=group: log Z estimated per group before each update (no head; prepare_models built none)
        self.group_log_z = self.objective.uses_log_z and not self.objective.needs_log_z_head(cfg.log_z.mode)
        self.units = models.units
        model = self.policy.model
        self.scheduler = build_scheduler(cfg, self.optimizer)
        show = cfg.train.progress and self.dp.is_main and sys.stderr.isatty()
        self.engine = build_engine(cfg, model, self.tokenizer, show_progress=show)
        self._engine_stale = True  # its weights are synced before the first rollout (resume included)
        self.sampling = SamplingParams(
            n=cfg.rollout.num_samples_per_prompt,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            top_k=cfg.rollout.top_k,
            max_new_tokens=cfg.rollout.max_new_tokens,
        )
        self.sampler = PromptSampler(
            len(self.prompts.examples), seed=cfg.train.seed, shuffle=cfg.data.shuffle
        )

        self.step = 0
        if resume_from is not None:
            state = ckpt.load_trainer_state(resume_from)
            self._load_optimizer(state)
            self.scheduler.load_state_dict(state["scheduler"])
            self.sampler.load_state_dict(state["sampler"])
            ckpt.set_rng_state(state["rng"])
            self.step = state["step"]
            self._print(f"resumed from {resume_from} at step {self.step}")
        self.saved_step = self.step  # the step of the newest checkpoint on disk
        if not self.sharded:  # sharded runs load the same weights on every rank and shard them alike
            self.dp.broadcast_parameters(self.policy.parameters())

        # Everything loaded: only now does the run directory change (an earlier run is replaced here).
        if self.dp.is_main:
            if overwrite:
                removed = preflight.clear_run(self.run_dir)
                if removed:
                    print(f"--overwrite: removed {', '.join(removed)} from {self.run_dir}", flush=True)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            if self.prompts.skipped:
                total = len(self.prompts.skipped) + len(self.prompts.examples)
                limit = cfg.data.max_prompt_length
                self._print(reports.write_skipped(self.run_dir, self.prompts.skipped, total, limit))
        self.logger = (
            MetricsLogger(
                self.run_dir,
                total_steps=cfg.train.total_steps,
                tensorboard=cfg.train.tensorboard,
                wandb_project=cfg.train.wandb_project,
                config=asdict(cfg),
                append=resume_from is not None,
                resume_step=self.step,
                progress=cfg.train.progress,
            )
            if self.dp.is_main
            else None
        )
        self.dp.barrier()  # the run directory exists for every rank

    # -- pieces of one step ------------------------------------------------------------------------

    def _print(self, text: str) -> None:
        if self.dp.is_main:  # through tqdm, so a progress bar on the terminal is not torn
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()

    def _rollout(self, indices: list[int], first: int) -> RolloutBatch:
        """Sample this rank's responses to ``indices``, the prompts at positions ``first, first + 1, ...``
        of the step, in one call: the engine keeps ``rollout.batch_size`` sequences decoding, prompts
        taking the slots of finished ones. Each prompt's samples are seeded by ``(seed, step, its
        position)``: the same whichever process generates them and whatever the batch size."""
        prompts = [self.prompts.prompt_ids[i] for i in indices]
        seeds = [
            derive_seed(self.cfg.train.seed, "rollout", self.step, first + k) for k in range(len(indices))
        ]
        gather = sharding.gathered(self.units) if self.sharded else nullcontext()
        with gather, self._autocast():  # gathered once per step; on a GPU: bf16 weights, bf16 KV cache
            return self.engine.generate(prompts, self.sampling, seeds=seeds)

    def _advantages(
        self,
        rewards: Tensor,
        valid: Tensor,
        response_mask: Tensor,
        old_logprobs: Tensor | None,
        ref_logprobs: Tensor | None,
    ) -> Tensor:
        """The objective's advantages of the whole step's sequences ((N,) or (N, T) padded to the widest).

        ``rewards`` and ``valid`` are already the step's (gathered); the per-token inputs are this rank's
        and get gathered here, so batch-level statistics (REINFORCE++'s whitening) are global.
        """
        gather = self.dp.gather
        return self.objective.advantage_fn(
            rewards,
            gather(response_mask),
            None if old_logprobs is None else gather(old_logprobs),
            None if ref_logprobs is None else gather(ref_logprobs),
            num_samples_per_prompt=self.sampling.n,
            valid=valid,
            **self.cfg.algorithm.advantage,
        )

    def _group_log_z(
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
            num_samples_per_prompt=self.sampling.n,
            valid=valid,
            **self.cfg.algorithm.loss,
        )

    def _autocast(self) -> Any:
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _logprobs_no_grad(
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
            temperature=self.sampling.temperature,
            autocast=self._autocast,
            with_entropy=with_entropy,
        )

    def _score(self, rollout: RolloutBatch, indices: list[int]) -> tuple[list[str], list[RewardResult]]:
        texts = self.tokenizer.batch_decode(
            [ids[mask.bool()] for ids, mask in zip(rollout.response_ids, rollout.response_mask, strict=True)],
            skip_special_tokens=True,
        )
        n = self.sampling.n
        examples = [self.prompts.examples[i] for i in indices for _ in range(n)]
        results = score_batch(
            texts, examples, reward_fn=self.reward_fn, num_workers=self.cfg.reward.num_workers
        )
        return texts, results

    def _update(
        self,
        rollout: RolloutBatch,
        rows: Tensor,
        advantages: Tensor,
        old_logprobs: Tensor | None,
        ref_logprobs: Tensor | None,
        log_z: Tensor | None = None,
    ) -> dict[str, float]:
        """Mini-batch AdamW steps over the step's valid sequences; returns metrics averaged over them.

        Args:
            rollout: this rank's N sequences.
            rows: (R,) indices of this rank's sequences to train on (those with a usable reward).
            advantages: (N,) or (N, T) this rank's advantages.
            old_logprobs: (N, T), or None when the batch makes one optimizer step.
            ref_logprobs: (N, T), or None when the objective does not read them.
            log_z: (N,) log Z per sequence under ``log_z.mode=group`` (:meth:`_group_log_z`); None when
                the head computes it (or the objective has none).

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
            minibatch_plan(step_rows, size=t.mini_batch_size, seed=t.seed, step=self.step, epoch=epoch)
            for epoch in range(t.epochs_per_rollout)
        ]
        show = t.progress and dp.is_main and sys.stderr.isatty()
        bar = tqdm(total=sum(map(len, plans)), desc="update", disable=not show, leave=False)
        for epoch, plan in enumerate(plans):
            # the head's dropout: a stream per sequence, keyed by its position in the step (any K)
            base = torch.tensor([derive_seed(t.seed, "log_z_dropout", self.step, epoch)], device=self.device)
            keys = stream_keys(base, num_local * dp.world_size)[offset : offset + num_local]
            for mini in plan:
                local = mini[(mini >= offset) & (mini < offset + num_local)] - offset
                self.optimizer.zero_grad(set_to_none=True)
                loss = self._accumulate(
                    local, rollout, advantages, old_logprobs, ref_logprobs, keys, sums, log_z
                )
                if not self.sharded:  # FSDP has reduce-scattered them already, in backward
                    dp.all_reduce_grads(params)
                if head_params:  # before clipping: how hard the loss pulls on the head itself
                    sums["log_z_grad_norm"] += sharding.grad_norm(head_params) * len(mini)
                grad_norm = sharding.clip_grad_norm_(params, self.cfg.optim.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)  # gradients are not held through the rollout
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
            with self._autocast():
                out = self.policy(
                    mb.input_ids,
                    mb.attention_mask,
                    mb.prompt_length,
                    temperature=self.sampling.temperature,
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

    def _show_samples(self, indices: list[int], texts: list[str], results: list[RewardResult]) -> None:
        n = self.sampling.n
        records = [
            {
                "prompt": self.prompts.examples[indices[j]]["prompt"][-1]["content"],
                "response": texts[j * n],  # the first sample of the first k prompts
                "reward": results[j * n].score,
                "status": results[j * n].status.value,
            }
            for j in range(min(self.cfg.train.num_samples_to_show, len(indices)))
        ]
        self._print(reports.write_samples(self.run_dir, self.step, records))

    def _save(self) -> None:
        """Rank 0 writes the checkpoint (every rank holds the same weights and state, or, sharded, every
        rank first gathers its shards to rank 0); the rest wait."""
        state = {"scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict()}
        model_state = head_state = None
        if self.sharded:  # every rank gathers its shards to rank 0
            model_state, head_state, state["optimizer"] = sharding.gather_checkpoint(
                self.policy, self.optimizer
            )
        else:
            state["optimizer"] = self.optimizer.state_dict()
        if self.dp.is_main:
            path = ckpt.save_checkpoint(
                self.run_dir / ckpt.CHECKPOINTS_DIR,
                self.step,
                model=self.policy.model,
                tokenizer=self.tokenizer,
                head=self.policy.log_z_head,
                trainer_state=state,
                keep=self.cfg.train.keep_checkpoints,
                model_state_dict=model_state,
                head_state_dict=head_state,
            )
            self._print(f"checkpoint: {path}")
        self.saved_step = self.step
        self.dp.barrier()

    def _load_optimizer(self, state: dict[str, Any]) -> None:
        """A checkpoint's optimizer state (the same full layout under ``ddp`` and ``fsdp2``)."""
        if self.sharded:
            sharding.load_full_optimizer_state(self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])

    def _model_state_bytes(self) -> int:
        """Bytes this rank holds of the policy's parameters and the optimizer's states (shards only)."""
        states = self.optimizer.state.values()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]  # the sharded ones
        frozen = [p for p in self.policy.parameters() if not p.requires_grad]
        tensors = [*params, *frozen, *(v for s in states for v in s.values() if torch.is_tensor(v))]
        return sum(sharding.local(t).numel() * t.element_size() for t in tensors)

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop: every rank calls this at the same points, so all stop
        at the same step."""
        return self.dp.sum(float(self._stop.requested)) > 0

    def _reward_metrics(
        self, results: list[RewardResult], indices: list[int], rewards: Tensor, valid: Tensor
    ) -> dict[str, float]:
        """Every rank's reward statistics (:func:`flowrl.reports.reward_metrics`) and status counts."""
        correct = torch.tensor([r.status is RewardStatus.CORRECT for r in results], device=self.device)
        ids = [self._source_ids[str(self.prompts.examples[i].get("data_source"))] for i in indices]
        source = torch.tensor(ids, device=self.device).repeat_interleave(self.sampling.n)
        gathered = [self.dp.gather(x) for x in (rewards, valid, correct, source)]
        return {
            **reports.reward_metrics(*gathered, list(self._source_ids)),
            **self.dp.sum_dict(status_counts(results)),
        }

    def _report_failures(self, results: list[RewardResult], indices: list[int]) -> None:
        """Failed rewards counted by reason: one console line and ``reward_failures.jsonl``."""
        n = self.sampling.n
        mine = [
            (r.status.value, r.detail[:300], str(self.prompts.examples[indices[j // n]].get("data_source")))
            for j, r in enumerate(results)
            if not r.ok
        ]
        every = [f for part in self.dp.gather_object(mine) for f in part]
        if every and self.dp.is_main:
            self._print(reports.write_failures(self.run_dir, self.step, every))

    def _abandon_step(self, sampler_state: dict[str, int]) -> None:
        """Undo the start of a step that applied nothing (the prompts go back to the sampler)."""
        self.step -= 1
        self.sampler.load_state_dict(sampler_state)

    # -- the loop ----------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train until ``train.total_steps`` or a stop signal; returns the run directory, metrics, policy
        and tokenizer (``stopped_by``: the signal that stopped the run, after its checkpoint was written)."""
        # One thread runs the reference pass beside scoring (train.overlap_reference) for the whole run:
        # a new thread per step would start a new OpenMP team with cold caches each time.
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowrl-reference") as beside,
            StopRequested() as stop,
        ):
            self._beside, self._stop = beside, stop
            return self._fit()

    def _fit(self) -> TrainResult:
        cfg, obj, dp = self.cfg, self.objective, self.dp
        t = cfg.train
        sources = sorted({str(e.get("data_source")) for e in self.prompts.examples})
        self._source_ids = {name: k for k, name in enumerate(sources)}
        stopped = False
        while self.step < t.total_steps:
            self.step += 1
            started = time.perf_counter()
            sampler_state = self.sampler.state_dict()

            # 1. rollout: every rank draws the step's prompts and samples its contiguous share
            first = dp.rank * self.prompts_per_rank
            indices = self.sampler.next(t.prompts_per_step)[first : first + self.prompts_per_rank]
            if self._engine_stale:  # the policy changed since the engine last saw it
                self.engine.sync_weights(self.policy.model)
                self._engine_stale = False
            rollout = self._rollout(indices, first)
            self.engine.release_memory()
            torch.manual_seed(derive_seed(t.seed, "update", self.step, dp.rank))  # dropout
            generated = time.perf_counter()
            if self._stop_agreed():  # nothing of this step is applied yet: abandon it
                self._abandon_step(sampler_state)
                stopped = True
                break

            # 2. rewards, failures counted and left out (never scored 0); on a GPU the reference forward
            # runs beside them in a second thread: neither reads the other, the verifiers and sandboxes
            # work in their own processes, and torch releases the GIL. Scoring stays on this thread,
            # where a custom reward may use signals.
            reference = None
            if self.ref_policy is not None:  # its entropy is never read
                run = self._beside.submit if self.overlap_reference else _run_now
                reference = run(self._logprobs_no_grad, self.ref_policy, rollout, with_entropy=False)
            try:
                texts, results = self._score(rollout, indices)
            finally:  # a failed scoring waits for the pass, so no thread outlives the step
                ref_logprobs = None if reference is None else reference.result()[0]
            if self._stop_agreed():  # a Ctrl-C may have reached the scorers too: abandon the step
                self._abandon_step(sampler_state)
                stopped = True
                break
            self._report_failures(results, indices)
            rewards = torch.tensor([r.score for r in results], dtype=torch.float32, device=self.device)
            valid = torch.tensor([r.ok for r in results], device=self.device)
            step_rewards, step_valid = dp.gather(rewards), dp.gather(valid)
            if not bool(step_valid.any()):
                check_batch_usable(results)  # no rank has a usable reward: every rank raises here

            # 3-4. old log-probs (no gradient) when the batch makes several optimizer steps, then advantages
            updates_per_rollout = math.ceil(int(step_valid.sum()) / t.mini_batch_size) * t.epochs_per_rollout
            old_logprobs = entropy = None
            # REINFORCE++'s KL needs both; the group log Z needs ell before the update
            if updates_per_rollout > 1 or obj.advantage_uses_ref_logprobs or self.group_log_z:
                old_logprobs, entropy = self._logprobs_no_grad(self.policy, rollout, with_entropy=True)
            mask = rollout.response_mask.float()
            step_advantages = self._advantages(step_rewards, step_valid, mask, old_logprobs, ref_logprobs)
            num_local, offset = len(rewards), dp.rank * len(rewards)
            advantages = step_advantages[offset : offset + num_local]
            if advantages.dim() == 2:
                advantages = advantages[:, : mask.shape[1]]
            scored = time.perf_counter()

            # 5. update on the sequences whose reward was computed (a stop signal now waits for it)
            rows = valid.nonzero().squeeze(-1)
            log_z = None
            if self.group_log_z:  # old_logprobs: this policy's log-probs, computed above
                log_z = self._group_log_z(valid, advantages, old_logprobs, ref_logprobs, mask)
            metrics = self._update(rollout, rows, advantages, old_logprobs, ref_logprobs, log_z)
            self.scheduler.step()
            self._engine_stale = True

            # 6. metrics, over every rank's sequences
            lengths = dp.gather(rollout.response_lengths.float())
            metrics.update(self._reward_metrics(results, indices, rewards, valid))
            if step_advantages.dim() == 1:
                advantage_abs = float(step_advantages[step_valid].abs().mean())
            else:  # per-token advantages: the mean over response tokens
                step_mask = dp.gather(mask)[step_valid]
                advantage_abs = float(masked_mean(step_advantages[step_valid].abs(), step_mask))
            now = time.perf_counter()
            metrics.update(
                {
                    "actor/advantage_abs": advantage_abs,
                    "rollout/response_length": float(lengths.mean()),
                    "rollout/response_length_max": float(lengths.max()),
                    "rollout/truncation_rate": float(dp.gather(rollout.truncated).float().mean()),
                    "optim/lr": self.optimizer.param_groups[0]["lr"],
                    "perf/rollout_time_s": generated - started,
                    "perf/score_and_logprob_time_s": scored - generated,
                    "perf/update_time_s": now - scored,
                    "perf/step_time_s": now - started,
                    "perf/tokens_per_s": float(lengths.sum()) / (now - started),
                    "perf/model_state_gb": self._model_state_bytes() / 1e9,
                }
            )
            if entropy is not None:
                totals = dp.sum_dict({"entropy": float((entropy * mask).sum()), "tokens": float(mask.sum())})
                metrics["actor/entropy"] = totals["entropy"] / max(totals["tokens"], 1.0)
            if self.logger is not None:
                console = self.step % max(t.log_every, 1) == 0 or self.step == t.total_steps
                self.logger.log(self.step, metrics, console=console)
            if t.sample_every and self.step % t.sample_every == 0 and dp.is_main:
                self._show_samples(indices, texts, results)
            if (t.save_every and self.step % t.save_every == 0) or self.step == t.total_steps:
                self._save()
            if self._stop_agreed():
                stopped = True
                break
        stopped_by = None
        if stopped:
            stopped_by = self._stop.signum or signal.SIGTERM  # the signal reached another rank only
            if self.step > self.saved_step:
                self._save()
        if self.logger is not None:
            self.logger.close()
        if t.plot and dp.is_main:
            plot = plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "training.png")
            self._print(f"plot: {plot}")
        dp.barrier()  # rank 0 has written metrics.jsonl
        path = self.run_dir / "metrics.jsonl"
        metrics_rows = read_metrics(path) if path.exists() else []  # other ranks: needs a shared disk
        return TrainResult(self.run_dir, metrics_rows, self.policy, self.tokenizer, stopped_by)


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, force: bool = False) -> TrainResult:
    """Build a :class:`Trainer` from ``cfg`` and :func:`run` it.

    Raises:
        flowrl.preflight.InputError: ``cfg`` cannot work (found before any weights load); also when
            ``train.output_dir`` holds an earlier run and neither ``resume`` nor ``overwrite`` is set.
    """
    return run(Trainer(cfg, resume=resume, overwrite=overwrite, force=force))


def run(trainer: Trainer) -> TrainResult:
    """Train to ``train.total_steps`` (or a stop signal); under torchrun, leave the process group after."""
    try:
        result = trainer.fit()
        # leave together: a rank tearing down gloo while another still talks to it can abort the process
        trainer.dp.barrier()
        return result
    finally:
        trainer.dp.close()
