"""The optimizer: AdamW over the trainable parameters, where its states live, when it steps, its schedule.

* :func:`build_optimizer`: AdamW over the trainable parameters only (the adapters and the head with
  LoRA) in two groups (the policy's, the log Z head's), the fused implementation where the device has one
  (no for-each temporaries of about 2 bytes per parameter at ``step()``).
* :class:`HostAdamW` (``train.offload_optimizer``): its states and float32 master weights in host memory,
  for full fine-tuning on one GPU.
* :class:`StepInBackward` (``train.optimizer_in_backward``): every parameter's step run as soon as its
  gradient is complete in backward, so the gradients are never all held at once.
* :func:`build_scheduler`: linear warm-up, then constant or cosine.
* :func:`weights_an_update_cannot_move`: the 16-bit weights an update step is too small to change.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from flowrl.config import Config
from flowrl.partition import log_z_param_groups
from flowrl.policy import Policy


class HostAdamW(torch.optim.Optimizer):
    """AdamW with its states and float32 master weights in host memory (``train.offload_optimizer``).

    The device keeps the weights and, between backward and step, the gradients; ``step()`` copies the
    gradients to the host, runs AdamW there (fused on CPU) and copies the new weights back. The learning
    rate and weight decay are read from this optimizer's own parameter groups at every step, so a
    scheduler works on it as on any optimizer. About 12 bytes per trainable parameter leave the device,
    for two copies per step over the host link.
    """

    def __init__(self, groups: list[dict[str, Any]], **adamw: Any) -> None:
        super().__init__(groups, {"lr": adamw["lr"], "weight_decay": 0.0})
        host_groups = [
            {
                **{k: v for k, v in g.items() if k != "params"},
                "params": [p.detach().to("cpu", torch.float32, copy=True) for p in g["params"]],
            }
            for g in self.param_groups
        ]
        self.host = torch.optim.AdamW(host_groups, **adamw, fused=True)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group, host_group in zip(self.param_groups, self.host.param_groups, strict=True):
            host_group["lr"], host_group["weight_decay"] = group["lr"], group["weight_decay"]
            for p, hp in zip(group["params"], host_group["params"], strict=True):
                hp.grad = None if p.grad is None else p.grad.to("cpu", torch.float32)
        self.host.step()
        for group, host_group in zip(self.param_groups, self.host.param_groups, strict=True):
            for p, hp in zip(group["params"], host_group["params"], strict=True):
                p.copy_(hp)
                hp.grad = None

    def state_dict(self) -> dict[str, Any]:
        return self.host.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.host.load_state_dict(state_dict)


def weights_an_update_cannot_move(optimizer: torch.optim.Optimizer) -> tuple[int, int, str] | None:
    """How many of the optimizer's 16-bit weights are too large for a step of their group's learning rate
    to change: ``(stalled, of 16-bit, dtype)``, or None when it updates none in 16 bits.

    An AdamW step moves a weight by about the learning rate; a bfloat16 weight ``w`` rounds away anything
    under half its spacing, which is at least ``|w| * eps / 4`` (``eps`` = 2^-7): at lr 1e-6 every bf16
    weight above 5.1e-4 in size, most of a model's, stays where it is (a lower bound: counted with the
    smallest spacing). Float32 weights (whatever the compute dtype) and the host optimizer's float32
    master copies (``train.offload_optimizer``) are not at risk.
    """
    if isinstance(optimizer, HostAdamW):
        return None
    stalled = total = 0
    dtype = ""
    with torch.no_grad():
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.dtype not in (torch.bfloat16, torch.float16):
                    continue
                local = p.to_local() if hasattr(p, "to_local") else p
                limit = 4 * group["lr"] / torch.finfo(p.dtype).eps
                stalled += int((local.abs() > limit).sum())
                total += local.numel()
                dtype = str(p.dtype).removeprefix("torch.")
    return (stalled, total, dtype) if total else None


def build_optimizer(cfg: Config, policy: Policy, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: the model's (all, or the adapters) and the head's own group."""
    o = cfg.optim
    head = policy.log_z_head if policy.log_z_head is not None else nn.Module()
    groups = log_z_param_groups(  # requires_grad only: with LoRA, the adapters
        policy.model,
        head,
        lr=o.lr,
        weight_decay=o.weight_decay,
        head_lr=cfg.log_z.lr,
        head_weight_decay=cfg.log_z.weight_decay,
    )
    adamw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    if cfg.train.offload_optimizer:
        return HostAdamW(groups, **adamw)
    # fused: one kernel per parameter group, no for-each temporaries (torch has it on CPU and CUDA)
    return torch.optim.AdamW(groups, **adamw, fused=device.type in ("cuda", "cpu"))


class StepInBackward:
    """Each trainable parameter's optimizer step, run as soon as its gradient is complete in backward
    (``train.optimizer_in_backward``): a gradient is freed right after its step, so the gradients are
    never all held at once (full fine-tuning: 4 bytes per float32 parameter off the peak at the end of
    backward, 28 GB for a 7B model).

    The steps are the optimizer's own: each parameter has a one-parameter AdamW that reads the states of
    ``optimizer`` and its group's settings (learning rate and weight decay as the scheduler left them),
    so AdamW's per-parameter update is computed exactly as one ``optimizer.step()`` over all of them
    computes it, and checkpoints hold ``optimizer``'s state dict as without it. What it cannot do: clip
    to a global gradient norm (known only once every gradient exists) or accumulate micro-batches (a
    step per backward); the config refuses both with it, and a single process only (data-parallel
    gradients are summed after backward).

    A parameter whose gradient is completed outside autograd (the input embedding's rows, added at the
    end of backward by :func:`flowrl.models.embedding_gradient_in_place`) is named in ``after_backward``
    and stepped when the backward is over, with the optimizer's own ``step()``.

    Usage: ``with stepper.backward(): loss.backward()``; outside that context the hooks do nothing and
    gradients accumulate as usual. ``stepper.grad_norm(params)`` then gives the global norm of the
    gradients stepped (before their step), as the clipping path reports it.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, after_backward: Sequence[nn.Parameter] = ()
    ) -> None:
        self.optimizer = optimizer
        later = {id(p) for p in after_backward}
        self._norms: dict[int, Tensor] = {}
        self._armed = False
        self._single: dict[int, tuple[torch.optim.Optimizer, int]] = {}  # with its group's index
        for index, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if id(p) in later:
                    continue
                self._single[id(p)] = (type(optimizer)([{**group, "params": [p]}]), index)
                p.register_post_accumulate_grad_hook(self._on_gradient)

    @contextmanager
    def backward(self) -> Iterator[None]:
        """Arm the hooks for the backward inside; after it, step what completed outside autograd."""
        self._norms.clear()
        self._armed = True
        try:
            yield
        finally:
            self._armed = False
        with torch.no_grad():
            rest = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            for p in rest:
                self._norms[id(p)] = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
        self.optimizer.step()  # only what still has a gradient: those named in after_backward
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def _on_gradient(self, p: Tensor) -> None:
        if not self._armed:
            return
        if id(p) in self._norms:
            raise RuntimeError(
                f"a parameter of shape {tuple(p.shape)} received its gradient in two parts in one backward "
                "(a weight shared between re-entrant checkpointed layers?), and was already stepped with "
                "the first: set train.optimizer_in_backward=false for this model"
            )
        self._norms[id(p)] = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
        single, index = self._single[id(p)]
        # read now: the scheduler sets the group's learning rate, and load_state_dict replaces the
        # optimizer's groups and state with new objects
        group = self.optimizer.param_groups[index]
        single.param_groups[0].update({k: v for k, v in group.items() if k != "params"})
        single.state = self.optimizer.state
        single.step()
        p.grad = None

    def grad_norm(self, params: Sequence[Tensor]) -> Tensor:
        """The global L2 norm of the gradients of ``params`` stepped in the last backward: () float32."""
        norms = [self._norms[id(p)] for p in params if id(p) in self._norms]
        return torch.stack(norms).square().sum().sqrt() if norms else torch.zeros(())


def lr_factor(warmup_steps: int, total_steps: int, schedule: str) -> Any:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over ``optim.warmup_steps`` RL steps, then constant or cosine to 0 at the end."""
    o = cfg.optim
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(o.warmup_steps, cfg.train.total_steps, o.schedule)
    )
