"""The trainer's configuration: typed dataclasses, YAML files and dotted command-line overrides.

``load_config("configs/x.yaml", ["optim.lr=1e-6"])`` merges the dataclass defaults, the YAML file and
the overrides with OmegaConf structured configs (types checked by OmegaConf), then :func:`validate`
checks the combinations. An unknown key is named together with the closest valid one.

``algorithm.loss`` and ``algorithm.advantage`` hold the chosen objective's options: the dataclasses
defined next to its functions (``flowrl.objectives``: ``FlowRLLossOptions``, ``GRPOLossOptions``, ...;
:func:`options_help` lists them all). A YAML mapping with some of their keys maps onto them, the others
keep their defaults, and a loaded config (and the ``config.yaml`` saved with a run) shows every one.

Defaults trace to the paper (arXiv 2509.15207; docs/algorithm.md#4-training-settings) unless a comment
says otherwise.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from flowrl.objectives import LOG_Z_MODE, LOG_Z_MODES, OBJECTIVES, Options
from flowrl.partition import DROPOUT, NUM_LAYERS
from flowrl.policy import DEFAULT_LOGPROB_CHUNK_SIZE


@dataclass
class LoraConfig:
    """LoRA adapters through peft; the base model stays frozen and serves as the reference."""

    rank: int = 0  # adapter rank r; 0 = off (full fine-tuning)
    alpha: float = 32.0  # scaling alpha (the update is scaled by alpha / r)
    dropout: float = 0.0  # dropout on the adapters' input
    # modules to wrap: "all-linear" (every linear layer of the decoder, not the output head) or names
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class ModelConfig:
    path: str = MISSING  # local directory or hub id of a causal LM (transformers Auto classes)
    # the policy's weights: float32 (with bf16 autocast on GPU), bfloat16 (with LoRA: the frozen base;
    # adapters, head and optimizer states stay float32) or auto (the checkpoint's)
    dtype: str = "float32"
    # the reference model's weights (full fine-tuning only; with LoRA the reference is the base itself);
    # None: bfloat16 on GPU, the policy's dtype on CPU
    ref_dtype: str | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters (rank 0: full fine-tuning)
    attn_implementation: str = "sdpa"  # "sdpa", "eager" or "flash_attention_2"
    gradient_checkpointing: bool | None = None  # None: on for GPU, off on CPU
    trust_remote_code: bool = False  # run the model repository's own code (transformers' trust_remote_code)
    # tokens per chunk of the log-softmax (memory: chunk x vocabulary)
    logprob_chunk_size: int = DEFAULT_LOGPROB_CHUNK_SIZE


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # parquet/jsonl files in verl's schema
    max_prompt_length: int = 2048  # prompts longer than this (in tokens) are skipped, counted and reported
    shuffle: bool = True  # reshuffle every epoch (seeded)


DEFAULT_PREFILL_TOKENS = 4096
"""Prompt tokens prefilled in one forward (``rollout.prefill_tokens``). Prefill holds a layer's working
memory for every token at once (a 7B model's MLP: about 150 KB per token in bf16), so admitting a quarter
of 64 slots with 2k-token prompts at once would need about 4 GB; 4096 tokens keep it near 0.6 GB, while
each forward is still large enough to keep a GPU's matrix units busy."""


@dataclass
class RolloutConfig:
    engine: str = "hf"  # "hf": the project's decode loop on the policy itself; "vllm": flowrl[vllm], CUDA
    num_samples_per_prompt: int = 8  # n responses per prompt (a GRPO/FlowRL group)
    temperature: float = 1.0  # paper: 1.0 for math, 0.6 for code; log-probs use the same temperature
    top_p: float = 1.0  # nucleus sampling; 1.0 disables it
    top_k: int = 0  # 0 disables top-k
    max_new_tokens: int = 8192  # paper: 8192 response tokens
    batch_size: int = 64  # hf engine: decode slots (continuous batching); vLLM schedules its own
    prefill_tokens: int = DEFAULT_PREFILL_TOKENS  # hf engine: prompt tokens prefilled per forward
    gpu_memory_utilization: float = 0.3  # vllm: its share of the GPU (weights + KV cache), the rest trains
    vllm_dtype: str = "bfloat16"  # vllm: the dtype of its copy of the weights
    enable_sleep_mode: bool = False  # vllm: free its KV cache and offload its weights during updates


@dataclass
class AlgorithmConfig:
    name: str = "flowrl"  # a key of flowrl.objectives.OBJECTIVES: flowrl, grpo, dr_grpo, reinforce_pp
    # The objective's loss options: OBJECTIVES[name].loss_options (flowrl: FlowRLLossOptions with beta,
    # importance_weight, ...), every one with its default once loaded; a YAML mapping maps onto it.
    # (Typed Any here because the dataclass depends on name: validate() makes it that dataclass.)
    loss: Any = field(default_factory=dict)
    advantage: Any = field(default_factory=dict)  # its advantage's: OBJECTIVES[name].advantage_options


@dataclass
class LogZConfig:
    """Where FlowRL's log Z(x) comes from, and the partition head's settings."""

    # "head": the paper's learned partition head on the prompt (docs/algorithm.md#2-partition-function);
    # "group": no head, log Z of a prompt = the importance-weighted mean over its n samples of
    # beta * r_hat + ell_ref - ell, the value that minimizes the group's loss, computed before the update
    # without gradient (flowrl.objectives.group_log_z says why detaching changes no gradient). The
    # settings below are the head's, unused in group mode.
    mode: str = LOG_Z_MODE
    # MLP depth (docs/algorithm.md#3-switches); 0 = no head, log Z = 0 (ablation)
    num_layers: int = NUM_LAYERS
    dropout: float = DROPOUT  # after each hidden block of the head (the reference code's)
    lr: float | None = None  # None: the policy's learning rate (the reference code shares the optimizer)
    weight_decay: float | None = None  # None: the policy's weight decay
    detach_input: bool = False  # stop the TB gradient into the backbone through log Z
    exclude_last_prompt_token: bool = False  # reproduce the reference code's pooling off-by-one


@dataclass
class OptimConfig:
    """AdamW (the reference code's optimizer) and its schedule."""

    lr: float = 1e-6  # the policy's learning rate (the paper's)
    weight_decay: float = 0.1  # AdamW's decoupled weight decay (the paper's)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's (beta1, beta2), torch's
    eps: float = 1e-8  # AdamW's epsilon, torch's default
    max_grad_norm: float | None = 1.0  # gradients clipped to this global norm (the paper's); 0 or null: none
    warmup_steps: int = 10  # RL steps of linear warm-up
    schedule: str = "constant"  # after warm-up: "constant" or "cosine"


@dataclass
class RewardConfig:
    function: str | None = None  # "module:function" called as fn(response, example); None: by data_source
    num_workers: int = 2  # worker processes for math checks / sandboxed programs


@dataclass
class TrainConfig:
    total_steps: int = 200  # RL steps (one rollout batch each)
    prompts_per_step: int = 512  # prompts per rollout batch (each gets num_samples_per_prompt responses)
    mini_batch_size: int = 256  # sequences per optimizer step (paper: 32 prompts x 8 = 256)
    micro_batch_size: int = 8  # sequences per forward/backward; does not change the loss
    # sequences per forward of the passes without gradient (reference, old policy), which keep no
    # activations; None: twice micro_batch_size
    logprob_micro_batch_size: int | None = None
    epochs_per_rollout: int = 1  # passes over a rollout batch (paper: 16 mini-batches, one pass)
    # data parallelism under torchrun: "ddp" (every rank a full replica, gradients summed) or "fsdp2"
    # (parameters, gradients and optimizer states sharded across ranks, per decoder layer)
    strategy: str = "ddp"
    # keep AdamW's states and float32 master weights in host memory (one-GPU full fine-tuning): 12 bytes
    # per trainable parameter off the device, two copies per optimizer step over the host link
    offload_optimizer: bool = False
    # step each parameter as soon as its gradient is complete in backward and free that gradient: the
    # gradients are never all held (full fine-tuning: 4 bytes per float32 parameter off the peak). One
    # process, one micro-batch per optimizer step, no gradient clipping (optim.max_grad_norm=0)
    optimizer_in_backward: bool = False
    seed: int = 0  # seeds the head, sampling, data order and dropout (results repeat for a seed)
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1" ...
    # compute in bfloat16: autocast, or under fsdp2 bf16 gathered parameters (float32 gradient reduction);
    # None: on for CUDA, off on CPU
    bf16: bool | None = None
    # run the reference forward in a second thread while rewards are scored; None: on for CUDA, off on
    # CPU (there torch already uses every core, and a second thread's OpenMP team competes with decoding)
    overlap_reference: bool | None = None
    output_dir: str = "runs/flowrl"  # the run's directory: config.yaml, metrics, checkpoints, plots
    save_every: int = 50  # steps between checkpoints (and always at the end); 0 = only at the end
    keep_checkpoints: int = 2  # most recent checkpoints kept on disk
    log_every: int = 1  # steps between console lines (JSONL / TensorBoard / W&B get every step)
    sample_every: int = 10  # steps between printed sample responses; 0 = never
    num_samples_to_show: int = 3  # sample responses printed every sample_every steps
    tensorboard: bool = True  # also write TensorBoard event files (metrics.jsonl is always written)
    wandb_project: str | None = None  # log to W&B when set and wandb is installed
    progress: bool = True  # progress bars during generation and updates
    plot: bool = True  # PNG of reward, loss, log Z and length at the end


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    log_z: LogZConfig = field(default_factory=LogZConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _field_types(cls: type, prefix: str = "") -> dict[str, str]:
    """Every dotted key of a config dataclass with its annotation (sections included)."""
    types = {}
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        types[name] = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config")):
            types |= _field_types(globals()[f.type] if isinstance(f.type, str) else f.type, f"{name}.")
    return types


def _as_list_overrides(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """``key=a`` or ``key=a,b`` for a list-valued key means ``key=[a]`` / ``key=[a,b]`` (what
    ``model.lora.target_modules=q_proj,v_proj`` or ``data.train_files=train.parquet`` ask for)."""
    lists = {k for k, t in _field_types(Config).items() if t.startswith("list[")}
    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() in lists and not value.strip().startswith("[") and value.strip() not in ("", "null"):
            item = f"{key}=[{value}]"
        out.append(item)
    return out


def _unknown_key_error(exc: Exception, source: str) -> ValueError:
    key = getattr(exc, "full_key", None) or str(exc)
    close = difflib.get_close_matches(str(key), list(_field_types(Config)), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown config key {key!r} in {source}{hint}")


def config_arguments(first: str, rest: list[str]) -> tuple[str | None, list[str]]:
    """A command's ``CONFIG [key=value ...]`` positionals as ``(config path or None, overrides)``: a first
    argument that is no file but reads ``key=value`` is the first override (the defaults stand in for a
    YAML config), so ``flowrl train model.path=DIR ...`` works without one."""
    if "=" in first and not Path(first).is_file():
        return None, [first, *rest]
    return first, list(rest)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Merge defaults, a YAML file and ``key=value`` overrides into a validated :class:`Config`.

    Switching objectives on the command line (``algorithm.name=grpo`` on a FlowRL preset) drops the
    preset's ``algorithm.loss`` / ``algorithm.advantage`` options that the new objective does not take,
    with a note on stderr naming each one (see :func:`drop_options_of_other_objective`).
    """
    merged = OmegaConf.structured(Config)
    sources: list[tuple[str, DictConfig]] = []
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"config file {path} does not exist (give a YAML file such as "
                "configs/paper_qwen2.5-7b_math.yaml, or key=value overrides alone)"
            )
        sources.append((str(path), OmegaConf.load(path)))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must look like key=value (e.g. optim.lr=1e-6), got {bad}")
    if overrides:
        sources.append(("command-line overrides", OmegaConf.from_dotlist(_as_list_overrides(overrides))))
    for source, conf in sources:
        try:
            merged = OmegaConf.merge(merged, conf)
        except (ConfigKeyError, ConfigAttributeError) as exc:
            raise _unknown_key_error(exc, source) from exc
        except ValidationError as exc:
            raise ValueError(f"invalid value in {source}: {exc.msg} (key {exc.full_key!r})") from exc
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ValueError(f"missing required config value(s) {missing}; set them in the YAML or as key=value")
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if path is not None:
        file_conf, cli_conf = sources[0][1], (sources[1][1] if overrides else OmegaConf.create())
        file_objective = OmegaConf.select(file_conf, "algorithm.name", default=AlgorithmConfig.name)
        explicit = {
            section: set(_keys(OmegaConf.select(cli_conf, f"algorithm.{section}", default=None)))
            for section in _OBJECTIVE_OPTIONS
        }
        notes = drop_options_of_other_objective(cfg, str(file_objective), explicit, str(path))
    else:
        notes = []
    validate(cfg)
    if cfg.model.lora.rank > 0 and cfg.model.ref_dtype is not None:
        notes.append(
            f"note: model.ref_dtype={cfg.model.ref_dtype} has no effect with LoRA: the reference is the base "
            "model with its adapters disabled, in model.dtype (no separate copy)"
        )
    if notes and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        for note in notes:
            print(note, file=sys.stderr)
    return cfg


# The option sections of an objective: config section -> the Objective attribute with its dataclass.
_OBJECTIVE_OPTIONS = {"loss": "loss_options", "advantage": "advantage_options"}


def _keys(conf: Any) -> list[str]:
    return [str(k) for k in conf.keys()] if isinstance(conf, DictConfig) else []


def drop_options_of_other_objective(
    cfg: Config, file_objective: str, explicit: dict[str, set[str]], source: str
) -> list[str]:
    """Drop the config file's objective options that the chosen objective does not take; return notes.

    The rule: an option under ``algorithm.loss`` / ``algorithm.advantage`` is dropped when (1) it comes
    from the config file, not from a command-line override, (2) the objective was switched, i.e.
    ``algorithm.name`` differs from the file's (or the default's when the file names none), (3) the
    file's objective takes the option and (4) the chosen one does not. Everything else is left to
    :func:`validate`, so a misspelled option still fails with "unknown option ... did you mean", whether
    it is given on the command line or in the file, and an option given on the command line for the
    chosen objective is never dropped.

    Args:
        cfg: the merged config; its ``algorithm.loss`` / ``algorithm.advantage`` are edited in place.
        file_objective: the ``algorithm.name`` the config file's options were written for.
        explicit: per section (``"loss"``, ``"advantage"``), the option names given on the command line.
        source: the config file, named in the notes.

    Returns:
        One note per dropped option, e.g. ``note: algorithm.name=grpo does not take algorithm.loss.beta
        (from configs/x.yaml); dropped``.
    """
    name = cfg.algorithm.name
    if name == file_objective or name not in OBJECTIVES or file_objective not in OBJECTIVES:
        return []
    notes = []
    for section, attribute in _OBJECTIVE_OPTIONS.items():
        options: dict[str, Any] = getattr(cfg.algorithm, section)
        taken = getattr(OBJECTIVES[name], attribute).names()
        written_for = getattr(OBJECTIVES[file_objective], attribute).names()
        for key in list(options):
            if key not in taken and key in written_for and key not in explicit.get(section, set()):
                del options[key]
                notes.append(
                    f"note: algorithm.name={name} does not take algorithm.{section}.{key} "
                    f"(from {source}, written for {file_objective}); dropped"
                )
    return notes


def typed_options(options: type[Options], values: Mapping[str, Any], where: str) -> Options:
    """``values`` (a config section: a mapping with some of the options) as the ``options`` dataclass.

    The keys are checked first (an unknown one is named with the closest option and all valid ones),
    then the values' types through OmegaConf (so YAML's ``1e-6`` or ``"0.3"`` become floats), then the
    dataclass's own checks (choices, ranges); each error names ``where``.
    """
    if isinstance(values, options):
        return values
    values = dict(values)  # a dict, a DictConfig, or another objective's options (whose keys then fail)
    options.check_keys(values, where)
    schema = OmegaConf.structured(options)
    OmegaConf.set_readonly(schema, False)  # a frozen dataclass's node is read-only
    try:
        merged = OmegaConf.merge(schema, values)
    except ValidationError as exc:
        message = str(exc.msg).splitlines()[0]
        raise ValueError(f"invalid value in {where}: {message} (key {where}.{exc.full_key})") from exc
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _with_typed_options(algorithm: AlgorithmConfig) -> AlgorithmConfig:
    """``algorithm`` with its ``loss`` and ``advantage`` as the objective's dataclasses."""
    objective = OBJECTIVES[algorithm.name]
    typed = {
        section: typed_options(
            getattr(objective, attribute), getattr(algorithm, section), f"algorithm.{section}"
        )
        for section, attribute in _OBJECTIVE_OPTIONS.items()
    }
    return dataclasses.replace(algorithm, **typed)


def options_help() -> str:
    """Every objective's ``algorithm.loss`` / ``algorithm.advantage`` options with defaults and help."""
    lines = []
    for name, objective in OBJECTIVES.items():
        if objective.needs_values:
            continue  # PPO needs a critic: not a choice of this trainer
        lines.append(f"algorithm.name={name}:")
        for section, attribute in _OBJECTIVE_OPTIONS.items():
            lines += [f"  {line}" for line in getattr(objective, attribute).describe(f"algorithm.{section}")]
    return "\n".join(lines)


def validate(cfg: Config) -> None:
    """Check combinations OmegaConf's types cannot; raise ``ValueError`` saying what to change.

    ``cfg.algorithm.loss`` and ``cfg.algorithm.advantage`` become the objective's option dataclasses
    (:func:`typed_options`), every option with its value or default.
    """
    name = cfg.algorithm.name
    if name not in OBJECTIVES:
        raise ValueError(f"algorithm.name={name!r} is not one of {sorted(OBJECTIVES)}")
    objective = OBJECTIVES[name]
    if objective.needs_values:
        raise ValueError(
            f"algorithm.name={name!r} needs a value model, which the LM trainer does not train; "
            "use flowrl, grpo, dr_grpo or reinforce_pp"
        )
    cfg.algorithm = _with_typed_options(cfg.algorithm)
    t = cfg.train
    n = cfg.rollout.num_samples_per_prompt
    if n < 1 or t.prompts_per_step < 1:
        raise ValueError("rollout.num_samples_per_prompt and train.prompts_per_step must be >= 1")
    if n == 1 and objective.needs_groups:
        raise ValueError(
            f"{name} compares the responses of a prompt within its group: set "
            "rollout.num_samples_per_prompt >= 2"
        )
    if t.micro_batch_size < 1 or t.mini_batch_size < t.micro_batch_size:
        raise ValueError(
            f"need 1 <= train.micro_batch_size <= train.mini_batch_size "
            f"(got {t.micro_batch_size} and {t.mini_batch_size})"
        )
    if t.logprob_micro_batch_size is not None and t.logprob_micro_batch_size < 1:
        raise ValueError(
            f"train.logprob_micro_batch_size must be >= 1 or null, got {t.logprob_micro_batch_size}"
        )
    if t.total_steps < 1 or t.epochs_per_rollout < 1 or t.log_every < 1:
        raise ValueError("train.total_steps, train.epochs_per_rollout and train.log_every must be >= 1")
    if cfg.optim.max_grad_norm is not None and cfg.optim.max_grad_norm < 0:
        raise ValueError(
            f"optim.max_grad_norm must be > 0, or 0 / null for no clipping, got {cfg.optim.max_grad_norm}"
        )
    if t.optimizer_in_backward:
        _check_optimizer_in_backward(cfg)
    if cfg.optim.schedule not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {cfg.optim.schedule!r}")
    if cfg.rollout.engine not in ("hf", "vllm"):
        raise ValueError(f"rollout.engine={cfg.rollout.engine!r}: choose 'hf' (transformers) or 'vllm'")
    if cfg.rollout.engine == "vllm" and t.device == "cpu":
        raise ValueError("rollout.engine=vllm runs on a CUDA GPU; on CPU use rollout.engine=hf")
    if not 0 < cfg.rollout.gpu_memory_utilization < 1:
        raise ValueError(
            f"rollout.gpu_memory_utilization must be in (0, 1), got {cfg.rollout.gpu_memory_utilization}"
        )
    if cfg.rollout.batch_size < 1:
        raise ValueError(f"rollout.batch_size (decode slots) must be >= 1, got {cfg.rollout.batch_size}")
    if cfg.rollout.prefill_tokens < 1:
        raise ValueError(f"rollout.prefill_tokens must be >= 1, got {cfg.rollout.prefill_tokens}")
    if cfg.rollout.temperature <= 0:
        raise ValueError("rollout.temperature must be > 0 for training (log-probs are divided by it)")
    if cfg.log_z.num_layers < 0:
        raise ValueError("log_z.num_layers must be >= 0 (0 = no head, log Z fixed at 0)")
    if cfg.log_z.mode not in LOG_Z_MODES:
        raise ValueError(
            f"log_z.mode={cfg.log_z.mode!r}: choose 'head' (a learned partition head) or 'group' "
            "(the group estimate, no head)"
        )
    dtypes = ("float32", "bfloat16", "float16", "auto")
    for key, value in (("model.dtype", cfg.model.dtype), ("model.ref_dtype", cfg.model.ref_dtype)):
        if value is not None and value not in dtypes:
            raise ValueError(f"{key}={value!r} is not one of {dtypes}")
    lora = cfg.model.lora
    if lora.rank < 0 or lora.alpha <= 0 or not 0 <= lora.dropout < 1 or not lora.target_modules:
        raise ValueError(
            "model.lora needs rank >= 0 (0 = off), alpha > 0, 0 <= dropout < 1 and at least one target "
            f"module (got rank {lora.rank}, alpha {lora.alpha}, dropout {lora.dropout}, "
            f"target_modules {list(lora.target_modules)})"
        )
    if t.strategy not in ("ddp", "fsdp2"):
        raise ValueError(f"train.strategy={t.strategy!r}: choose 'ddp' (replicas) or 'fsdp2' (sharded)")
    if t.strategy == "fsdp2" and lora.rank > 0:
        raise ValueError(
            "train.strategy=fsdp2 with LoRA is not supported: LoRA's trainable state is small, so run it "
            "with train.strategy=ddp (or one process)"
        )
    if t.strategy == "fsdp2" and t.offload_optimizer:
        raise ValueError(
            "train.offload_optimizer is for one process; train.strategy=fsdp2 shards the states instead"
        )
    if t.strategy == "fsdp2" and cfg.rollout.engine == "vllm":
        raise ValueError(
            "train.strategy=fsdp2 with rollout.engine=vllm is not supported; use rollout.engine=hf"
        )


def _check_optimizer_in_backward(cfg: Config) -> None:
    """What ``train.optimizer_in_backward`` cannot do, each with the setting that fixes it."""
    t, why = cfg.train, "train.optimizer_in_backward steps every parameter as soon as its gradient is formed"
    if cfg.optim.max_grad_norm:
        raise ValueError(
            f"{why}, before the global norm optim.max_grad_norm={cfg.optim.max_grad_norm:g} clips to is "
            "known: set optim.max_grad_norm=0 (no clipping) or train.optimizer_in_backward=false"
        )
    if t.micro_batch_size != t.mini_batch_size:
        raise ValueError(
            f"{why}, so an optimizer step cannot accumulate micro-batches: set train.micro_batch_size to "
            f"train.mini_batch_size ({t.mini_batch_size}), or lower train.mini_batch_size to "
            f"{t.micro_batch_size}, or set train.optimizer_in_backward=false"
        )
    if t.offload_optimizer:
        raise ValueError(
            "train.optimizer_in_backward and train.offload_optimizer are two ways to shrink one GPU's "
            "optimizer memory: choose one"
        )
    if t.strategy == "fsdp2":
        raise ValueError(
            f"{why}, which sharded gradients (train.strategy=fsdp2) are not: set train.optimizer_in_backward"
            "=false (fsdp2 already divides the gradients by the ranks)"
        )


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (printed at start and saved with the run): every option of the
    objective shows, with its value or default."""
    if cfg.algorithm.name in OBJECTIVES:
        cfg = dataclasses.replace(cfg, algorithm=_with_typed_options(cfg.algorithm))
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_dict(data: dict[str, Any]) -> Config:
    """A :class:`Config` from a plain dict (a saved run's config), its objective's options typed."""
    cfg: Config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), data))  # type: ignore[assignment]
    if cfg.algorithm.name in OBJECTIVES:
        cfg.algorithm = _with_typed_options(cfg.algorithm)
    return cfg
