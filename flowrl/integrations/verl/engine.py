"""``FlowRLFSDPEngine``: verl 0.9's FSDP engine for causal LMs, plus FlowRL's log Z head.

Selected with ``+actor_rollout_ref.model.model_type=flowrl_language_model`` (:data:`FLOWRL_MODEL_TYPE`;
verl's own ``language_model`` engine stays registered and untouched). Relative to
``verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead`` it changes five things:

* **build**: after verl loads the Hugging Face model, a :class:`~flowrl.partition.LogZHead` is attached
  as its submodule ``log_z_head`` inside the same weight-init context (meta tensors on non-zero ranks,
  rank 0's weights broadcast when FSDP wraps the model), initialized from ``fsdp_config.seed`` or
  from ``init_path``. It lives in the FSDP root unit and in the optimizer's single parameter group
  (the reference code's setup: the head shares AdamW, lr 1e-6, wd 0.1). The reference policy, built
  from a copy of the same model config, is forward-only and gets no head;
* **forward**: in passes that compute a loss, the head runs inside the model's forward
  (:class:`~flowrl.integrations.verl.head.LogZCapture`) on the last hidden layer, mean-pooled over each
  sequence's prompt tokens, and the engine's model output gains ``log_z`` (B,). Log-prob passes (old and
  reference log-probs, ``compute_loss=False``) do not run it. The FSDP2 root unit, which holds the head,
  stays gathered from its forward to its backward (see ``_build_fsdp_module``);
* **rollout weight sync**: ``get_per_tensor_param`` and ``get_per_tensor_param_shard`` (which every
  checkpoint engine, colocated or not, streams from) drop the head's tensors from their streams;
* **checkpoints**: the head is saved *beside* the policy, never in it, so that verl's own
  ``python -m verl.model_merger merge --backend fsdp`` turns the checkpoint into a plain Hugging Face
  model (and ``model_merger test`` passes): the head's entries are taken out of the model state dicts
  verl saves (``model_world_size_W_rank_R.pt`` and, with ``hf_model`` in ``checkpoint.save_contents``,
  ``huggingface/``) and written per rank to ``log_z_head_world_size_W_rank_R.pt`` (its FSDP2 shards;
  resume puts them back into the model state dict verl loads, and the optimizer file keeps the head's
  AdamW state as before); rank 0 also writes ``log_z_head.safetensors`` with ``log_z_head.``-prefixed
  keys, the file of :mod:`flowrl.checkpoint`, so a head trained here loads into the project's trainer,
  and ``log_z_head.json``, the head's settings. The ``flowrl_log_z_*`` entries that verl copies from
  ``override_config`` onto the Hugging Face config are removed from the model's config when it is
  built, so no saved or merged ``config.json`` carries them;
* **LoRA** (``actor_rollout_ref.model.lora_rank > 0``): the head is kept out of peft's reach while verl
  wraps the policy (``target_modules: all-linear`` would wrap the head's Linear layers and freeze their
  weights), so the policy trains adapters and the head trains in full.

With ``flowrl.log_z.mode=group`` no head is built: the engine is verl's, the loss reads each sample's
log Z from the batch (the driver's group estimate, :mod:`flowrl.integrations.verl.trainer`), and
checkpoints, weight streams and merged models hold the policy alone.

Supported: ``strategy=fsdp2``, ``ulysses_sequence_parallel_size=1``, text-only causal LMs, with or
without ``use_remove_padding``, with or without LoRA. FSDP1 is refused (gathering the head out of
FSDP1's flat parameters for its file is not implemented). None of this has run on a GPU; see
``docs/verl.md``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from verl.utils import tensordict_utils as tu
from verl.utils.device import get_device_id
from verl.utils.fs import copy_to_local
from verl.utils.fsdp_utils import get_init_weight_context_manager
from verl.workers.engine import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from flowrl.checkpoint import HEAD_FILE, load_log_z_head, save_log_z_head
from flowrl.integrations.verl.head import (
    LOG_Z_MODULE,
    OVERRIDE_KEY_PREFIX,
    LogZCapture,
    LogZSettings,
    prompt_positions,
    without_log_z_params,
)
from flowrl.partition import LogZHead, is_log_z_param

FLOWRL_MODEL_TYPE = "flowrl_language_model"
"""verl ``model_type`` of the FlowRL actor (``+actor_rollout_ref.model.model_type=...``)."""

HEAD_SHARD_FILE = "log_z_head_world_size_{world_size}_rank_{rank}.pt"
"""Per-rank file of the head's FSDP2 shards in a verl checkpoint, beside verl's ``model_world_size_*``."""

HEAD_SETTINGS_FILE = "log_z_head.json"
"""The head's settings (:class:`LogZSettings`) beside ``log_z_head.safetensors`` in a verl checkpoint."""


def micro_batch_prompt_positions(micro_batch: TensorDict) -> tuple[Tensor, Tensor]:
    """:func:`~flowrl.integrations.verl.head.prompt_positions` for one micro-batch of verl's engine.

    The engine's ``input_ids`` are nested (B, prompt + response), without padding; the prompt lengths
    come from ``prompts`` the way ``verl.workers.utils.padding.no_padding_2_padding`` reads them (nested
    offsets, or the attention mask over the prompt columns); ``use_remove_padding`` decides whether the
    model sees the sequences packed or right-padded.

    Returns:
        ``(index, mask)``, both (B, P).
    """
    input_ids = micro_batch["input_ids"]
    sequence_lengths = input_ids.offsets().diff()
    prompts = micro_batch["prompts"]
    if prompts.is_nested:
        prompt_lengths = prompts.offsets().diff()
    else:
        prompt_lengths = micro_batch["attention_mask"][:, : prompts.shape[1]].sum(dim=1)
    packed = tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True)
    return prompt_positions(
        sequence_lengths.cpu(),
        prompt_lengths.cpu().to(sequence_lengths.dtype),
        packed=packed,
        row_width=None if packed else int(sequence_lengths.max()),
    )


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` with every FSDP2 shard gathered, on CPU.

    Collective under FSDP2: every rank must call it, in the same order relative to other collectives.
    """
    state = {}
    for name, value in module.state_dict().items():
        if isinstance(value, DTensor):
            value = value.to(get_device_id()).full_tensor()
        state[name] = value.detach().cpu()
    return state


def strip_log_z_settings(hf_config: Any) -> list[str]:
    """Delete the ``flowrl_log_z_*`` attributes verl copied from ``override_config`` onto a HF config.

    verl's ``HFModelConfig`` sets every ``override_config`` entry on the Hugging Face config; the head's
    settings are not the policy's, and a config that kept them would write them into every saved
    ``config.json`` (checkpoints, ``model_merger`` output). Returns the names removed.
    """
    names = [name for name in vars(hf_config) if name.startswith(OVERRIDE_KEY_PREFIX)]
    for name in names:
        delattr(hf_config, name)
    return names


@EngineRegistry.register(model_type=FLOWRL_MODEL_TYPE, backend=["fsdp", "fsdp2"], device=["cuda", "npu"])
class FlowRLFSDPEngine(FSDPEngineWithLMHead):
    """verl's FSDP causal-LM engine with FlowRL's log Z head (see the module docstring)."""

    def __init__(self, model_config: Any, engine_config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(model_config, engine_config, *args, **kwargs)
        self.log_z_settings = LogZSettings.from_override_config(model_config.override_config or {})
        self.log_z: LogZCapture | None = None
        if engine_config.forward_only:
            return  # the reference policy: no head, nothing else to check
        if engine_config.strategy != "fsdp2":
            raise ValueError(
                f"FlowRL's verl engine supports FSDP2 only, got strategy={engine_config.strategy!r}; set "
                "actor_rollout_ref.actor.strategy=fsdp2"
            )
        if self.ulysses_sequence_parallel_size > 1:
            raise ValueError(
                "the log Z head pools whole prompts and does not gather Ulysses sequence-parallel shards; "
                "set actor_rollout_ref.actor.ulysses_sequence_parallel_size=1"
            )

    # ----------------------------------------------------------------------------------- build

    def _build_module(self) -> nn.Module:
        # verl's builder knows the model types "language_model" and "value_model" only.
        self.model_config.model_type = "language_model"
        try:
            module = super()._build_module()
        finally:
            self.model_config.model_type = FLOWRL_MODEL_TYPE
        for config in {id(c): c for c in (module.config, self.model_config.hf_config)}.values():
            strip_log_z_settings(config)
        settings = self.log_z_settings
        if self.engine_config.forward_only or settings.mode == "group":
            return module  # the reference policy, or log Z from the batch (group mode): no head
        hidden_size = module.config.get_text_config().hidden_size
        init_context = get_init_weight_context_manager(
            use_meta_tensor=not self.model_config.hf_config.tie_word_embeddings, mesh=self.device_mesh
        )
        # Same initial head on every rank and in every run with the same seed (rank 0's is the one FSDP
        # broadcasts; the seed makes it reproducible).
        with init_context(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.engine_config.seed)
            head = LogZHead(hidden_size, num_layers=settings.num_layers, dropout=settings.dropout)
        if list(head.parameters()):
            head.to(next(module.parameters()).dtype)
            if settings.init_path is not None and self.rank == 0:  # FSDP broadcasts rank 0's weights
                load_log_z_head(head, settings.init_path)
        self.log_z = LogZCapture(module, head, settings)
        return module

    def _build_lora_module(self, module: nn.Module) -> nn.Module:
        if self.log_z is None:
            return super()._build_lora_module(module)
        # peft would wrap the head's Linear layers (verl's default target_modules is all-linear) and
        # freeze their weights. Detach the head while verl wraps the policy, then put it back on the
        # same model object (the forward hook and LogZCapture.head find it there): the head's
        # parameters stay plain, trainable and in the optimizer; only the policy gets adapters.
        head = module._modules.pop(LOG_Z_MODULE)
        try:
            wrapped = super()._build_lora_module(module)
        finally:
            module.add_module(LOG_Z_MODULE, head)
        return wrapped

    def _build_fsdp_module(self, module: nn.Module) -> nn.Module:
        module = super()._build_fsdp_module(module)
        if self.log_z is not None:
            # verl passes reshard_after_forward=True to every fully_shard call, the root's included, so the
            # root's parameters (the head's among them) are freed right after the model's forward. FSDP2
            # gathers them again for backward when a gradient reaches the root's *outputs*; log Z is not
            # one of them, so a backward that reaches the head first would read freed storage. Keep the
            # root unsharded until its backward instead (PyTorch's default for a root module); it holds
            # only the head, the final norm and any parameters verl does not wrap separately.
            module.set_reshard_after_forward(False, recurse=False)
        return module

    # ---------------------------------------------------------------------------------- forward

    def forward_step(self, micro_batch: TensorDict, loss_function: Any, forward_only: bool) -> Any:
        if self.log_z is None or loss_function is None:
            return super().forward_step(micro_batch, loss_function=loss_function, forward_only=forward_only)
        self.log_z.arm(*micro_batch_prompt_positions(micro_batch))
        try:
            return super().forward_step(micro_batch, loss_function=loss_function, forward_only=forward_only)
        finally:
            self.log_z.disarm()

    def prepare_model_outputs(
        self, output: Any, output_args: dict, micro_batch: TensorDict, logits_processor_func: Any
    ) -> dict[str, Tensor]:
        model_output = super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        if self.log_z is not None and logits_processor_func is not None:
            model_output["log_z"] = self.log_z.pop()
        return model_output

    # ------------------------------------------------------------------------- rollout weights

    def get_per_tensor_param(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        params, peft_config = super().get_per_tensor_param(*args, **kwargs)
        return without_log_z_params(params), peft_config

    def get_per_tensor_param_shard(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        params, peft_config = super().get_per_tensor_param_shard(*args, **kwargs)
        return without_log_z_params(params), peft_config

    # ------------------------------------------------------------------------------ checkpoints

    def _head_shard_path(self, local_path: str) -> Path:
        world_size, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        return Path(local_path) / HEAD_SHARD_FILE.format(world_size=world_size, rank=rank)

    def save_checkpoint(self, local_path: str, *args: Any, **kwargs: Any) -> None:
        if self.log_z is None or local_path is None:
            super().save_checkpoint(local_path, *args, **kwargs)
            return
        # verl saves `self.module.state_dict()` (and, for hf_model, a full state dict gathered from it):
        # take the head's entries out of every state dict built during the save, keep the first (the
        # sharded one verl writes per rank; later ones hold the same parameters).
        head_shards: dict[str, Any] = {}

        def take_head_out(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
            for key in [k for k in state_dict if is_log_z_param(k)]:
                head_shards.setdefault(key, state_dict.pop(key))

        handle = self.module.register_state_dict_post_hook(take_head_out)
        try:
            super().save_checkpoint(local_path, *args, **kwargs)
        finally:
            handle.remove()
        if self.checkpoint_manager.should_save_model:
            torch.save(head_shards, self._head_shard_path(local_path))
        state = full_state_dict(self.log_z.head)  # collective: all ranks
        if self.rank != 0:
            return
        settings = self.log_z_settings
        head = LogZHead(self.log_z.head.hidden_size, num_layers=settings.num_layers, dropout=settings.dropout)
        head.load_state_dict(state, strict=True)
        save_log_z_head(head, Path(local_path) / HEAD_FILE)
        (Path(local_path) / HEAD_SETTINGS_FILE).write_text(
            json.dumps(dataclasses.asdict(settings), indent=2) + "\n"
        )

    def load_checkpoint(self, local_path: str, *args: Any, **kwargs: Any) -> None:
        shard_path = None if self.log_z is None or local_path is None else self._head_shard_path(local_path)
        if shard_path is None or not self.checkpoint_manager.should_load_model:
            super().load_checkpoint(local_path, *args, **kwargs)
            return
        local_shards = Path(copy_to_local(str(shard_path)))
        if not local_shards.is_file():  # a checkpoint that kept the head inside the model's state dict
            super().load_checkpoint(local_path, *args, **kwargs)
            return
        head_shards = torch.load(local_shards, weights_only=False)

        def put_head_back(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
            for key, value in head_shards.items():
                state_dict.setdefault(prefix + key, value)

        handle = self.module.register_load_state_dict_pre_hook(put_head_back)
        try:
            super().load_checkpoint(local_path, *args, **kwargs)
        finally:
            handle.remove()
