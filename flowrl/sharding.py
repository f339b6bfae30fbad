"""FSDP2 (``train.strategy=fsdp2``): parameters, gradients and optimizer states sharded across ranks.

:func:`shard_policy` applies ``torch.distributed.fsdp.fully_shard`` to every decoder layer and then to
the :class:`~flowrl.policy.Policy` itself, the root: the root unit holds what is left (embeddings, final
norm, output head, the log Z head). Calls always go through the root's ``forward`` (never into a
sharded submodule directly), so the fused log-prob path reads the output head's weight while the root
holds it gathered, and its gradient flows back through the root's hooks.

The trainer's data-parallel contract holds as under ``ddp`` (see :mod:`flowrl.trainer`): gradients are
*summed* across ranks (each rank divides its loss by the global unit count), here by the reduce-scatter
instead of an all-reduce. What FSDP adds:

* every rank runs the same number of forwards and backwards (each one all-gathers and reduce-scatters),
  so a rank with fewer micro-batches in a mini-batch runs zero-weighted ones (:func:`lockstep_count`);
* rollout gathers the weights once per step and decodes on them (:func:`gathered`): no collective per
  decoded token, so ranks may decode different numbers of tokens;
* checkpoints gather full state dicts to rank 0 (:func:`full_state_dict`), so a checkpoint is the same
  plain Hugging Face directory as a one-process run's, and resumes under any strategy.

With bfloat16 compute (``train.bf16``, on by default on a GPU) the gathered parameters are bfloat16
and gradients are reduced in float32 (``MixedPrecisionPolicy``); otherwise they stay in the policy's
dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flowrl.host_memory import release_freed_memory
from flowrl.policy import Policy, causal_lm


def decoder_layers(policy: Policy) -> list[nn.Module]:
    """The decoder layers of the policy's transformers model (``model.layers`` in Qwen2 and Llama)."""
    decoder = causal_lm(policy.model).base_model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(
            f"train.strategy=fsdp2 shards decoder layers, but {type(decoder).__name__} has no `layers`; "
            "use train.strategy=ddp for this model"
        )
    return list(layers)


def shard_policy(policy: Policy, *, mixed_precision: bool) -> list[nn.Module]:
    """Shard ``policy`` in place (each decoder layer, then the root); returns its FSDP units, root first.

    Gradients are summed across ranks, never averaged: the loss is already divided by the global count.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    options: dict[str, Any] = {}
    if mixed_precision:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(policy):
        fully_shard(layer, **options)
    fully_shard(policy, **options)
    units = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    in_place = _in_place_reduce_scatter() if hasattr(FSDPModule, "set_custom_reduce_scatter") else None
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
        if in_place is not None:
            unit.set_custom_reduce_scatter(in_place)
    return units


def _in_place_reduce_scatter() -> Any:
    """On gloo (CPU): FSDP2's reduce-scatter as one in-place reduce per destination chunk.

    Gloo's own ``reduce_scatter_tensor`` copies its whole input first: at the root unit (the embedding,
    28% of Qwen2.5-0.5B) that is one more float32 model-embedding-sized buffer at the end of backward,
    the update's peak. Reducing each rank's chunk in place into that rank moves the same bytes and
    allocates nothing. NCCL (GPU) keeps FSDP2's default. ``None`` when not on gloo or when this
    PyTorch has no custom reduce-scatter.
    """
    if dist.get_backend() != "gloo":
        return None
    try:  # FSDP2's own comm (its buffers come from torch.empty); only __call__ changes
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter
    except ImportError:
        return None

    class InPlaceReduceScatter(DefaultReduceScatter):
        def __call__(
            self, output_tensor: Tensor, input_tensor: Tensor, group: Any, op: Any, async_op: bool = False
        ) -> None:
            chunks = input_tensor.view(dist.get_world_size(group), -1)
            for index, chunk in enumerate(chunks):
                dist.reduce(chunk, dst=dist.get_global_rank(group, index), op=op, group=group)
            output_tensor.copy_(chunks[dist.get_rank(group)])

    return InPlaceReduceScatter()


@contextmanager
def gathered(units: list[nn.Module]) -> Iterator[None]:
    """Hold every unit's full parameters while inside (rollout): gathered once, freed on exit.

    ``units`` as :func:`shard_policy` returns them, the root first. On exit each unit gets FSDP's own
    setting back: the layers free their gathered weights after each forward, the root keeps them for
    the backward that follows.
    """
    for unit in units:
        unit.set_reshard_after_forward(False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not units[0])
        release_freed_memory()  # the gathered weights' heap (on CPU it would stay resident otherwise)


def is_sharded(param: Tensor) -> bool:
    return hasattr(param, "to_local")


def local(t: Tensor) -> Tensor:
    """This rank's shard of ``t`` (``t`` itself when it is not sharded)."""
    return t.to_local() if is_sharded(t) else t


def grad_norm(params: list[nn.Parameter]) -> Tensor:
    """The global L2 norm of the parameters' gradients, sharded (DTensor) or not: () float32."""
    # one reduction per tensor, widened inside it: no squared (or float32) copy of a gradient
    norms = [
        torch.linalg.vector_norm(local(p.grad), dtype=torch.float32) for p in params if p.grad is not None
    ]
    squares = torch.stack(norms).square().sum() if norms else torch.zeros(())
    if any(is_sharded(p) for p in params) and dist.is_initialized():
        dist.all_reduce(squares)  # the shards are disjoint: their squares add up
    return squares.sqrt()


@torch.no_grad()
def clip_grad_norm_(params: list[nn.Parameter], max_norm: float | None) -> Tensor:
    """Scale the gradients so their global norm is at most ``max_norm`` (0 or None: no clipping);
    returns the norm before."""
    total = grad_norm(params)
    if not max_norm:
        return total
    scale = float((max_norm / (total + 1e-6)).clamp(max=1.0))  # one sync per optimizer step
    if scale < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)  # on the DTensor itself: its shard is what the optimizer reads
    return total


def lockstep_count(count: int) -> int:
    """The largest ``count`` over the ranks (how many forwards every rank must run)."""
    t = torch.tensor([count])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The module's full state dict on rank 0 (on CPU), empty elsewhere; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)


def tied_duplicates(model: nn.Module) -> list[str]:
    """Names of parameters that are another, earlier-named parameter (tied input and output embeddings)."""
    seen: set[int] = set()
    duplicates = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            duplicates.append(name)
        seen.add(id(param))
    return duplicates


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's ``state_dict()`` with every sharded state gathered to full tensors (on CPU): the
    same layout a one-process run saves, so checkpoints resume under either strategy. Every rank must
    call it (the gathers are collectives)."""
    state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: build new ones
    state["state"] = {
        index: {k: v.full_tensor().cpu() if is_sharded(v) else v for k, v in state["state"][index].items()}
        for index in sorted(state["state"])
    }
    return state


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full ``state_dict()`` (one process's, or :func:`full_optimizer_state`'s) into an optimizer
    over sharded parameters: each state tensor shaped like its parameter is cut to this rank's shard."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]

    def shard(param: Tensor, value: Any) -> Any:
        if is_sharded(param) and torch.is_tensor(value) and value.shape == param.shape:
            return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
        return value

    entries = {i: {k: shard(params[i], v) for k, v in st.items()} for i, st in state["state"].items()}
    optimizer.load_state_dict({**state, "state": entries})


def gather_checkpoint(
    policy: Policy, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """What a checkpoint of a sharded run holds, gathered to rank 0: the model's state dict (as the
    transformers model names it, tied weights once), the log Z head's, and the optimizer's (the layout
    of one process). Every rank must call it."""
    from flowrl.partition import LOG_Z_PREFIX

    full = full_state_dict(policy)  # keys as the Policy names them
    model = {k[len("model.") :]: v for k, v in full.items() if k.startswith("model.")}
    for name in tied_duplicates(policy.model):  # saved once, as a plain run saves them
        model.pop(name, None)
    head = {k[len(LOG_Z_PREFIX) :]: v for k, v in full.items() if k.startswith(LOG_Z_PREFIX)}
    return model, head, full_optimizer_state(optimizer)
