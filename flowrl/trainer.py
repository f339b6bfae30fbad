"""The training loop, top to bottom: rollout -> score -> reference and old log-probs -> update -> log.

Shape legend: N sequences per RL step (prompts_per_step x num_samples_per_prompt, the samples of one
prompt contiguous), P prompt tokens, T response tokens. Under torchrun, N is this rank's share.

One RL step:
  1. take ``prompts_per_step`` prompts, sample ``num_samples_per_prompt`` responses each;
  2. score them (:mod:`flowrl.scoring`: the reward registry, or the config's ``module:function``);
     failed rewards are counted and their samples left out of the update; a step where every reward
     failed stops the run;
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

Steps 3 to 5 are the policy's side, :class:`flowrl.actor.Actor`; checkpoints are written and resumed
through :func:`flowrl.checkpoint.save_training` and :func:`~flowrl.checkpoint.resume_training`.

Before any weights load, :mod:`flowrl.preflight` checks the inputs and the output directory. A SIGINT or
SIGTERM (:mod:`flowrl.stopping`) is honoured at three points of a step, agreed across ranks: after the
rollout and after scoring, where the step is abandoned (nothing of it is applied), and at its end; then
the checkpoint of the last completed step is written and :meth:`Trainer.fit` returns.

Data parallelism (``torchrun --nproc_per_node K -m flowrl.commands train CONFIG.yaml``): K processes compute
what one process computes; :mod:`flowrl.distributed` says how (prompts, random streams, advantages,
mini-batches, metrics), :mod:`flowrl.sharding` what ``train.strategy=fsdp2`` adds.
"""

from __future__ import annotations

import signal
import sys
import time
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
from flowrl.actor import Actor
from flowrl.config import Config, to_yaml
from flowrl.data.prompts import PromptSampler, load_prompts
from flowrl.distributed import derive_seed
from flowrl.logging import MetricsLogger, plot_metrics, read_metrics
from flowrl.models import compute_in_bf16, needs_reference, prepare_models
from flowrl.objectives import OBJECTIVES, Objective
from flowrl.optim import build_scheduler, weights_an_update_cannot_move
from flowrl.policy import Policy, load_tokenizer
from flowrl.rewards.base import RewardResult
from flowrl.rollout import RolloutBatch, SamplingParams, build_engine
from flowrl.scoring import Scorer, Scores
from flowrl.stopping import StopRequested


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
        preflight.check_processes(cfg, world_size=self.dp.world_size)
        preflight.check_memory(
            cfg, world_size=self.dp.world_size, device=self.device, force=force, report=self._print
        )

        m = cfg.model
        self.tokenizer = load_tokenizer(m.path, trust_remote_code=m.trust_remote_code)
        self.prompts = load_prompts(checked.rows, checked.files, self.tokenizer, cfg.data.max_prompt_length)
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
        self.units = models.units
        frozen = weights_an_update_cannot_move(self.optimizer)
        if frozen is not None and frozen[0]:
            stalled, total, dtype = frozen
            self._print(
                f"note: the trained weights are {dtype} (model.dtype): an AdamW step of lr {cfg.optim.lr:g} "
                f"is below the rounding of at least {stalled / total:.0%} of them, which will not move; keep "
                "model.dtype=float32 (train.bf16 computes in bf16 over float32 weights), or set "
                "train.offload_optimizer=true (float32 master weights in host memory) or model.lora.rank"
            )
        self.actor = Actor(
            cfg,
            self.policy,
            self.optimizer,
            self.objective,
            self.dp,
            sharded=self.sharded,
            bf16=compute_in_bf16(cfg, self.device),
            stepper=models.stepper,
        )
        self.scorer = Scorer(
            self.prompts.examples,
            self.tokenizer,
            checked.reward_fn,
            num_workers=cfg.reward.num_workers,
            num_samples=cfg.rollout.num_samples_per_prompt,
            dp=self.dp,
            run_dir=self.run_dir,
            report=self._print,
        )
        self.scheduler = build_scheduler(cfg, self.optimizer)
        show = cfg.train.progress and self.dp.is_main and sys.stderr.isatty()
        self.engine = build_engine(cfg, self.policy.model, self.tokenizer, show_progress=show)
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
            self.step = ckpt.resume_training(
                resume_from,
                optimizer=self.optimizer,
                sharded=self.sharded,
                scheduler=self.scheduler,
                sampler=self.sampler,
            )
            self._print(f"resumed from {resume_from} at step {self.step}")
        self.saved_step = self.step  # the step of the newest checkpoint on disk
        if not self.sharded:  # sharded runs load the same weights on every rank and shard them alike
            self.dp.broadcast_parameters(self.policy.parameters())

        # Everything loaded: only now does the run directory change (an earlier run is replaced here).
        self.logger = self._open_run_dir(overwrite=overwrite, resumed=resume_from is not None)
        self.dp.barrier()  # the run directory exists for every rank

    # -- pieces of one step ------------------------------------------------------------------------

    def _print(self, text: str) -> None:
        if self.dp.is_main:  # through tqdm, so a progress bar on the terminal is not torn
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()

    def _open_run_dir(self, *, overwrite: bool, resumed: bool) -> MetricsLogger | None:
        """Rank 0 clears an earlier run (``overwrite``), writes ``config.yaml`` and the skipped prompts,
        and opens the metrics logger (appending to a ``resumed`` run's); other ranks get no logger."""
        if not self.dp.is_main:
            return None
        cfg = self.cfg
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
        return MetricsLogger(
            self.run_dir,
            total_steps=cfg.train.total_steps,
            tensorboard=cfg.train.tensorboard,
            wandb_project=cfg.train.wandb_project,
            config=asdict(cfg),
            append=resumed,
            resume_step=self.step,
            progress=cfg.train.progress,
        )

    def _rollout(self, indices: list[int], first: int) -> RolloutBatch:
        """Sample this rank's responses to ``indices``, the prompts at positions ``first, first + 1, ...``
        of the step, in one call: the engine keeps ``rollout.batch_size`` sequences decoding, prompts
        taking the slots of finished ones. Each prompt's samples are seeded by ``(seed, step, its
        position)``: the same whichever process generates them and whatever the batch size. The engine
        gets the policy's weights first when they changed since its last rollout."""
        if self._engine_stale:  # the policy changed since the engine last saw it
            self.engine.sync_weights(self.policy.model)
            self._engine_stale = False
        prompts = [self.prompts.prompt_ids[i] for i in indices]
        seeds = [
            derive_seed(self.cfg.train.seed, "rollout", self.step, first + k) for k in range(len(indices))
        ]
        gather = sharding.gathered(self.units) if self.sharded else nullcontext()
        with gather, self.actor.autocast():  # gathered once per step; on a GPU: bf16 weights, bf16 KV cache
            rollout = self.engine.generate(prompts, self.sampling, seeds=seeds)
        self.engine.release_memory()  # what generation holds on the device, while the update runs
        return rollout

    def _save(self) -> None:
        """Rank 0 writes the checkpoint (every rank holds the same weights and state, or, sharded, every
        rank first gathers its shards to rank 0); the rest wait."""
        path = ckpt.save_training(
            self.run_dir / ckpt.CHECKPOINTS_DIR,
            self.step,
            policy=self.policy,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            state={"scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict()},
            sharded=self.sharded,
            write=self.dp.is_main,
            keep=self.cfg.train.keep_checkpoints,
        )
        if path is not None:
            self._print(f"checkpoint: {path}")
        self.saved_step = self.step
        self.dp.barrier()

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop: every rank calls this at the same points, so all stop
        at the same step."""
        return self.dp.sum(float(self._stop.requested)) > 0

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
        t, dp, actor = self.cfg.train, self.dp, self.actor
        stopped = False
        while self.step < t.total_steps:
            self.step += 1
            started = time.perf_counter()
            sampler_state = self.sampler.state_dict()

            # 1. rollout: every rank draws the step's prompts and samples its contiguous share
            first = dp.rank * self.prompts_per_rank
            indices = self.sampler.next(t.prompts_per_step)[first : first + self.prompts_per_rank]
            rollout = self._rollout(indices, first)
            torch.manual_seed(derive_seed(t.seed, "update", self.step, dp.rank))  # dropout
            generated = time.perf_counter()
            if self._stop_agreed():  # nothing of this step is applied yet: abandon it
                self._abandon_step(sampler_state)
                stopped = True
                break

            # 2. rewards, failures counted and left out (never scored 0); the reference pass beside them
            texts, results, ref_logprobs = self._score_beside_reference(rollout, indices)
            if self._stop_agreed():  # a Ctrl-C may have reached the scorers too: abandon the step
                self._abandon_step(sampler_state)
                stopped = True
                break
            scores = self.scorer.collect(texts, results, indices, self.step)

            # 3-4. old log-probs (no gradient) when the update needs them, then advantages
            old_logprobs = entropy = None
            if actor.needs_old_logprobs(int(scores.step_valid.sum())):
                old_logprobs, entropy = actor.logprobs(self.policy, rollout, with_entropy=True)
            mask = rollout.response_mask.float()
            step_advantages, advantages = actor.advantages(
                scores.step_rewards, scores.step_valid, mask, old_logprobs, ref_logprobs
            )
            scored = time.perf_counter()

            # 5. update on the sequences whose reward was computed (a stop signal now waits for it)
            log_z = None
            if actor.log_z_per_group:  # old_logprobs: this policy's log-probs, computed above
                log_z = actor.group_log_z(scores.valid, advantages, old_logprobs, ref_logprobs, mask)
            rows = scores.valid.nonzero().squeeze(-1)
            metrics = actor.update(
                rollout, rows, advantages, old_logprobs, ref_logprobs, log_z, step=self.step
            )
            self.scheduler.step()
            self._engine_stale = True

            # 6. metrics over every rank's sequences, logs, samples, checkpoint
            times = (started, generated, scored)
            metrics.update(self._step_metrics(rollout, scores, indices, step_advantages, entropy, times))
            if self.logger is not None:
                console = self.step % max(t.log_every, 1) == 0 or self.step == t.total_steps
                self.logger.log(self.step, metrics, console=console)
            if t.sample_every and self.step % t.sample_every == 0 and dp.is_main:
                self.scorer.show_samples(scores, indices, self.step, t.num_samples_to_show)
            if (t.save_every and self.step % t.save_every == 0) or self.step == t.total_steps:
                self._save()
            if self._stop_agreed():
                stopped = True
                break
        return self._finish(stopped)

    def _score_beside_reference(
        self, rollout: RolloutBatch, indices: list[int]
    ) -> tuple[list[str], list[RewardResult], Tensor | None]:
        """The responses decoded and scored, and the reference's log-probs (None without a reference).

        With ``train.overlap_reference`` (the default on a GPU) the reference forward runs beside the
        scoring in a second thread: neither reads the other, the verifiers and sandboxes work in their
        own processes, and torch releases the GIL. Scoring stays on this thread, where a custom reward
        may use signals.
        """
        reference = None
        if self.ref_policy is not None:  # its entropy is never read
            run = self._beside.submit if self.overlap_reference else _run_now
            reference = run(self.actor.logprobs, self.ref_policy, rollout, with_entropy=False)
        try:
            texts, results = self.scorer.score(rollout, indices)
        finally:  # a failed scoring waits for the pass, so no thread outlives the step
            ref_logprobs = None if reference is None else reference.result()[0]
        return texts, results, ref_logprobs

    def _step_metrics(
        self,
        rollout: RolloutBatch,
        scores: Scores,
        indices: list[int],
        step_advantages: Tensor,
        entropy: Tensor | None,
        times: tuple[float, float, float],
    ) -> dict[str, float]:
        """The step's reward, advantage, response-length and timing metrics over every rank's sequences
        (and the entropy from the no-gradient pass when it ran); ``times``: when the step started, its
        rollout ended, and its scoring and log-prob passes ended."""
        started, generated, scored = times
        dp, mask = self.dp, rollout.response_mask.float()
        lengths = dp.gather(rollout.response_lengths.float())
        metrics = self.scorer.metrics(scores, indices)
        advantage_abs = self.actor.advantage_abs(step_advantages, scores.step_valid, mask)
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
                "perf/model_state_gb": self.actor.model_state_bytes() / 1e9,
            }
        )
        if entropy is not None:
            metrics["actor/entropy"] = self.actor.entropy(entropy, mask)
        return metrics

    def _finish(self, stopped: bool) -> TrainResult:
        """After the last step: a stopped run's checkpoint, the logs closed, the plot; every rank's result."""
        stopped_by = None
        if stopped:
            stopped_by = self._stop.signum or signal.SIGTERM  # the signal reached another rank only
            if self.step > self.saved_step:
                self._save()
        if self.logger is not None:
            self.logger.close()
        if self.cfg.train.plot and self.dp.is_main:
            plot = plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "training.png")
            self._print(f"plot: {plot}")
        self.dp.barrier()  # rank 0 has written metrics.jsonl
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
