"""Memory per device of a training run, planned from the model's ``config.json`` alone.

:func:`plan_memory` reads the shape of the policy from its ``config.json`` (no weights, no download),
applies the trainer's rules for dtypes, sharding and phases, and returns a :class:`MemoryPlan`: bytes
per device of every component in every phase, the peak, whether it fits, and the cheapest changes that
make it fit, each planned again. ``flowrl plan`` (:mod:`flowrl.commands.plan`) prints it.

Legend (every symbol used in the formulas below and in ``docs/memory.md``):

    P    parameters of the policy (tied input/output embeddings counted once)
    P_l  parameters of one decoder layer;  P_r = P - L * P_l  (embedding, output head, final norm)
    P_t  trainable parameters: P (full fine-tuning) or the LoRA adapters' count
    Z    parameters of the log Z head: (k - 1) * (H^2 + H + 2H) + H + 1 for k = log_z.num_layers
    L    decoder layers;  H hidden size;  I MLP intermediate size;  V vocabulary
    a    attention heads;  g key/value heads;  d head dimension (so a*d query, g*d key/value width)
    b_w  bytes per weight of the policy (model.dtype);  b_r of the reference (model.ref_dtype)
    b_c  bytes of the compute dtype: 2 under bf16 autocast (GPU default) or a bf16 policy, else b_w
    b_s  bytes of the residual stream: 4 under autocast of fp32 weights (norms and residual adds stay
         fp32), else b_c
    N    ranks (``--gpus``);  s = 1/N under train.strategy=fsdp2, 1 under ddp (every rank a replica)
    m    train.micro_batch_size;  m_lp = train.logprob_micro_batch_size (default 2m)
    S    longest sequence = data.max_prompt_length (P_max) + rollout.max_new_tokens (T)
    B    decode slots on a rank: min(rollout.batch_size, sequences per rank)
    c    log-prob chunk: min(model.logprob_chunk_size, response tokens of a micro-batch)

Components (bytes on one device; the phases they live in follow in brackets):

    runtime          CPU: a trainer process's baseline (CPU_BASELINE_GB, measured); CUDA: the CUDA
                     context (CUDA_CONTEXT_GB; not in torch.cuda.max_memory_allocated)       [all]
    tokenizer        CPU: V * TOKENIZER_BYTES_PER_ENTRY (the fast tokenizer in the process)    [all]
    weights          P * b_w * s  (LoRA: P * b_w + P_t * 4). Load: the whole model in every process
                     (FSDP2 shards after loading)                                             [all]
    log Z head       Z * 4 * s                                                                [all]
    reference        P * b_r * s, for full fine-tuning when the objective reads pi_ref (FlowRL; GRPO /
                     Dr. GRPO only at kl_coef > 0); with LoRA the base with adapters disabled: none
    checkpoint being converted   CPU load of a checkpoint stored in another dtype: P * its bytes
    gradients        (P_t * b_t + Z * 4) * s, b_t = b_w (full) or 4 (adapters); released after each
                     optimizer step. In the update only those that exist while activations peak: all
                     when a mini-batch has several micro-batches (accumulation), else the output head's.
                     With train.optimizer_in_backward each is stepped and freed as it completes: at the
                     end of backward only the input embedding's, V * H * b_w (full fine-tuning)
    optimizer states 2 * (P_t * b_t + Z * 4) * s: AdamW's moments in the parameter's dtype; on the
                     host with train.offload_optimizer (then, on CPU, 12 * P_t + 4 * P_t at the step)
    end-of-backward temporaries   [optimizer step] the largest of: FSDP2's root gathered with its
                     gradients and float32 reduce-scatter buffer (P_r * (2 b_c + 4)); AdamW's
                     temporaries (fused: none). The embedding's gradient is added into the weight's
                     by rows and the gradient norm reduces each tensor in place: no copies
    autocast bf16 copies   2 * (L * linear weights per layer + V * H): full fine-tuning of fp32
                     weights under bf16 autocast keeps the cast of every trainable weight while the
                     context is open                         [rollout, update, old log-probs]
    fsdp2 gathered   rollout P * b_c (the whole model, once per step); update (2 P_l + P_r) * b_c
                     (two layers, the root) + one layer's gradients with their fp32 reduce-scatter
                     buffer + the output head's gradient; log-prob passes (2 P_l + P_r) * b_r
    KV cache         2 * L * g * d * b_c * B * S (+ one layer's copy while it grows), or, when the
                     start is larger, the prompts of every slot                          [rollout]
    prefill          the prompts of one prefill forward (those admitted at once, B at the start and
                     B/4 into freed slots, in groups of rollout.prefill_tokens // P_max, at least one)
                     through one layer: (3I * b_c + 2H * b_s + 4H) per token + the mask P_max^2 * b_c
    sampling         B * V * 28 bytes (float logits, softmax, float64 CDF, log-softmax) [rollout]
    rollout tensors  ids and masks (int64, 16 * S per sequence) and the per-token float arrays
    activations      update, m * S tokens: without checkpointing L * layer_activation_bytes, with
                     checkpointing L * H * b_s + one layer recomputed; + backward_working_bytes of one
                     layer + the attention mask m * S^2 * b_c (sdpa / eager); log-prob passes: one
                     layer's no-grad working set for m_lp * S tokens and the final hidden states
    log-prob chunk   the fused log-softmax: 2 * c * V * 4 (+ c * V * b_c projection) forward; backward
                     c * V * 4 (+ projection) + the output head's weight gradient in b_c (and in b_w
                     beside an existing gradient)                                        [update]
    vLLM share       rollout.gpu_memory_utilization * GPU memory with rollout.engine=vllm; outside the
                     rollout 0 with rollout.enable_sleep_mode

Phases: ``load``; ``rollout``; ``log-prob passes`` (reference, and the policy's old log-probs when a
step makes more than one optimizer step); ``update`` (forward and backward of a micro-batch);
``optimizer step`` (the end of backward and the step). The peak is the largest phase. It fits when the
peak is at most 95% of the device's memory (5% for the allocator's fragmentation), or ``budget_gb``;
on CPU the machine's memory is shared by the run's processes.

Units: GB = 2**30 bytes, as nvidia-smi's MiB / 1024 and the "80 GB" of an 80 GB GPU.

Sources of constants: the per-token activation terms were read off the tensors autograd saves in a
transformers 5.24 Qwen2 decoder layer (``torch.autograd.graph.saved_tensors_hooks``; reproduced by
tests/test_plan.py); AdamW's temporaries from torch 2.13's ``torch/optim/adam.py``
(``_single_tensor_adam``: ``(exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)``;
``_multi_tensor_adam``: ``torch._foreach_sqrt(device_exp_avg_sqs)``; the trainer uses ``fused=True``);
the dtypes, load order and passes from flowrl.models, flowrl.sharding and flowrl.trainer; the CPU
baseline, load and heap behaviour measured on the project's CPU machine (benchmarks/memory.py,
docs/memory.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GiB = 2**30

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Measured on the project's CPU machine (2 vCPU EPYC, Python 3.11, torch 2.13, transformers 5.24): the
# peak resident memory of a `flowrl train` process besides its model and tokenizer (interpreter, torch,
# transformers and what they import, the trainer's modules, thread pools): a 0.2M-parameter model with a
# 512-entry tokenizer peaks at 0.36 GB when the libraries' files are partly out of the page cache and
# 0.44 GB in a fresh install (all cached: the kernel maps the cached pages around each page touched, so
# `import torch` alone holds 287 MB instead of 224); the middle of the two (benchmarks/memory.py, the
# "baseline" row).
CPU_BASELINE_GB = 0.40
# What a loaded fast tokenizer holds per vocabulary entry (its Rust vocabulary and lookup tables): 50 MiB
# for 151,936 entries, 13 MiB for 32,768, 2.4 MiB for 8,192 (resident memory after `load_tokenizer`).
TOKENIZER_BYTES_PER_ENTRY = 345
# A CUDA context with cuBLAS / cuDNN workspaces (torch 2.x on Hopper): what a process holds on the GPU
# beyond torch.cuda.max_memory_allocated.
CUDA_CONTEXT_GB = 0.75
# The share of a device's memory left for the caching allocator's fragmentation.
FRAGMENTATION_MARGIN = 0.05
# Bytes per (decode slot x vocabulary entry) while sampling a token: the float logits, transformers'
# warpers' output, the softmax, its float64 copy and cumulative sum (flowrl.rollout.hf.inverse_cdf_sample).
SAMPLING_BYTES_PER_LOGIT = 28
# The engine admits waiting prompts once this share of the slots is free (flowrl.rollout.hf).
PREFILL_SHARE = 0.25
# LoRA ranks tried by the suggestions, and the rank used when the config has none.
SUGGESTED_LORA_RANK = 32

PHASES = ("load", "rollout", "log-prob passes", "update", "optimizer step")

# The linear layers of a Qwen2 / Llama / Mistral / Qwen3 decoder layer, as peft names them.
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "mistral", "qwen3")


# -- the model's shape -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the memory plan needs from a decoder's ``config.json``."""

    model_type: str
    hidden_size: int  # H
    num_layers: int  # L
    num_heads: int  # a
    num_kv_heads: int  # g
    head_dim: int  # d
    intermediate_size: int  # I
    vocab_size: int  # V
    tie_word_embeddings: bool
    qkv_bias: bool  # biases on q, k, v (Qwen2 always; Llama with attention_bias)
    o_bias: bool  # bias on o_proj (Llama with attention_bias)
    mlp_bias: bool  # biases on gate, up, down (Llama with mlp_bias)
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)
    checkpoint_dtype: str  # the dtype the weights are stored in ("torch_dtype" / "dtype")
    # Other dense decoders: counted from their transformers class on the meta device (no memory)
    counted: ParameterCounts | None = None
    linears: tuple[tuple[str, int, int, bool], ...] = ()  # (name, d_in, d_out, bias) of one layer

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """The shape of a decoder from its ``config.json`` contents: Qwen2 / Llama / Mistral / Qwen3 counted
        in closed form, any other dense decoder from its transformers class (:meth:`_counted_by_class`)."""
        model_type = str(config.get("model_type", ""))
        if model_type not in SUPPORTED_MODEL_TYPES:
            return cls._counted_by_class(config)
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        attention_bias = bool(config.get("attention_bias", False))
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
        return cls(
            model_type=model_type,
            hidden_size=hidden,
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),  # the four classes' default
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            checkpoint_dtype=str(dtype),
        )

    @classmethod
    def _counted_by_class(cls, config: dict[str, Any]) -> ModelShape:
        """Any other dense decoder transformers knows (Gemma, Phi-3, OLMo, a multimodal model's language
        model, ...): its parameters counted exactly from its class built on the meta device, its shape
        from its (text) config; activations are then planned as for a Llama-style block."""
        model_type = str(config.get("model_type", ""))
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        experts = [k for k in MOE_FIELDS if (text.get(k) or 0) > 0]
        if experts:
            raise ValueError(
                f"model_type {model_type!r} is a mixture of experts ({experts[0]}={text[experts[0]]}): the "
                "memory plan counts dense decoders (flowrl train runs it without a plan)"
            )
        model = _meta_model(config)
        text_config = model.config.get_text_config()
        missing = [k for k in DENSE_FIELDS if getattr(text_config, k, None) is None]
        if missing:
            raise ValueError(
                f"model_type {model_type!r}: its config has no {', '.join(missing)} (flowrl train runs it "
                "without a plan)"
            )
        hidden, heads = int(text_config.hidden_size), int(text_config.num_attention_heads)
        counted, linears = _count_by_class(model, int(text_config.num_hidden_layers))
        dtype = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or "float32"
        return cls(
            model_type=model_type,
            hidden_size=hidden,
            num_layers=int(text_config.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=int(getattr(text_config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(text_config, "head_dim", None) or hidden // heads),
            intermediate_size=int(text_config.intermediate_size),
            vocab_size=int(text_config.vocab_size),
            tie_word_embeddings=counted.output_head == 0,
            qkv_bias=False,
            o_bias=False,
            mlp_bias=False,
            qk_norm=False,
            checkpoint_dtype=str(dtype),
            counted=counted,
            linears=linears,
        )

    def linear_shapes(self) -> dict[str, tuple[int, int, bool]]:
        """``name -> (d_in, d_out, has_bias)`` of each linear layer of one decoder layer."""
        if self.linears:
            return {name: (d_in, d_out, bias) for name, d_in, d_out, bias in self.linears}
        h, q, kv, i = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
        )
        return {
            "q_proj": (h, q, self.qkv_bias),
            "k_proj": (h, kv, self.qkv_bias),
            "v_proj": (h, kv, self.qkv_bias),
            "o_proj": (q, h, self.o_bias),
            "gate_proj": (h, i, self.mlp_bias),
            "up_proj": (h, i, self.mlp_bias),
            "down_proj": (i, h, self.mlp_bias),
        }


def _qwen2(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int) -> dict[str, Any]:
    return {
        "model_type": "qwen2",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


# The shape fields of the published config.json of the models the paper's presets train (configs/),
# so `flowrl plan configs/paper_*.yaml` works before anything is downloaded. A local config.json (the
# model directory, or the Hugging Face cache) always comes first. tests/plan_fixtures/ holds the files.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-7B": _qwen2(3584, 28, 28, 4, 18944),
    "Qwen/Qwen2.5-32B": _qwen2(5120, 64, 40, 8, 27648),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": _qwen2(3584, 28, 28, 4, 18944),
}


def read_model_config(path: str | Path) -> dict[str, Any]:
    """The contents of a model's ``config.json``: ``path`` is the file, a model directory, or a hub id
    whose config is already in the local Hugging Face cache (nothing is downloaded); for the hub ids of
    the paper's presets, :data:`KNOWN_CONFIGS` when no local copy exists.

    Raises:
        FileNotFoundError: no config.json found; the message names how to give one.
    """
    p = Path(str(path)).expanduser()
    candidates = [p] if p.name.endswith(".json") else [p / "config.json"]
    for candidate in candidates:
        if candidate.is_file():
            return json.loads(candidate.read_text())
    if not p.exists() and str(path).count("/") == 1:  # a hub id: its cached config.json, if any
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(path), "config.json")
        except Exception:  # noqa: BLE001 - an odd cache is the same as no cache here
            cached = None
        if isinstance(cached, str) and Path(cached).is_file():
            return json.loads(Path(cached).read_text())
        if str(path) in KNOWN_CONFIGS:
            return {"_name_or_path": str(path), **KNOWN_CONFIGS[str(path)]}
    raise FileNotFoundError(
        f"no config.json for {str(path)!r} (not a file, a model directory, or a hub id in the local "
        "Hugging Face cache); give --model-config PATH/config.json, or model.path=DIR with a config.json"
    )


# -- parameter counts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of a decoder by part; ``total`` counts tied embeddings once."""

    embedding: int
    output_head: int  # 0 when tied to the embedding
    per_layer: int  # P_l
    layers: int  # L * P_l
    final_norm: int
    linear_per_layer: int  # the weights and biases of the linear layers of one decoder layer
    largest_tensor: int  # the largest single weight (the embedding, for these models)

    @property
    def total(self) -> int:  # P
        return self.embedding + self.output_head + self.layers + self.final_norm

    @property
    def root(self) -> int:  # P_r: what is not in a decoder layer
        return self.total - self.layers


def count_parameters(shape: ModelShape) -> ParameterCounts:
    """Exact parameter counts of a Qwen2 / Llama-style decoder (what ``sum(p.numel())`` gives).

    Per layer: q / k / v / o and gate / up / down linear layers (with their biases where the
    architecture has them: Qwen2's q, k, v; Llama's ``attention_bias`` / ``mlp_bias``), two RMSNorm
    weights (H each), and Qwen3's q / k norms (d each). Plus the embedding (V x H), the output head
    (V x H unless tied) and the final norm (H).
    """
    if shape.counted is not None:
        return shape.counted
    linear = sum(i * o + (o if bias else 0) for i, o, bias in shape.linear_shapes().values())
    norms = 2 * shape.hidden_size + (2 * shape.head_dim if shape.qk_norm else 0)
    embedding = shape.vocab_size * shape.hidden_size
    biggest_linear = max(i * o for i, o, _ in shape.linear_shapes().values())
    return ParameterCounts(
        embedding=embedding,
        output_head=0 if shape.tie_word_embeddings else embedding,
        per_layer=linear + norms,
        layers=shape.num_layers * (linear + norms),
        final_norm=shape.hidden_size,
        linear_per_layer=linear,
        largest_tensor=max(embedding, biggest_linear),
    )


# Config fields of a mixture of experts (the plan counts dense decoders), and what a dense one needs.
MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
DENSE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def _meta_model(config: dict[str, Any]) -> Any:
    """The model's transformers class built from ``config`` on the meta device: shapes, no memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("model_type", "_name_or_path", "auto_map")}
    try:
        model_config = AutoConfig.for_model(str(config.get("model_type", "")), **fields)
    except ValueError:  # a model_type this transformers does not know (remote code)
        raise ValueError(
            f"model_type {config.get('model_type')!r} is not one transformers knows here (remote code?): the "
            "memory plan needs its class (flowrl train runs it without a plan)"
        ) from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def _count_by_class(
    model: Any, num_layers: int
) -> tuple[ParameterCounts, tuple[tuple[str, int, int, bool], ...]]:
    """Parameter counts of a decoder built on the meta device, and the linear layers of its first layer.

    The decoder layers are the largest ``nn.ModuleList`` of ``num_layers`` modules; everything else is
    the root (embedding, output head, final norm, and a multimodal model's encoders).
    """
    from torch import nn

    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    output_head = 0 if head is None or head.weight is embedding else head.weight.numel()
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if not stacks:
        raise ValueError(f"{type(model).__name__}: no stack of {num_layers} decoder layers found")
    layers = max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()))
    first = layers[0]
    linears = tuple(
        (name.rsplit(".", 1)[-1], m.in_features, m.out_features, m.bias is not None)
        for name, m in first.named_modules()
        if isinstance(m, nn.Linear)
    )
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors once
    in_layers = sum(p.numel() for p in layers.parameters())
    counts = ParameterCounts(
        embedding=embedding.numel(),
        output_head=output_head,
        per_layer=sum(p.numel() for p in first.parameters()),
        layers=in_layers,
        final_norm=total - in_layers - embedding.numel() - output_head,  # with anything else in the root
        linear_per_layer=sum(d_in * d_out + (d_out if bias else 0) for _, d_in, d_out, bias in linears),
        largest_tensor=max(p.numel() for p in model.parameters()),
    )
    return counts, linears


def lora_target_dims(shape: ModelShape, target_modules: Sequence[str]) -> list[tuple[str, int, int]]:
    """``(name, d_in, d_out)`` of every module LoRA wraps, over the whole model.

    ``"all-linear"`` is peft's: every linear layer of the decoder layers, not the output head. Names
    match module names as peft's do (``q_proj``, ..., and ``lm_head`` / ``embed_tokens``).
    """
    per_layer = shape.linear_shapes()
    names: list[str] = []
    for target in target_modules:
        if target == "all-linear":
            names += list(per_layer)
        elif target in per_layer or target in ("lm_head", "embed_tokens"):
            names.append(target)
        else:
            raise ValueError(
                f"model.lora.target_modules: {target!r} is not all-linear or a module of a "
                f"{shape.model_type} decoder ({', '.join((*per_layer, 'lm_head', 'embed_tokens'))})"
            )
    dims: list[tuple[str, int, int]] = []
    for name in dict.fromkeys(names):  # each module once
        if name in per_layer:
            d_in, d_out, _ = per_layer[name]
            dims += [(name, d_in, d_out)] * shape.num_layers
        elif name == "lm_head":
            dims.append((name, shape.hidden_size, shape.vocab_size))
        else:  # embed_tokens: A is (r, V), B is (H, r)
            dims.append((name, shape.vocab_size, shape.hidden_size))
    return dims


def lora_parameters(shape: ModelShape, rank: int, target_modules: Sequence[str]) -> int:
    """Trainable LoRA parameters: ``rank * (d_in + d_out)`` per wrapped module (peft's A and B)."""
    if rank <= 0:
        return 0
    return sum(rank * (d_in + d_out) for _, d_in, d_out in lora_target_dims(shape, target_modules))


def log_z_head_parameters(hidden_size: int, num_layers: int) -> int:
    """Parameters of :class:`flowrl.partition.LogZHead`: ``num_layers - 1`` blocks of Linear(H, H) and
    LayerNorm(H) (``H*H + H + 2H``), then Linear(H, 1) (``H + 1``); 0 layers: none."""
    if num_layers <= 0:
        return 0
    h = hidden_size
    return (num_layers - 1) * (h * h + h + 2 * h) + h + 1


# -- per-token sizes ---------------------------------------------------------------------------------


def kv_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """KV cache per token: K and V of every layer, ``2 * L * g * d * bytes``."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * dtype_bytes


def layer_activation_bytes(
    shape: ModelShape,
    *,
    compute_bytes: int,
    residual_bytes: int,
    autocast: bool,
    repeat_kv: bool = True,
    frozen_base: bool = False,
    lora_dims: Sequence[tuple[str, int, int]] = (),
    lora_rank: int = 0,
    adapter_bytes: int = 4,
) -> int:
    """Bytes autograd keeps per token for one decoder layer (transformers' Qwen2 / Llama layer, SDPA).

    Read off the tensors a layer saves for backward (tests/test_plan.py re-measures them):

    * each RMSNorm (two): its input in float32 (4H: the residual stream itself, or RMSNorm's float32
      copy of a bf16 one) and the rsqrt (4); with a trainable norm weight also the normalized states
      (H * b_s);
    * the inputs of trainable linear layers: one tensor per norm (H * b_s) without autocast, one cast
      per reader (H * b_c each: 3 for q / k / v, 2 for gate / up) under autocast; a frozen base keeps
      none (LoRA: only the adapters need their inputs);
    * attention: q, k, v as the kernel sees them (k and v repeated to a heads for sdpa / eager with a
      mask, g heads for flash attention), its output (also o_proj's input): ``(2a + 2g') * d * b_c``,
      plus the float32 log-sum-exp (4a);
    * MLP: gate and up outputs and SiLU(gate), 3I x b_c, and their product (down's input, I x b_c)
      when down's weight trains;
    * LoRA (``lora_dims``: this layer's wrapped modules): per module A's output (r x adapter bytes) and
      its input: cast to the adapters' dtype per module when the compute dtype differs (d_in x adapter
      bytes each: peft's ``_cast_input_dtype``; under autocast a bf16 cast per module), else the input
      itself, shared by the modules that read the same tensor.
    """
    h, i = shape.hidden_size, shape.intermediate_size
    heads_kv = shape.num_heads if repeat_kv else shape.num_kv_heads
    attention = (2 * shape.num_heads + 2 * heads_kv) * shape.head_dim * compute_bytes + 4 * shape.num_heads
    total = attention + 3 * i * compute_bytes
    if frozen_base:
        total += 2 * (4 * h + 4)
    else:
        total += i * compute_bytes  # SiLU(gate) * up, down's input
        for readers in (3, 2):  # the attention norm feeds q, k, v; the MLP norm gate and up
            reader_inputs = readers * h * compute_bytes if autocast else h * residual_bytes
            total += 4 * h + 4 + h * residual_bytes + reader_inputs
    # LoRA inputs: one tensor per group of modules reading the same input, or one cast per module
    group = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "mlp", "up_proj": "mlp"}
    already_saved = {"o_proj"}  # the attention output, kept by the attention kernel
    shared: set[str] = set()
    for name, d_in, _ in lora_dims:
        if autocast:
            total += d_in * compute_bytes + lora_rank * compute_bytes
            continue
        total += lora_rank * adapter_bytes
        if adapter_bytes != compute_bytes:
            total += d_in * adapter_bytes
        elif frozen_base and name not in already_saved and group.get(name, name) not in shared:
            shared.add(group.get(name, name))
            total += d_in * (residual_bytes if name in group else compute_bytes)
    return total


def layer_working_bytes_no_grad(shape: ModelShape, *, compute_bytes: int, residual_bytes: int) -> int:
    """Peak bytes per token of one decoder layer's forward without gradient (reference pass, prefill):
    the MLP's SiLU(gate), up and their product (3I x b_c) beside the residual stream and the normalized
    states (2H x b_s) and RMSNorm's float32 copy (4H)."""
    return (
        3 * shape.intermediate_size * compute_bytes
        + 2 * shape.hidden_size * residual_bytes
        + 4 * shape.hidden_size
    )


def backward_working_bytes(shape: ModelShape, *, compute_bytes: int) -> int:
    """Peak bytes per token of the gradient temporaries of one layer's backward: the MLP's gradients
    (product, SiLU output, up and gate: about 3I alive at once) and the hidden-size gradients (4H,
    float32)."""
    return 3 * shape.intermediate_size * compute_bytes + 4 * shape.hidden_size * 4


# -- the run's setup ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """The trainer's choices for one config on one kind of device (what the formulas read)."""

    device: str  # "cuda" or "cpu"
    ranks: int  # N
    strategy: str  # "ddp" or "fsdp2"
    lora: bool
    lora_rank: int
    policy_dtype: str
    reference_dtype: str | None  # None: no reference model
    autocast: bool  # bf16 autocast of the update and log-prob passes
    compute_dtype: str
    rollout_dtype: str  # the dtype of the rollout's forward (and so of the KV cache)
    gradient_checkpointing: bool
    log_z_layers: int
    adamw: str  # "fused", "foreach" or "for-loop"
    offload_optimizer: bool
    optimizer_in_backward: bool
    engine: str
    old_logprob_pass: bool
    attn_implementation: str


def _dtype(name: str | None, checkpoint_dtype: str) -> str:
    if name in (None, "auto"):
        return checkpoint_dtype if checkpoint_dtype in DTYPE_BYTES else "float32"
    return str(name)


def resolve_setup(cfg: Any, shape: ModelShape, *, device: str, gpus: int) -> Setup:
    """The trainer's rules applied to ``cfg`` on ``gpus`` processes of ``device`` ("cuda" or "cpu")."""
    import torch

    from flowrl.models import compute_in_bf16, needs_reference, reference_dtype  # the trainer's own rules
    from flowrl.objectives import OBJECTIVES

    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    m, t = cfg.model, cfg.train
    cuda = device == "cuda"
    lora = m.lora.rank > 0
    policy_dtype = _dtype(m.dtype, shape.checkpoint_dtype)
    autocast = compute_in_bf16(cfg, torch.device(device))
    ref_dtype: str | None = None
    if not lora and needs_reference(cfg):
        ref_dtype = _dtype(reference_dtype(cfg, torch.device(device)), shape.checkpoint_dtype)
    compute_dtype = "bfloat16" if autocast else policy_dtype
    grad_ckpt = m.gradient_checkpointing if m.gradient_checkpointing is not None else cuda
    objective = OBJECTIVES[cfg.algorithm.name]
    group_free = not objective.uses_log_z or getattr(cfg.log_z, "mode", "head") == "head"
    n_valid = t.prompts_per_step * cfg.rollout.num_samples_per_prompt
    updates = math.ceil(n_valid / t.mini_batch_size) * t.epochs_per_rollout
    return Setup(
        device=device,
        ranks=gpus,
        strategy=t.strategy if gpus > 1 else "ddp",
        lora=lora,
        lora_rank=m.lora.rank,
        policy_dtype=policy_dtype,
        reference_dtype=ref_dtype,
        autocast=autocast,
        compute_dtype=compute_dtype,
        rollout_dtype=compute_dtype,
        gradient_checkpointing=bool(grad_ckpt),
        # log_z.mode=group estimates log Z from the no-gradient log-probs: no head, that pass every step
        log_z_layers=cfg.log_z.num_layers if objective.uses_log_z and group_free else 0,
        adamw=TRAINER_ADAMW[device],
        offload_optimizer=bool(t.offload_optimizer),
        optimizer_in_backward=bool(t.optimizer_in_backward),
        engine=cfg.rollout.engine,
        old_logprob_pass=updates > 1 or objective.advantage_uses_ref_logprobs or not group_free,
        attn_implementation=m.attn_implementation,
    )


# The AdamW implementation the trainer uses on each device (flowrl.trainer): fused on both.
TRAINER_ADAMW = {"cuda": "fused", "cpu": "fused"}


# -- the plan ----------------------------------------------------------------------------------------


@dataclass
class Component:
    """One thing that occupies memory, with its bytes per phase (phases it is absent from: 0)."""

    name: str
    bytes: dict[str, int]
    formula: str

    def gb(self, phase: str) -> float:
        return self.bytes.get(phase, 0) / GiB


@dataclass
class Suggestion:
    """A change to the config and the plan's peak after it."""

    change: str
    overrides: list[str]
    peak_gb_per_device: float
    fits: bool


@dataclass
class MemoryPlan:
    """Memory per device of a run, by component and phase; see the module docstring for the formulas."""

    device: str
    gpus: int
    strategy: str
    gpu_memory_gb: float | None
    model: dict[str, Any]
    parameters: dict[str, int]
    setup: dict[str, Any]
    components: list[Component]
    phases: list[str]
    notes: list[str] = field(default_factory=list)
    suggestions: list[Suggestion] = field(default_factory=list)
    budget_gb: float | None = None  # fit in this much instead of 95% of the device's memory

    def phase_bytes(self) -> dict[str, int]:
        """Total bytes per phase."""
        return {p: sum(c.bytes.get(p, 0) for c in self.components) for p in self.phases}

    @property
    def peak_phase(self) -> str:
        totals = self.phase_bytes()
        return max(totals, key=lambda p: totals[p])

    @property
    def peak_gb_per_device(self) -> float:
        return max(self.phase_bytes().values()) / GiB

    @property
    def runtime_gb(self) -> float:
        """The part of the peak a process holds before any tensor (CPU baseline, CUDA context)."""
        runtime = next((c for c in self.components if c.name == "runtime"), None)
        return 0.0 if runtime is None else runtime.gb(self.peak_phase)

    @property
    def usable_gb(self) -> float | None:
        """What the peak must stay under: the budget, else the device's memory less the margin."""
        return _usable(self.gpu_memory_gb, self.budget_gb, self.device, self.gpus)

    @property
    def fits(self) -> bool:
        usable = self.usable_gb
        return usable is None or self.peak_gb_per_device <= usable

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the peak, whether it fits, GB per phase and per component, the suggestions."""
        totals = self.phase_bytes()
        return {
            "peak_gb_per_device": round(self.peak_gb_per_device, 3),
            "fits": self.fits,
            "peak_phase": self.peak_phase,
            "device": self.device,
            "gpus": self.gpus,
            "strategy": self.strategy,
            "gpu_memory_gb": self.gpu_memory_gb,
            "usable_gb": None if self.usable_gb is None else round(self.usable_gb, 3),
            "runtime_gb": round(self.runtime_gb, 3),
            "phases_gb": {p: round(v / GiB, 3) for p, v in totals.items()},
            "components_gb": {c.name: {p: round(c.gb(p), 3) for p in self.phases} for c in self.components},
            "formulas": {c.name: c.formula for c in self.components},
            "model": self.model,
            "parameters": self.parameters,
            "setup": self.setup,
            "suggestions": [asdict(s) for s in self.suggestions],
            "notes": self.notes,
            "units": "GB = 2**30 bytes",
        }

    def summary(self) -> str:
        """A compact table for the console: components x phases, totals, peak, verdict, suggestions."""
        totals = self.phase_bytes()
        short = {"log-prob passes": "log-probs", "optimizer step": "opt step"}
        heads = [short.get(p, p) for p in self.phases]
        width = max(len(c.name) for c in self.components) + 2
        cols = [max(9, len(h) + 1) for h in heads]
        s = self.setup
        what = (
            f"{self.model['name']}: {self.parameters['total'] / 1e9:.2f}B parameters"
            f"{' (LoRA: ' + format(self.parameters['trainable'], ',') + ' trainable)' if s['lora'] else ''}"
        )
        where = (
            f"{self.gpus} x {'GPU' if self.device == 'cuda' else 'CPU process'}"
            f"{'' if self.gpu_memory_gb is None else f' of {self.gpu_memory_gb:.4g} GB'}, "
            f"{self.strategy if self.gpus > 1 else 'one process'}"
        )
        lines = [
            f"memory plan ({what}; {where}); GB = 2^30 bytes per device",
            f"policy {s['policy_dtype']}, compute {s['compute_dtype']}, reference "
            f"{s['reference_dtype'] or 'none'}, gradient checkpointing "
            f"{'on' if s['gradient_checkpointing'] else 'off'}, AdamW {s['adamw']}"
            f"{', states offloaded' if s['offload_optimizer'] else ''}"
            f"{', stepped in backward' if s['optimizer_in_backward'] else ''}, rollout {s['engine']}",
            f"{'component':<{width}}" + "".join(f"{h:>{w}}" for h, w in zip(heads, cols, strict=True)),
        ]
        for c in self.components:
            if not any(c.bytes.get(p, 0) for p in self.phases):
                continue
            cells = "".join(
                f"{(c.gb(p) if c.bytes.get(p, 0) else 0):>{w}.2f}" if c.bytes.get(p, 0) else f"{'-':>{w}}"
                for p, w in zip(self.phases, cols, strict=True)
            )
            lines.append(f"{c.name:<{width}}{cells}")
        lines.append(
            f"{'total':<{width}}"
            + "".join(f"{totals[p] / GiB:>{w}.2f}" for p, w in zip(self.phases, cols, strict=True))
        )
        verdict = ""
        if self.usable_gb is not None:
            within = (
                f"a budget of {self.budget_gb:g} GB"
                if self.budget_gb is not None
                else f"{self.gpu_memory_gb:.4g} GB (usable {self.usable_gb:.1f} GB after a "
                f"{FRAGMENTATION_MARGIN:.0%} margin)"
            )
            verdict = f": {'fits' if self.fits else 'does NOT fit'} in {within}"
        lines.append(
            f"peak {self.peak_gb_per_device:.2f} GB per device in the {self.peak_phase} phase{verdict}"
        )
        for note in self.notes:
            lines.append(f"note: {note}")
        if self.suggestions and not any(sug.fits for sug in self.suggestions):
            lines.append("no change planned here makes it fit; the closest (planned peak after the change):")
        elif self.suggestions:
            lines.append("changes that make it fit, cheapest first (planned peak after the change):")
        for sug in self.suggestions:
            mark = "fits" if sug.fits else "still too big"
            lines.append(
                f"  {sug.change}: {sug.peak_gb_per_device:.2f} GB ({mark})  [{' '.join(sug.overrides)}]"
            )
        return "\n".join(lines)


# What lives only within a phase (the rest stays from phase to phase).
_TRANSIENT = {
    "fsdp2 gathered",
    "activations",
    "log-prob chunk",
    "KV cache",
    "prefill",
    "sampling",
    "end-of-backward temporaries",
    "autocast bf16 copies",
}


def _b(dtype: str) -> int:
    return DTYPE_BYTES[dtype]


def _usable(
    gpu_memory_gb: float | None, budget_gb: float | None, device: str = "cuda", gpus: int = 1
) -> float | None:
    """GB one process may use: the budget, else the device's memory less the margin (on CPU the
    machine's memory is shared by the run's ``gpus`` processes)."""
    if budget_gb is not None:
        return budget_gb
    if gpu_memory_gb is None:
        return None
    return gpu_memory_gb * (1 - FRAGMENTATION_MARGIN) / (gpus if device == "cpu" else 1)


def plan_memory(
    cfg: Any,
    *,
    gpus: int = 1,
    gpu_memory_gb: float | None = None,
    device: str = "cuda",
    model_config: dict[str, Any] | str | Path | None = None,
    suggest: bool = True,
    cpu_baseline_gb: float = CPU_BASELINE_GB,
    budget_gb: float | None = None,
) -> MemoryPlan:
    """The memory per device of training ``cfg`` on ``gpus`` processes of ``device``.

    Args:
        cfg: a :class:`flowrl.config.Config`.
        gpus: processes (GPUs; CPU processes for ``device="cpu"``), the ranks of torchrun.
        gpu_memory_gb: memory of one device in GB (2**30 bytes); None: no verdict (always fits) on
            CUDA, this machine's memory on CPU.
        device: "cuda" or "cpu" (a CPU run's peak resident memory, the process baseline included).
        model_config: the model's config.json (dict, file or directory); None: ``cfg.model.path``'s.
        suggest: when it does not fit, plan the cheapest changes that make it fit.
        cpu_baseline_gb: a CPU process's memory before any model (measured; see CPU_BASELINE_GB).
        budget_gb: fit in this many GB per device instead of 95% of ``gpu_memory_gb``.
    """
    raw = (
        model_config if isinstance(model_config, dict) else read_model_config(model_config or cfg.model.path)
    )
    shape = ModelShape.from_config(raw)
    if device == "cpu" and gpu_memory_gb is None:
        gpu_memory_gb = _host_memory_gb()
    setup = resolve_setup(cfg, shape, device=device, gpus=gpus)
    plan = _plan(cfg, shape, setup, gpu_memory_gb, cpu_baseline_gb, raw)
    plan.budget_gb = budget_gb
    if suggest and not plan.fits:
        plan.suggestions = _suggestions(
            cfg,
            raw,
            gpus=gpus,
            gpu_memory_gb=gpu_memory_gb,
            device=device,
            cpu_baseline_gb=cpu_baseline_gb,
            budget_gb=budget_gb,
        )
    return plan


def _host_memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GiB
    except OSError:
        pass
    return None


def _plan(
    cfg: Any,
    shape: ModelShape,
    st: Setup,
    gpu_memory_gb: float | None,
    cpu_baseline_gb: float,
    raw: dict[str, Any],
) -> MemoryPlan:
    counts = count_parameters(shape)
    P, L, H, V = counts.total, shape.num_layers, shape.hidden_size, shape.vocab_size
    N = st.ranks
    fsdp = st.strategy == "fsdp2" and N > 1
    shard = 1 / N if fsdp else 1.0
    bw, bc = _b(st.policy_dtype), _b(st.compute_dtype)
    autocast_fp32 = st.autocast and bw == 4  # fp32 weights cast to bf16 op by op
    bs = 4 if autocast_fp32 else bc  # the residual stream's dtype
    if fsdp and st.autocast:
        # FSDP2's MixedPrecisionPolicy gathers bf16 parameters (flowrl.sharding): no autocast casts
        autocast_fp32, bc, bs = False, 2, 2
    br = _b(st.reference_dtype) if st.reference_dtype else 0
    lora_dims = lora_target_dims(shape, cfg.model.lora.target_modules) if st.lora else []
    P_lora = lora_parameters(shape, st.lora_rank, cfg.model.lora.target_modules) if st.lora else 0
    Z = log_z_head_parameters(H, st.log_z_layers)
    trainable = P_lora if st.lora else P
    bt = 4 if st.lora else bw
    t, r, d = cfg.train, cfg.rollout, cfg.data
    S = d.max_prompt_length + r.max_new_tokens
    seqs_rank = max(1, t.prompts_per_step * r.num_samples_per_prompt // N)
    slots = max(1, min(r.batch_size, seqs_rank))
    micro, micro_lp = t.micro_batch_size, t.logprob_micro_batch_size or 2 * t.micro_batch_size
    masked_attention = st.attn_implementation in ("sdpa", "eager")
    has_lp_pass = bool(br) or st.old_logprob_pass
    phases = list(PHASES)
    run_phases = [p for p in phases if p != "load"]
    comps: list[Component] = []

    def add(name: str, formula: str, values: dict[str, float]) -> None:
        comps.append(Component(name, {p: int(v) for p, v in values.items() if p in phases and v}, formula))

    def everywhere(value: float) -> dict[str, float]:
        return dict.fromkeys(run_phases, value)

    if st.device == "cpu":
        add(
            "runtime",
            "measured process baseline (CPU_BASELINE_GB)",
            dict.fromkeys(phases, cpu_baseline_gb * GiB),
        )
        add(
            "tokenizer", "V * TOKENIZER_BYTES_PER_ENTRY", dict.fromkeys(phases, V * TOKENIZER_BYTES_PER_ENTRY)
        )
    else:
        add("runtime", "CUDA context (CUDA_CONTEXT_GB)", dict.fromkeys(phases, CUDA_CONTEXT_GB * GiB))

    # Weights, head, reference. `load`: every process loads the policy and the reference whole, and
    # FSDP2 shards them afterwards, one after the other. On a GPU the whole policy, its shards and the
    # whole reference are there at once. On CPU the weights are mapped from the checkpoint file and
    # count once read: sharding reads the policy (then drops it), then the reference beside the
    # policy's shards; a checkpoint stored in another dtype is read in full while it is converted.
    weights = (P * bw + P_lora * 4) * shard
    whole_policy, whole_ref = P * bw + P_lora * 4 + Z * 4, P * br
    if not fsdp:
        load_w, load_r = whole_policy, whole_ref
    elif st.device == "cuda":
        load_w, load_r = whole_policy + weights, whole_ref
    elif whole_policy >= weights + whole_ref:  # CPU, FSDP2: the larger of the two moments
        load_w, load_r = whole_policy, 0
    else:
        load_w, load_r = weights, whole_ref
    add(
        "weights",
        "P*b_w*s" + (" + P_t*4 (adapters)" if st.lora else ""),
        {**everywhere(weights), "load": load_w},
    )
    if Z:
        add("log Z head", "Z*4*s", everywhere(Z * 4 * shard))
    if br:
        add("reference", "P*b_r*s", {**everywhere(P * br * shard), "load": load_r})
    if st.device == "cpu":
        ckpt_b = DTYPE_BYTES.get(shape.checkpoint_dtype, 4)
        converting = max([P * ckpt_b for b in (bw, br) if b and b != ckpt_b], default=0)
        add("checkpoint being converted", "P*b_checkpoint, loaded in another dtype", {"load": converting})

    # Gradients and the optimizer. A backward that accumulates into the gradients of an earlier
    # micro-batch of the mini-batch runs with all of them allocated; the first one of a mini-batch
    # allocates them as it goes (set to None after every step), so at its start (where activations
    # peak) only the output head's exists. The optimizer-step column is the end of backward and the
    # step: all gradients, plus the largest of the temporaries of that moment (under FSDP2 the root's
    # gathered parameters and gradients with the float32 reduce-scatter buffer; AdamW's own, none when
    # fused). The gradient norm (flowrl.sharding.grad_norm) reduces each tensor without a copy.
    state_params = trainable * bt + Z * 4
    grads = state_params * shard
    micro_per_step = math.ceil(math.ceil(t.mini_batch_size / N) / micro)
    accumulating = micro_per_step > 1
    head_trainable = not st.lora  # the output head trains in full fine-tuning (LoRA: never wrapped)
    if accumulating:
        grads_in_backward = grads
    elif head_trainable and not fsdp:
        grads_in_backward = V * H * bw  # the output head's, formed first
    else:
        grads_in_backward = 0  # FSDP2: in the gathered column until reduce-scattered
    if st.optimizer_in_backward:
        # each gradient is stepped and freed as soon as it is complete; the input embedding's rows
        # arrive after autograd's last gradient, so its gradient is the one held to the end of backward
        grads_at_step = V * H * bw if head_trainable else 0  # (never sharded: the config refuses fsdp2)
        add(
            "gradients",
            "stepped in backward: V*H*b_w",
            {"update": grads_in_backward, "optimizer step": grads_at_step},
        )
    else:
        add("gradients", "(P_t*b_t + Z*4)*s", {"update": grads_in_backward, "optimizer step": grads})
    if not st.offload_optimizer:
        add("optimizer states", "2*(P_t*b_t + Z*4)*s", everywhere(2 * state_params * shard))
    elif st.device == "cpu":  # HostAdamW's host is this memory: fp32 master weights, moments, gradients
        host = 12 * (trainable + Z)
        add(
            "host AdamW (offloaded)",
            "12*P_t (fp32 master + moments) + 4*P_t gradients at the step",
            {**everywhere(host), "optimizer step": host + 4 * (trainable + Z)},
        )
    step_tmp = 0
    if st.adamw == "foreach":
        step_tmp = state_params * shard
    elif st.adamw == "for-loop":  # one tensor at a time: the largest one's temporaries
        largest = (
            counts.largest_tensor
            if not st.lora
            else max((st.lora_rank * max(i, o) for _, i, o in lora_dims), default=0)
        )
        step_tmp = 2 * max(math.ceil(largest * shard), H * H if Z else 0) * bt
    end_of_backward = 0
    if head_trainable and fsdp:
        # the root's gradient in the compute dtype beside its gathered weight, then (FSDP2 frees that
        # weight first) beside the float32 reduce-scatter input; on gloo the reduce is in place
        # (flowrl.sharding._in_place_reduce_scatter), on NCCL it needs no copy either
        end_of_backward = counts.root * (bc + max(bc, 4))
    # Unsharded, the embedding's gradient is added into the weight's by rows (no dense V x H copy:
    # flowrl.models.embedding_gradient_in_place).
    add(
        "end-of-backward temporaries",
        f"max(fsdp2 root reduce-scatter, AdamW {st.adamw})",
        {"optimizer step": max(step_tmp, end_of_backward)},
    )

    # Autocast keeps the bf16 cast of every trainable fp32 weight while its context is open: from the
    # forward to the backward, through a no-grad pass, and through the whole rollout.
    if autocast_fp32 and not st.lora:
        copies = 2 * (L * counts.linear_per_layer + V * H)  # the output head (tied or not) is cast too
        add(
            "autocast bf16 copies",
            "2*(linear weights + V*H)",
            {"rollout": copies, "update": copies, "log-prob passes": copies if st.old_logprob_pass else 0},
        )

    if fsdp:  # two layers gathered (compute, prefetch), the root from forward to backward
        gathered = (2 * counts.per_layer + counts.root) * bc
        # one layer's gathered gradients with their float32 reduce-scatter buffer, and the output
        # head's, formed at the start of backward and reduce-scattered with the root's at its end
        reduce = counts.per_layer * (bc + (4 if bc != 4 else 0)) + (V * H * bc if not st.lora else 0)
        add(
            "fsdp2 gathered",
            "rollout P*b_c; update (2*P_l + P_r)*b_c + gathered gradients; reference (2*P_l + P_r)*b_r",
            {
                "rollout": P * bc,
                "log-prob passes": max(
                    (2 * counts.per_layer + counts.root) * br, gathered if st.old_logprob_pass else 0
                ),
                "update": gathered + reduce,
            },
        )

    # Rollout.
    if st.engine == "vllm":
        share = (gpu_memory_gb or 0) * r.gpu_memory_utilization * GiB
        outside = 0 if r.enable_sleep_mode else share
        add(
            "vLLM share",
            "gpu_memory_utilization x GPU memory",
            {"rollout": share, "log-prob passes": outside, "update": outside, "optimizer step": outside},
        )
    else:
        kv_token = kv_bytes_per_token(shape, bc)
        prefill_token = layer_working_bytes_no_grad(shape, compute_bytes=bc, residual_bytes=bs)

        # admitted prompts are prefilled in groups of rollout.prefill_tokens tokens, at least one prompt
        per_forward = max(1, r.prefill_tokens // d.max_prompt_length)

        def prefill(prompts: int) -> float:
            prompts = min(prompts, per_forward)
            mask = prompts * d.max_prompt_length**2 * bc if masked_attention else 0
            return prompts * d.max_prompt_length * prefill_token + mask

        refill = math.ceil(PREFILL_SHARE * slots) if slots < seqs_rank else 0
        steady = (kv_token * slots * S * (1 + 1 / L), prefill(refill))  # full slots, B/4 prompts refilled
        start = (kv_token * slots * d.max_prompt_length, prefill(slots))  # every slot prefilled at once
        kv, pre = max(steady, start, key=sum)
        add("KV cache", "2*L*g*d*b_c*B*S (+1 layer while it grows)", {"rollout": kv})
        add("prefill", "prompts*P_max*(3I*b_c + 2H*b_s + 4H) + prompts*P_max^2*b_c", {"rollout": pre})
        add("sampling", "B*V*28", {"rollout": slots * V * SAMPLING_BYTES_PER_LOGIT})

    ids = seqs_rank * 16 * S  # prompt and response ids and masks, int64
    floats = seqs_rank * r.max_new_tokens * 16 + (N * seqs_rank * r.max_new_tokens * 4 if N > 1 else 0)
    add(
        "rollout tensors",
        "ids and masks 16*S per sequence + float per-token arrays 16*T",
        {"rollout": ids + seqs_rank * r.max_new_tokens * 8, **dict.fromkeys(run_phases[1:], ids + floats)},
    )

    # Activations.
    repeat_kv = masked_attention and shape.num_kv_heads != shape.num_heads
    one_layer_lora = list({n: (n, i, o) for n, i, o in lora_dims if n in LINEAR_MODULES}.values())
    a_layer = layer_activation_bytes(
        shape,
        compute_bytes=bc,
        residual_bytes=bs,
        autocast=autocast_fp32,
        repeat_kv=repeat_kv,
        frozen_base=st.lora,
        lora_dims=one_layer_lora,
        lora_rank=st.lora_rank,
    )
    tokens = micro * S
    if st.gradient_checkpointing:
        saved = (L * H * bs + a_layer) * tokens
        act_formula = "m*S*(L*H*b_s + one layer) + backward working set + mask"
    else:
        saved = L * a_layer * tokens
        act_formula = "m*S*L*layer_activation_bytes + backward working set + mask"
    root = 4 * H + 4 + 2 * H * bs + 8  # final norm, the packed states the output head reads, token ids
    backward = backward_working_bytes(shape, compute_bytes=bc)
    mask = micro * S * S * bc if masked_attention else 0
    lp_tokens = micro_lp * S
    lp = (
        layer_working_bytes_no_grad(shape, compute_bytes=bc, residual_bytes=bs) * lp_tokens
        + 2 * H * bs * lp_tokens
    )
    lp += micro_lp * S * S * bc if masked_attention else 0
    add(
        "activations",
        act_formula,
        {"update": saved + (backward + root) * tokens + mask, "log-prob passes": lp if has_lp_pass else 0},
    )

    # The log-prob chunk: forward float logits + logsumexp's exponentials (+ the bf16 projection);
    # backward rebuilds the logits and, with a trainable output head, forms its weight gradient.
    chunk = min(cfg.model.logprob_chunk_size, micro * r.max_new_tokens)
    projection = chunk * V * bc if bc != 4 else 0
    # the output head's weight gradient in the compute dtype, then in the weight's: a transient beside
    # an existing gradient (accumulating), else the weight's copy becomes the gradient (counted there)
    head_grad = 0
    if head_trainable and not fsdp:
        head_grad = (V * H * bc if bc != bw else 0) + (V * H * bw if accumulating else 0)
    forward = 2 * chunk * V * 4 + projection
    backward_chunk = chunk * V * 4 + projection + head_grad
    lp_chunk = min(cfg.model.logprob_chunk_size, micro_lp * r.max_new_tokens)
    lp_chunk_bytes = lp_chunk * V * 4 * (3 if st.old_logprob_pass else 2) + (
        lp_chunk * V * bc if bc != 4 else 0
    )
    add(
        "log-prob chunk",
        "2*c*V*4 (+c*V*b_c) forward; backward + V*H*b_c output-head gradient",
        {"update": max(forward, backward_chunk), "log-prob passes": lp_chunk_bytes if has_lp_pass else 0},
    )

    notes: list[str] = []
    if shape.counted is not None:
        notes.append(
            f"{shape.model_type}: parameters counted from its transformers class (exact); activations and "
            "KV cache planned as for a Llama-style block of its shape"
        )
    if st.strategy == "ddp" and N > 1:
        notes.append("ddp: every rank holds a full replica (weights, gradients, optimizer states)")
    if st.engine == "vllm" and gpu_memory_gb is None:
        notes.append("rollout.engine=vllm: give --gpu-memory to count vLLM's share")
    if st.device == "cpu":
        notes.append(
            f"CPU: peak resident memory of one process, its {cpu_baseline_gb:.2f} GB baseline and the "
            "tokenizer included"
        )
    return MemoryPlan(
        device=st.device,
        gpus=N,
        strategy=st.strategy,
        gpu_memory_gb=gpu_memory_gb,
        model={
            "name": str(raw.get("_name_or_path") or cfg.model.path),
            "model_type": shape.model_type,
            "hidden_size": H,
            "num_layers": L,
            "num_heads": shape.num_heads,
            "num_kv_heads": shape.num_kv_heads,
            "head_dim": shape.head_dim,
            "intermediate_size": shape.intermediate_size,
            "vocab_size": V,
            "tie_word_embeddings": shape.tie_word_embeddings,
            "checkpoint_dtype": shape.checkpoint_dtype,
        },
        parameters={
            "total": P,
            "per_layer": counts.per_layer,
            "embedding": counts.embedding,
            "output_head": counts.output_head,
            "trainable": trainable,
            "lora": P_lora,
            "log_z_head": Z,
        },
        setup={
            **asdict(st),
            "decode_slots": slots,
            "sequences_per_rank": seqs_rank,
            "sequence_tokens": S,
            "micro_batch_tokens": tokens,
            "kv_bytes_per_token": kv_bytes_per_token(shape, bc),
            "layer_activation_bytes_per_token": a_layer,
        },
        components=comps,
        phases=phases,
        notes=notes,
    )


# -- suggestions ---------------------------------------------------------------------------------


def _with(cfg: Any, overrides: Iterable[str]) -> Any:
    """A copy of ``cfg`` with dotted overrides applied (validated as the trainer would)."""
    from omegaconf import OmegaConf

    from flowrl.config import Config, validate

    merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(list(overrides)))
    out: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(out)
    return out


def _largest_fitting(lo: int, hi: int, peak: Any, usable: float) -> tuple[int, float] | None:
    """The largest integer in [lo, hi] whose ``peak(value)`` is at most ``usable`` (peak grows with the
    value), with that peak; None when even ``lo`` does not fit."""
    if peak(lo) > usable:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if peak(mid) <= usable:
            lo = mid
        else:
            hi = mid - 1
    return lo, peak(lo)


def _suggestions(
    cfg: Any,
    raw: dict[str, Any],
    *,
    gpus: int,
    gpu_memory_gb: float | None,
    device: str,
    cpu_baseline_gb: float,
    budget_gb: float | None = None,
) -> list[Suggestion]:
    """Single changes in the order of what they cost (the same results first, then the algorithm's
    capacity), each planned again; when none fits alone, the cheapest pairs. Every suggestion that
    fits is listed, then the best that does not."""
    usable = _usable(gpu_memory_gb, budget_gb, device, gpus)
    if usable is None:
        return []

    def peak(overrides: list[str]) -> float:
        try:
            c = _with(cfg, overrides)
        except ValueError:
            return math.inf
        return plan_memory(
            c,
            gpus=gpus,
            gpu_memory_gb=gpu_memory_gb,
            device=device,
            model_config=raw,
            suggest=False,
            cpu_baseline_gb=cpu_baseline_gb,
        ).peak_gb_per_device

    # Changes that keep the results (activation checkpointing, smaller micro-batches: the same
    # gradients; fewer decode slots: the same responses) come first, then sharding, then LoRA (which
    # changes what is trained).
    singles: list[tuple[str, list[str]]] = []
    if not (
        cfg.model.gradient_checkpointing or (cfg.model.gradient_checkpointing is None and device == "cuda")
    ):
        singles.append(("gradient checkpointing on", ["model.gradient_checkpointing=true"]))
    searched: list[tuple[str, str, int]] = []
    if cfg.train.micro_batch_size > 1:
        searched.append(("smaller micro-batch", "train.micro_batch_size", cfg.train.micro_batch_size))
    if cfg.rollout.engine == "hf" and cfg.rollout.batch_size > 1:
        searched.append(("fewer decode slots", "rollout.batch_size", cfg.rollout.batch_size))
    structural: list[tuple[str, list[str]]] = []
    if gpus > 1 and cfg.train.strategy != "fsdp2" and cfg.model.lora.rank == 0:
        structural.append((f"fsdp2 over {gpus} ranks", ["train.strategy=fsdp2"]))
    one_full = gpus == 1 and cfg.model.lora.rank == 0
    if (
        one_full
        and device == "cuda"
        and not cfg.train.offload_optimizer
        and not cfg.train.optimizer_in_backward
    ):
        structural.append(("AdamW states in host memory", ["train.offload_optimizer=true"]))
    if one_full and not cfg.train.optimizer_in_backward:  # no clipping, no accumulation: results change
        in_backward = ["train.optimizer_in_backward=true", "optim.max_grad_norm=0"]
        in_backward += [
            f"train.mini_batch_size={cfg.train.micro_batch_size}",
            "train.offload_optimizer=false",
        ]
        structural.append(("optimizer steps in backward (no clipping, a step per micro-batch)", in_backward))
    if cfg.model.lora.rank == 0:
        lora = [f"model.lora.rank={SUGGESTED_LORA_RANK}"]
        if device == "cuda":
            lora.append("model.dtype=bfloat16")
        if cfg.train.strategy == "fsdp2":  # the trainer runs LoRA replicated (its state is small)
            lora.append("train.strategy=ddp")
        if cfg.train.offload_optimizer:
            lora.append("train.offload_optimizer=false")
        structural.append(
            (f"LoRA rank {SUGGESTED_LORA_RANK}{' (bf16 base)' if device == 'cuda' else ''}", lora)
        )

    out: list[Suggestion] = []

    def add(desc: str, overrides: list[str]) -> None:
        p = peak(overrides)
        if math.isfinite(p):  # a combination the trainer refuses is no suggestion
            out.append(Suggestion(desc, overrides, round(p, 2), p <= usable))

    def try_searched(prefix: list[str], label: str) -> None:
        for desc, key, current in searched:
            found = _largest_fitting(1, current - 1, lambda v, k=key: peak([*prefix, f"{k}={v}"]), usable)
            if found is not None:
                value, p = found
                change = f"{label}{desc}: {key} {current} -> {value}"
                out.append(Suggestion(change, [*prefix, f"{key}={value}"], round(p, 2), True))
            else:  # not enough alone: say how far its smallest value gets
                add(f"{label}{desc}: {key} {current} -> 1", [*prefix, f"{key}=1"])

    for desc, overrides in singles:
        add(desc, overrides)
    try_searched([], "")
    for desc, overrides in structural:
        add(desc, overrides)
    if not any(s.fits for s in out):  # pairs: a structural change with a searched setting, then all
        for desc, overrides in structural:
            try_searched(overrides, f"{desc} + ")
        if searched and not any(s.fits for s in out):
            smallest = [f"{key}=1" for _, key, _ in searched]
            for desc, overrides in [("", []), *structural]:
                add(f"{desc + ' + ' if desc else ''}" + " and ".join(d for d, _, _ in searched) + " to 1",
                    [*overrides, *smallest])  # fmt: skip
    unique: dict[tuple[str, ...], Suggestion] = {}
    for sug in out:  # the first (cheapest) description of each set of overrides
        unique.setdefault(tuple(sorted(sug.overrides)), sug)
    fitting = [s for s in unique.values() if s.fits]
    if fitting:
        return fitting
    return sorted(unique.values(), key=lambda s: s.peak_gb_per_device)[:3]


__all__ = [
    "ModelShape",
    "MemoryPlan",
    "Component",
    "Suggestion",
    "ParameterCounts",
    "count_parameters",
    "lora_parameters",
    "lora_target_dims",
    "log_z_head_parameters",
    "kv_bytes_per_token",
    "layer_activation_bytes",
    "plan_memory",
    "read_model_config",
    "resolve_setup",
]
