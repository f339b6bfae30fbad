"""``FlowRLFSDPEngine``: verl 0.9's FSDP engine for causal LMs, plus FlowRL's log Z head.

Selected with ``+actor_rollout_ref.model.model_type=flowrl_language_model`` (:data:`FLOWRL_MODEL_TYPE`;
verl's own ``language_model`` engine stays registered and untouched). Relative to
``verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead`` it changes four things:

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
* **checkpoints**: verl's sharded checkpoint keeps the head and its optimizer state (resume restores
  both); beside it the engine writes ``log_z_head.safetensors`` with ``log_z_head.``-prefixed keys, the
  file of :mod:`flowrl.checkpoint`, so a head trained here loads into the project's trainer. When verl
  also saves a Hugging Face model (``checkpoint.save_contents`` with ``hf_model``), the head's tensors
  are removed from its weight files, as ``flowrl export`` does.

Supported: ``strategy=fsdp2``, ``ulysses_sequence_parallel_size=1``, text-only causal LMs, with or
without ``use_remove_padding``. FSDP1 is refused (gathering the head out of FSDP1's flat parameters for
its file is not implemented). None of this has run on a GPU; see ``docs/verl.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from verl.utils import tensordict_utils as tu
from verl.utils.device import get_device_id
from verl.utils.fsdp_utils import get_init_weight_context_manager
from verl.workers.engine import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from flowrl.checkpoint import HEAD_FILE, load_log_z_head, save_log_z_head
from flowrl.export import strip_head_tensors
from flowrl.integrations.verl.head import LogZCapture, LogZSettings, prompt_positions, without_log_z_params
from flowrl.partition import LogZHead

FLOWRL_MODEL_TYPE = "flowrl_language_model"
"""verl ``model_type`` of the FlowRL actor (``+actor_rollout_ref.model.model_type=...``)."""

_HF_INDEX = "model.safetensors.index.json"


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


def strip_log_z_from_hf_dir(hf_dir: Path) -> int:
    """Remove head tensors from a Hugging Face model directory's weights (and index); returns the count."""
    index_path = hf_dir / _HF_INDEX
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    removed = sum(strip_head_tensors(weights, index) for weights in sorted(hf_dir.glob("*.safetensors")))
    if index is not None and removed:
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return removed


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
        if self.engine_config.forward_only:
            return module
        settings = self.log_z_settings
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

    def save_checkpoint(self, local_path: str, *args: Any, **kwargs: Any) -> None:
        super().save_checkpoint(local_path, *args, **kwargs)
        if self.log_z is None or local_path is None:
            return
        state = full_state_dict(self.log_z.head)  # collective: all ranks
        if self.rank != 0:
            return
        settings = self.log_z_settings
        head = LogZHead(self.log_z.head.hidden_size, num_layers=settings.num_layers, dropout=settings.dropout)
        head.load_state_dict(state, strict=True)
        save_log_z_head(head, Path(local_path) / HEAD_FILE)
        hf_dir = Path(local_path) / "huggingface"
        if hf_dir.is_dir():
            strip_log_z_from_hf_dir(hf_dir)
