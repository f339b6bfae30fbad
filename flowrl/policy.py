"""The policy: a Hugging Face causal LM plus the log Z head, and the passes the trainer needs from it.

Shape legend: B sequences, P prompt tokens (left-padded), T response tokens (right-padded), H hidden
size, V vocabulary.

One forward over ``[prompt | response]`` gives both things FlowRL needs:

* token log-probs of the response, temperature-scaled, computed from the final hidden states in chunks
  of ``logprob_chunk_size`` tokens, so a full-vocabulary log-softmax is never held for every token (the
  chunk is recomputed in backward instead of stored);
* log Z(x) from the same final hidden states, mean-pooled over the prompt tokens. Causal attention makes
  those independent of the response, and only the last layer is used (no ``output_hidden_states``).

The head is the submodule ``log_z_head`` of :class:`Policy`, so its parameter names carry
:data:`flowrl.partition.LOG_Z_PREFIX` in every state dict; exports save ``policy.model`` alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from flowrl.partition import LogZHead, pool_prompt_states

DEFAULT_LOGPROB_CHUNK_SIZE = 1024


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer (local directory or hub id) set up for left-padded batched generation.

    A tokenizer without a pad token gets its EOS token as pad (the usual choice for causal LMs); one with
    neither is refused, since responses could not be terminated or padded.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    _check_model_path(path)
    if _declared_tokenizer_class(path) in PLAIN_TOKENIZER_CLASSES:
        # AutoTokenizer rebuilds the pipeline from the model type (a Qwen2 config gets Qwen2's byte-level
        # pre-tokenizer), which breaks a custom tokenizer saved as a plain `tokenizers` backend.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer at {path!r} has no EOS token; set `eos_token` in its tokenizer_config.json"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


PLAIN_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _declared_tokenizer_class(path: str) -> str | None:
    config = Path(path).expanduser() / "tokenizer_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("tokenizer_class")


def load_model(
    path: str,
    *,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
) -> Any:
    """Load a causal LM with ``AutoModelForCausalLM`` from a local directory or a hub id.

    A directory of LoRA adapters (``adapter_config.json``, what a LoRA run's checkpoint holds) loads its
    base model (the one the adapters name) with the adapters merged in: a plain model, as exported.
    """
    from transformers import AutoModelForCausalLM

    _check_model_path(path)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    adapter_config = Path(path) / ADAPTER_CONFIG
    if adapter_config.is_file():
        from peft import PeftModel

        base_path = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        base = load_model(
            base_path,
            dtype=dtype,
            device=device,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
        return PeftModel.from_pretrained(base, path).merge_and_unload()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    except ValueError as exc:
        if attn_implementation and "attention implementation" in str(exc):
            raise ValueError(
                f"{path}: attn_implementation={attn_implementation!r} is not available for this model "
                "(transformers: " + str(exc).split(". ")[0] + "); set model.attn_implementation=eager "
                "(or flash_attention_2 where installed)"
            ) from exc
        raise
    return model.to(device)


ADAPTER_CONFIG = "adapter_config.json"
"""peft's file in a directory of adapters."""


def _check_model_path(path: str) -> None:
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") > 1
    if looks_local and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(
            f"model directory {path!r} does not exist; give a local directory with config.json and weights, "
            "or a hub id such as 'Qwen/Qwen2.5-0.5B' on a machine that can download it"
        )


def prompt_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """Render chat messages with the tokenizer's chat template, or join their contents when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a prompt; the chat template already holds any special tokens it needs."""
    text = prompt_text(tokenizer, messages)
    return tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]


@dataclass
class PolicyOutput:
    """What one policy forward returns."""

    logprobs: Tensor  # (B, T) float32, 0 on padding
    log_z: Tensor | None  # (B,) float32, when the head was asked for
    entropy: Tensor | None  # (B, T) float32, when asked for (no gradient)


# A pytree node, so wrappers that look for the tensors a module returns (FSDP2's backward hooks) find them.
torch.utils._pytree.register_dataclass(PolicyOutput)


@dataclass(frozen=True)
class LogitTransform:
    """What a causal LM's forward does to its output projection's result before returning the logits.

    Read from the model's (text) config (:meth:`of`): ``scale`` multiplies (Cohere's ``logit_scale``,
    ``output_multiplier``, Falcon-H1's ``lm_head_multiplier``, the inverse of Granite's and MiniCPM3's
    ``logits_scaling``), then ``softcap`` bounds the logits to ``softcap * tanh(logits / softcap)``
    (Gemma 2 and 3's ``final_logit_softcapping``). The rollout samples from the model's own logits, so
    the trainer's log-probs must see the same ones: :func:`verify_logprobs` fits the transform to what
    the model's forward does (the config may name one its class does not apply) and checks the result.
    """

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, config: Any) -> LogitTransform:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        scale = 1.0
        for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
            value = getattr(text, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in (0, 1):
                # Granite and MiniCPM3 divide by logits_scaling; HyperCLOVA X multiplies by it
                divides = name == "logits_scaling" and getattr(text, "model_type", "") != "hyperclovax"
                scale = scale / float(value) if divides else scale * float(value)
        softcap = getattr(text, "final_logit_softcapping", None)
        return cls(scale, float(softcap) if softcap else None)

    def __call__(self, logits: Tensor) -> Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


PLAIN = LogitTransform()


def _chunk_logprobs(
    hidden: Tensor,
    targets: Tensor,
    lm_head: nn.Module,
    temperature: float,
    entropy: list[Tensor] | None,
    transform: LogitTransform = PLAIN,
) -> Tensor:
    """Log-probs of one chunk through any output module; its entropy, when asked for, is appended to
    ``entropy`` from the same logits. The general path, for heads that are not a plain ``nn.Linear`` or
    logits that are soft-capped.

    Under activation checkpointing this runs twice (forward, and again in backward to rebuild the graph);
    the entropy, which needs no graph, is computed the first time only (the list is no longer empty).
    """
    logits = transform(_wide(lm_head(hidden)))  # (n, V), lives only for this chunk
    if temperature != 1.0:
        logits = logits / temperature
    log_norm = torch.logsumexp(logits, dim=-1)
    if entropy is not None and not entropy:  # one output projection per token for both, not two
        with torch.no_grad():
            entropy.append(_entropy_from(logits - log_norm[:, None]))
    return logits.gather(-1, targets[:, None]).squeeze(-1) - log_norm


def _wide(logits: Tensor) -> Tensor:
    """Logits in at least float32 (bf16 / fp16 projections are widened before the softmax)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _entropy_from(logp: Tensor) -> Tensor:
    """-sum p log p per row of ``logp`` (n, V), in ``logp``'s dtype (CPU autocast would make it bf16)."""
    with torch.autocast(logp.device.type, enabled=False):
        return -torch.linalg.vecdot(logp.exp(), logp)


class _LinearLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T / temperature)[target] for one chunk through an ``nn.Linear`` head.

    The fused form of :func:`_chunk_logprobs`: backward needs only the chunk's hidden states and the
    per-token log-normalizer, so the (n, V) logits are freed after the forward and rebuilt once in
    backward, where the gradient ``(onehot(y) - softmax) * g / temperature`` is formed in place in that
    one buffer. Autograd's version of the same computation (checkpoint + logsumexp + gather) makes about
    twice as many full-vocabulary passes and allocations. Under autocast the projection runs in the
    autocast dtype in both directions; the softmax is float32.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        temperature: float,
        with_entropy: bool,
    ) -> tuple[Tensor, Tensor | None]:
        projected = F.linear(hidden, weight, bias)  # autocast applies here, as in the module's forward
        ctx.compute_dtype = projected.dtype
        logits = _wide(projected)
        del projected
        if temperature != 1.0:
            logits.div_(temperature)
        log_norm = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(-1, targets[:, None]).squeeze(-1) - log_norm
        entropy = _entropy_from(logits.sub_(log_norm[:, None])) if with_entropy else None
        ctx.save_for_backward(hidden, weight, bias, targets, log_norm)
        ctx.temperature = temperature
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return picked, entropy

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _grad_entropy: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, bias, targets, log_norm = ctx.saved_tensors
        dtype, temperature = ctx.compute_dtype, ctx.temperature
        w = weight.to(dtype)
        logits = _wide(F.linear(hidden.to(dtype), w, None if bias is None else bias.to(dtype)))
        if temperature != 1.0:
            logits.div_(temperature)
        grad_logits = logits.sub_(log_norm[:, None]).exp_()  # softmax, in the logits' buffer
        grad_logits.mul_(-grad[:, None]).scatter_add_(
            -1, targets[:, None], grad[:, None].to(grad_logits.dtype)
        )
        if temperature != 1.0:
            grad_logits.div_(temperature)
        grad_logits = grad_logits.to(dtype)
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_logits @ w).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_logits.T @ hidden.to(dtype)).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_logits.sum(0).to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def token_logprobs(
    hidden: Tensor,
    targets: Tensor,
    lm_head: nn.Module,
    *,
    temperature: float,
    chunk_size: int = DEFAULT_LOGPROB_CHUNK_SIZE,
    with_entropy: bool = False,
    fused: bool = True,
    transform: LogitTransform = PLAIN,
) -> tuple[Tensor, Tensor | None]:
    """log softmax(transform(lm_head(hidden)) / temperature)[target] for packed tokens, chunk by chunk.

    Args:
        hidden: (n, H) final hidden states of the positions that predict ``targets``.
        targets: (n,) token ids.
        lm_head: the output projection.
        temperature: the sampling temperature (log-probs of the distribution actually sampled from).
        chunk_size: tokens per chunk; memory is O(chunk_size * V) instead of O(n * V).
        with_entropy: also return the per-token entropy (no gradient).
        fused: use :class:`_LinearLogprobs` when ``lm_head`` is a plain ``nn.Linear`` (the usual causal-LM
            head); False, or any other head, takes the general path (autograd, chunks recomputed in
            backward under activation checkpointing). Both give the same values and gradients.
        transform: what the model's forward does to the projection (:class:`LogitTransform`); a scale
            alone folds into the temperature (fused path kept), a soft cap takes the general path.

    Returns:
        ``(logprobs (n,), entropy (n,) or None)``.
    """
    out, ent = [], []
    use_fused = fused and type(lm_head) is nn.Linear and transform.softcap is None
    if use_fused:  # softmax(s * z / T) = softmax(z / (T / s))
        temperature, transform = temperature / transform.scale, PLAIN
    needs_grad = (
        not use_fused
        and torch.is_grad_enabled()
        and (hidden.requires_grad or any(p.requires_grad for p in lm_head.parameters()))
    )
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if use_fused:
            lp, chunk_entropy = _LinearLogprobs.apply(
                h, lm_head.weight, lm_head.bias, y, temperature, with_entropy
            )
            out.append(lp)
            if chunk_entropy is not None:
                ent.append(chunk_entropy)
            continue
        slot: list[Tensor] | None = [] if with_entropy else None
        if needs_grad:  # recompute the chunk's logits in backward rather than keep them
            out.append(
                checkpoint(_chunk_logprobs, h, y, lm_head, temperature, slot, transform, use_reentrant=False)
            )
        else:
            out.append(_chunk_logprobs(h, y, lm_head, temperature, slot, transform))
        if slot:
            ent.append(slot[0])
    empty = hidden.new_zeros(0, dtype=torch.float32)
    logprobs = torch.cat(out) if out else empty
    return logprobs, (torch.cat(ent) if ent else empty) if with_entropy else None


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a peft ``PeftModel`` (adapters around a transformers model)."""
    return all(callable(getattr(model, name, None)) for name in ("disable_adapter", "get_base_model"))


def causal_lm(model: nn.Module) -> Any:
    """The transformers ``*ForCausalLM`` in ``model``: itself, or the one a peft ``PeftModel`` wraps
    (its LoRA layers sit inside it, so calling its decoder runs them, or not while adapters are disabled)."""
    return model.get_base_model() if is_peft_model(model) else model


class Policy(nn.Module):
    """A causal LM (``model``) and its partition head (``log_z_head``), trained together.

    Args:
        model: a transformers ``PreTrainedModel`` with a causal-LM head.
        log_z_head: the log Z head, or None for objectives that do not use log Z.
        logprob_chunk_size: tokens per chunk in the log-prob computation.
    """

    def __init__(
        self,
        model: nn.Module,
        log_z_head: LogZHead | None = None,
        *,
        logprob_chunk_size: int = DEFAULT_LOGPROB_CHUNK_SIZE,
    ) -> None:
        super().__init__()
        self.model = model
        self.log_z_head = log_z_head
        self.logprob_chunk_size = logprob_chunk_size
        self.logit_transform = LogitTransform.of(causal_lm(model).config)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        prompt_length: int,
        *,
        temperature: float = 1.0,
        with_log_z: bool = False,
        with_entropy: bool = False,
        detach_log_z_input: bool = False,
        exclude_last_prompt_token: bool = False,
        log_z_dropout_keys: Tensor | None = None,
    ) -> PolicyOutput:
        """Response log-probs (and log Z, entropy) for ``[prompt | response]`` sequences.

        Args:
            input_ids: (B, P + T) left-padded prompts followed by right-padded responses.
            attention_mask: (B, P + T) 1 on real tokens; its last T columns are the response mask.
            prompt_length: P.
            temperature: sampling temperature that scales the logits.
            with_log_z: run the head on the pooled prompt states.
            with_entropy: also return per-token entropy (detached).
            detach_log_z_input: stop the gradient from log Z into the backbone.
            exclude_last_prompt_token: reproduce the reference code's pooling off-by-one.
            log_z_dropout_keys: (B,) int64 random-stream keys of the rows, for the head's dropout masks
                (see :meth:`LogZHead.forward`); None: torch's generator.
        """
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        lm = causal_lm(self.model)
        hidden = lm.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, P+T, H): after the final norm
        response_mask = attention_mask[:, prompt_length:].bool()
        # The token at position P+t is predicted by the hidden state at P+t-1.
        predicting = hidden[:, prompt_length - 1 : -1][response_mask]  # (n, H), padding-free
        targets = input_ids[:, prompt_length:][response_mask]
        packed, packed_entropy = token_logprobs(
            predicting,
            targets,
            lm.get_output_embeddings(),
            temperature=temperature,
            chunk_size=self.logprob_chunk_size,
            with_entropy=with_entropy,
            transform=self.logit_transform,
        )
        logprobs = hidden.new_zeros(response_mask.shape, dtype=torch.float32)
        logprobs = logprobs.masked_scatter(response_mask, packed)
        entropy = None
        if packed_entropy is not None:
            entropy = torch.zeros_like(logprobs).masked_scatter(response_mask, packed_entropy)
        log_z = None
        if with_log_z:
            if self.log_z_head is None:
                raise ValueError("this policy has no log Z head; build it with a LogZHead for FlowRL")
            prompt_states = hidden[:, :prompt_length]
            if detach_log_z_input:
                prompt_states = prompt_states.detach()
            pooled = pool_prompt_states(
                prompt_states, attention_mask[:, :prompt_length], exclude_last_token=exclude_last_prompt_token
            )
            log_z = self.log_z_head(pooled, dropout_keys=log_z_dropout_keys)
        return PolicyOutput(logprobs=logprobs, log_z=log_z, entropy=entropy)


@torch.no_grad()
def verify_logprobs(policy: Policy, *, tokens: int = 8) -> LogitTransform:
    """Make the policy's log-probs those of the model's own logits, which the rollout samples; return the
    :class:`LogitTransform` that does it (also set on the policy).

    Two checks, one forward each over two short sequences, before any wrapping (run it before sharding: it
    is not a collective). First, what the model's forward does after its output projection: the
    projection's output is replaced by large known values (a hook), so the config's transform and none
    at all can be told apart even where a random model's logits are too small to show a soft-cap (the
    config may name one that a model class does not apply: Gemma 3's multimodal class). Then, on the
    real weights, the policy's log-probs against ``log_softmax`` of the model's logits, which catches a
    forward that changes the hidden states before the projection.

    Raises:
        ValueError: neither transform reproduces the model's logits, or the log-probs differ by more
            than the model's precision allows; the message names the model type.
    """
    lm = causal_lm(policy.model)
    head = lm.get_output_embeddings()
    weight = head.weight
    ids = (torch.arange(2 * tokens, device=weight.device).reshape(2, tokens) * 7919 + 11) % weight.shape[0]
    mask = torch.ones_like(ids)
    # float32 agrees to rounding; a 16-bit forward rounds its logits (bf16: 2^-8 of their size)
    relative = 1e-4 if weight.dtype == torch.float32 else 2e-2
    model_type = getattr(lm.config, "model_type", type(lm).__name__)
    known = (
        "known output transforms: final_logit_softcapping, logit_scale, output_multiplier, "
        "lm_head_multiplier, logits_scaling; this model type needs its own added to "
        "flowrl.policy.LogitTransform"
    )
    projected: list[Tensor] = []

    def replace(_module: nn.Module, _args: Any, output: Tensor) -> Tensor:
        generator = torch.Generator(device="cpu").manual_seed(0)
        values = (torch.randn(output.shape, generator=generator) * 64).to(output.device, output.dtype)
        projected.append(values)
        return values

    was_training = policy.training
    policy.eval()
    try:
        hook = head.register_forward_hook(replace)
        try:
            transformed = _wide(lm(input_ids=ids, attention_mask=mask, use_cache=False).logits)
        finally:
            hook.remove()
        if len(projected) == 1 and projected[0].shape == transformed.shape:
            z = _wide(projected[0])
            candidates = dict.fromkeys((LogitTransform.of(lm.config), PLAIN))
            tolerance = relative * float(z.abs().max())
            fits = [t for t in candidates if float((t(z) - transformed).abs().max()) <= tolerance]
            if not fits:
                raise ValueError(
                    f"{model_type}: the model's forward transforms its output projection in a way the "
                    f"trainer does not reproduce (tried {', '.join(map(str, candidates))}), so training "
                    f"would use log-probs of a distribution the rollout does not sample; {known}"
                )
            policy.logit_transform = fits[0]
        ours = policy(ids, mask, 1).logprobs  # (2, tokens - 1): positions 1.. predicted from 0..
        logits = _wide(lm(input_ids=ids, attention_mask=mask, use_cache=False).logits)[:, :-1]
    finally:
        policy.train(was_training)
    theirs = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    tolerance = relative * max(1.0, float(logits.abs().max()))
    difference = float((ours - theirs).abs().max())
    if not difference <= tolerance:
        raise ValueError(
            f"{model_type}: the model's forward returns logits that the trainer's log-probs do not reproduce "
            f"(max difference {difference:.3g} nats, tolerance {tolerance:.3g}, with "
            f"{policy.logit_transform}), so training would use log-probs of a distribution the rollout "
            f"does not sample; {known}"
        )
    return policy.logit_transform
