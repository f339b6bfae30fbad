"""Model preparation: the policy's precision and LoRA adapters, the reference, the optimizer.

The trainer asks :func:`prepare_models` for what a run trains and reads; everything about how the models
are held in memory is decided here, so the loop stays the loop.

* **Full fine-tuning** (``model.lora.rank = 0``): the policy is loaded in ``model.dtype``; a reference,
  when the objective reads one, is a second frozen copy in ``model.ref_dtype`` (default: bfloat16 on a
  GPU, where its log-probs are computed under bf16 autocast anyway; the policy's dtype on CPU).
* **LoRA** (``model.lora.rank > 0``, through peft): the base model is loaded in ``model.dtype`` (bfloat16
  halves it) and frozen; peft adds rank-r adapters to ``model.lora.target_modules`` (``all-linear``:
  every linear layer of the decoder, never the output head), kept in float32. The reference is the same
  model with its adapters switched off (:class:`AdaptersDisabled`): no second copy, and at step 0 the
  reference log-probs equal the policy's exactly. The log Z head is a separate module, never wrapped,
  trained in full (float32) in its own parameter group.
* **Sharding** (``train.strategy=fsdp2`` under torchrun): the policy and the reference are sharded
  with FSDP2 after loading (see :mod:`flowrl.sharding`); the optimizer is built over the shards.
* **The optimizer** (:mod:`flowrl.optim`): AdamW over the trainable parameters only (the adapters and
  the head with LoRA), built over the shards; with ``train.offload_optimizer`` its states live in host
  memory, with ``train.optimizer_in_backward`` each parameter steps as soon as its gradient is complete.

What a checkpoint holds follows: ``model/`` (a full Hugging Face model) for full fine-tuning, ``adapter/``
(peft's adapter files, which name their base model) for LoRA; see :mod:`flowrl.checkpoint`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowrl import sharding
from flowrl.checkpoint import HEAD_FILE, load_log_z_head, model_dir_of
from flowrl.config import Config
from flowrl.host_memory import release_freed_memory, return_large_blocks
from flowrl.optim import StepInBackward, build_optimizer
from flowrl.partition import LogZHead
from flowrl.policy import Policy, is_peft_model, load_model, verify_logprobs

ALL_LINEAR = "all-linear"
LARGE_MODEL_BYTES = 256 << 20
"""From this size of the policy's weights on (64M float32 parameters), the process returns freed large
blocks to the system (:func:`flowrl.host_memory.return_large_blocks`): the model's states are then most
of its memory, and a block's pages are worth more than the page faults of mapping it anew. Below it
(the demo's 1.5M parameters), glibc's default is kept: mapping every temporary of 128 KiB and more cost
the demo 25% of its wall time (17 s of system time in 84 s)."""


def _import_peft() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise ImportError(
            'model.lora.rank > 0 needs peft: `pip install -e ".[lora]"` (make installs it)'
        ) from exc
    return peft


def lora_config(cfg: Config) -> Any:
    """The peft ``LoraConfig`` of ``cfg.model.lora``."""
    peft = _import_peft()
    lora = cfg.model.lora
    targets = list(lora.target_modules)
    return peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets,
        task_type="CAUSAL_LM",
    )


def compute_in_bf16(cfg: Config, device: torch.device) -> bool:
    """Whether forwards compute in bfloat16: ``train.bf16``, else on a GPU. Under FSDP2 the gathered
    parameters are bfloat16 (``MixedPrecisionPolicy``, float32 gradient reduction); otherwise autocast."""
    return cfg.train.bf16 if cfg.train.bf16 is not None else device.type == "cuda"


def reference_dtype(cfg: Config, device: torch.device) -> str:
    """The reference copy's dtype: ``model.ref_dtype``, else bfloat16 on a GPU and the policy's on CPU."""
    if cfg.model.ref_dtype is not None:
        return cfg.model.ref_dtype
    return "bfloat16" if device.type == "cuda" else cfg.model.dtype


class AdaptersDisabled(nn.Module):
    """The reference of a LoRA run: the policy's own model with its adapters switched off.

    Called like a :class:`~flowrl.policy.Policy` (never for log Z). It holds no weights of its own.
    """

    def __init__(self, policy: Policy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.policy.model.disable_adapter():
            return self.policy(*args, **kwargs)


@dataclass
class Models:
    """What a run trains (``policy``, ``optimizer``) and reads (``reference``: None when not needed).

    ``units``: the policy's FSDP units under ``train.strategy=fsdp2`` (empty otherwise); ``stepper``:
    the optimizer's steps in backward under ``train.optimizer_in_backward`` (None otherwise).
    """

    policy: Policy
    reference: nn.Module | None
    optimizer: torch.optim.Optimizer
    lora: bool
    units: list[nn.Module]
    stepper: StepInBackward | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]


def needs_reference(cfg: Config) -> bool:
    """Whether the run reads reference log-probs (FlowRL's residual, a KL penalty or a KL in the reward).

    GRPO at ``kl_coef`` 0, what most users run, has no reference model at all.
    """
    from flowrl.objectives import OBJECTIVES

    objective = OBJECTIVES[cfg.algorithm.name]
    kl_coef = cfg.algorithm.loss.get("kl_coef", 0.0) or cfg.algorithm.advantage.get("kl_coef", 0.0)
    if objective.ref_logprobs_only_for_kl:
        return kl_coef > 0
    return objective.uses_ref_logprobs or objective.advantage_uses_ref_logprobs or kl_coef > 0


def load_policy_model(cfg: Config, device: torch.device, checkpoint_model: Path | None) -> nn.Module:
    """The policy's transformers model: full, or the base with LoRA adapters (new, or a checkpoint's).

    Args:
        checkpoint_model: a checkpoint's ``model/`` or ``adapter/`` directory to resume from, or None.
    """
    m = cfg.model
    load = dict(dtype=m.dtype, device=device, attn_implementation=m.attn_implementation)
    if m.lora.rank == 0:
        path = str(checkpoint_model) if checkpoint_model is not None else m.path
        return load_model(path, trust_remote_code=m.trust_remote_code, **load)
    peft = _import_peft()
    base = load_model(m.path, trust_remote_code=m.trust_remote_code, **load)
    if checkpoint_model is not None:
        model = peft.PeftModel.from_pretrained(base, str(checkpoint_model), is_trainable=True)
    else:
        model = peft.get_peft_model(base, lora_config(cfg))
    # peft keeps adapters in float32 over a bf16 base (autocast_adapter_dtype); say so if it did not
    adapter_dtypes = {p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert adapter_dtypes == {torch.float32}, f"LoRA adapters must train in float32, got {adapter_dtypes}"
    return model


def prepare_models(
    cfg: Config,
    device: torch.device,
    *,
    checkpoint: Path | None,
    needs_reference: bool,
    uses_log_z: bool,
    shard: bool = False,
) -> Models:
    """Load the policy (full or LoRA), its head, the reference when needed, and the optimizer.

    Args:
        checkpoint: a training checkpoint to resume from (its model or adapters and its head).
        uses_log_z: the objective's loss takes log Z; a head is built only when ``log_z.mode`` is
            ``"head"`` (``"group"`` estimates it from the samples: nothing to build, save or export).
        shard: shard the policy and the reference with FSDP2 (under torchrun, ``train.strategy=fsdp2``).
    """
    m = cfg.model
    model = load_policy_model(cfg, device, model_dir_of(checkpoint) if checkpoint is not None else None)
    if sum(p.numel() * p.element_size() for p in model.parameters()) >= LARGE_MODEL_BYTES:
        return_large_blocks()  # host memory: freed weights, gradients and activations leave the process
    grad_ckpt = m.gradient_checkpointing if m.gradient_checkpointing is not None else device.type == "cuda"
    if grad_ckpt:
        model.gradient_checkpointing_enable()
        if m.lora.rank > 0:  # the frozen embeddings give no gradient for checkpointed layers to carry
            model.enable_input_require_grads()
    model.config.use_cache = True
    # sharded too: the hook sees the gathered weight and its gradient
    rows_in_place = embedding_gradient_in_place(model)
    head = None
    if uses_log_z and cfg.log_z.mode == "head":  # log_z.mode=group estimates log Z: no head at all
        hidden = model.config.get_text_config().hidden_size  # a multimodal model: its language model's
        head = LogZHead(hidden, num_layers=cfg.log_z.num_layers, dropout=cfg.log_z.dropout)
        head.to(device)
    if checkpoint is not None:
        load_log_z_head(head, checkpoint / HEAD_FILE)
    policy = Policy(model, head, logprob_chunk_size=m.logprob_chunk_size)
    verify_logprobs(policy)  # the log-probs trained are the ones the rollout samples from
    policy.train()
    units: list[nn.Module] = []
    mixed = compute_in_bf16(cfg, device)
    if shard:  # before the reference loads: one full model in memory at a time
        units = sharding.shard_policy(policy, mixed_precision=mixed)
        release_freed_memory()
    reference: nn.Module | None = None
    if needs_reference and m.lora.rank > 0:
        reference = AdaptersDisabled(policy)
    elif needs_reference:
        ref_model = load_model(
            m.path,
            dtype=reference_dtype(cfg, device),
            device=device,
            attn_implementation=m.attn_implementation,
            trust_remote_code=m.trust_remote_code,
        ).eval()
        ref_model.requires_grad_(False)
        reference = Policy(ref_model, logprob_chunk_size=m.logprob_chunk_size)
        reference.logit_transform = policy.logit_transform  # the same model class: what verify found
    if shard:
        if isinstance(reference, Policy):
            for unit in sharding.shard_policy(reference, mixed_precision=mixed):
                # no backward ever follows the reference's forward: its root (the embedding) would stay
                # gathered from its first forward on, 0.5 B/param of the model in the reference's dtype
                unit.set_reshard_after_forward(True)
            release_freed_memory()
        _first_forward(policy, device, with_log_z=head is not None)
        if isinstance(reference, Policy):
            _first_forward(reference, device, with_log_z=False)
        for unit in units:  # the root keeps its gathered weights after a forward: the optimizer must
            unit.reshard()  # be built over the sharded parameters, which are registered again here
        release_freed_memory()
    optimizer = build_optimizer(cfg, policy, device)
    stepper = None
    if cfg.train.optimizer_in_backward:  # the embedding's rows arrive after autograd's last gradient
        late = [model.get_input_embeddings().weight] if rows_in_place else []
        stepper = StepInBackward(optimizer, after_backward=late)
    return Models(policy, reference, optimizer, lora=m.lora.rank > 0, units=units, stepper=stepper)


def embedding_gradient_in_place(model: nn.Module) -> bool:
    """Add a trained input embedding's gradient into the weight's existing gradient in place, by rows.

    Autograd gives an embedding lookup a dense V x H gradient and adds it to what the weight already
    holds: the output head's, when the two are tied (Qwen2.5 up to 3B, Llama 3.2), or the earlier
    micro-batches' under accumulation. Both exist for a moment beside the result: a V x H tensor more at
    the end of backward, full fine-tuning's peak (0.5 GiB in float32 for Qwen2.5-0.5B, 2.2 GiB for
    Qwen2.5-7B's embedding). Here the lookup reads the weight detached, so a tied head's gradient is the
    weight's only one and is stored as soon as it is computed; the lookup's output is a leaf whose
    gradient, arriving at the end of backward, is summed per token in float32 and added into the
    weight's rows (one add per row, so deterministic on CUDA too) and dropped; the ``padding_idx`` row
    gets none, as autograd gives it none. Values and gradients are the same as without it.

    Gemma's embeddings (transformers' ``*ScaledWordEmbedding``) multiply the rows they look up by
    ``embed_scale``; their rows get the gradient times that factor, as autograd gives them.

    Returns whether the model has such an embedding (frozen, sparse, renormalized, scaled by frequency,
    or another forward than a lookup, possibly scaled: untouched).
    """
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding) or not emb.weight.requires_grad:
        return False
    if emb.sparse or emb.max_norm is not None or emb.scale_grad_by_freq:
        return False  # autograd's own rules for these
    scale = _lookup_scale(emb)
    if scale is None:
        return False
    emb.register_forward_hook(functools.partial(_lookup_without_weight_edge, scale=scale))
    return True


def _lookup_scale(emb: nn.Embedding) -> float | None:
    """What the module's forward multiplies the looked-up rows by: 1 for ``nn.Embedding``'s own forward,
    ``embed_scale`` (in the weight's dtype, as the forward casts it) for transformers'
    ``*ScaledWordEmbedding``; None for any other forward, whose gradient is not known here."""
    if type(emb).forward is nn.Embedding.forward:
        return 1.0
    scale = getattr(emb, "embed_scale", None)
    if not type(emb).__name__.endswith("ScaledWordEmbedding") or scale is None:
        return None
    if isinstance(scale, Tensor):
        return float(scale.to(emb.weight.dtype)) if scale.numel() == 1 else None
    return float(torch.tensor(float(scale), dtype=emb.weight.dtype))


def _lookup_without_weight_edge(
    emb: nn.Module, args: tuple[Any, ...], output: Tensor, *, scale: float = 1.0
) -> Tensor | None:
    if not torch.is_grad_enabled() or not output.requires_grad:
        return None
    ids, weight = args[0], emb.weight
    lookup = output.detach().requires_grad_(True)  # same values; the graph to the weight is dropped

    def add_rows(leaf: Tensor) -> None:
        rows, grad = ids.reshape(-1), leaf.grad.reshape(-1, weight.shape[1])
        if emb.padding_idx is not None:  # nn.Embedding never updates its padding row
            kept = rows != emb.padding_idx
            rows, grad = rows[kept], grad[kept]
        # a token's occurrences summed in float32 first (as autograd's embedding backward does), then
        # one add per row: in bf16, adding them one by one would round at every repeat
        unique, position = rows.unique(return_inverse=True)
        summed = grad.new_zeros((len(unique), grad.shape[1]), dtype=torch.float32)
        summed.index_add_(0, position, grad.float())
        if scale != 1.0:  # d(scale * W[row]) / dW[row]
            summed.mul_(scale)
        if weight.grad is None:  # the first gradient of this weight since the last step
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, unique, summed.to(weight.dtype))
        leaf.grad = None

    lookup.register_post_accumulate_grad_hook(add_rows)
    return lookup


@torch.no_grad()
def _first_forward(policy: Policy, device: torch.device, *, with_log_z: bool) -> None:
    """One tiny forward through the root, which sets FSDP up (before rollout gathers the weights)."""
    ids = torch.ones(1, 2, dtype=torch.long, device=device)
    was_training = policy.training
    policy.eval()
    policy(ids, torch.ones_like(ids), 1, with_log_z=with_log_z)
    policy.train(was_training)


@torch.no_grad()
def merged_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of the model's weights as a plain transformers model would name them, with
    LoRA adapters merged in (``W + scale * B @ A``, computed in float32) for a peft model.

    The model itself is not touched (merging in place and back would leave rounding in the frozen base
    after every call). What a generation engine with its own copy of the weights (vLLM) is sent after
    every update.
    """
    if not is_peft_model(model):
        yield from model.named_parameters()
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged: dict[str, Tensor] = {}
    for module_name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not module.disable_adapters:
            weight = module.base_layer.weight
            delta = sum(module.get_delta_weight(a).float() for a in module.active_adapters)
            merged[f"{module_name}.base_layer.weight"] = (weight.float() + delta).to(weight.dtype)
    for name, tensor in base.state_dict().items():
        if "lora_" not in name:
            yield name.replace(".base_layer.", "."), merged.get(name, tensor)
