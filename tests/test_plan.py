"""The memory plan (flowrl.plan, ``flowrl plan``): exact counts against real models, the per-token terms
against what autograd keeps, the paper's presets against the goals, the command, and monotonicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flowrl import plan as P
from flowrl.config import load_config
from flowrl.partition import LogZHead

REPO = Path(__file__).parents[1]
FIXTURES = Path(__file__).parent / "plan_fixtures"
QWEN7B = FIXTURES / "qwen2.5-7b" / "config.json"
QWEN32B = FIXTURES / "qwen2.5-32b" / "config.json"
R1_7B = FIXTURES / "deepseek-r1-distill-qwen-7b" / "config.json"
PRESET_7B = REPO / "configs" / "paper_qwen2.5-7b_math.yaml"
PRESET_32B = REPO / "configs" / "paper_qwen2.5-32b_math.yaml"
PRESET_CODE = REPO / "configs" / "paper_r1-distill-qwen-7b_code.yaml"

TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300)  # fmt: skip


def _transformers_model(config: dict, *, meta: bool = True) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if not k.startswith("_")})
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(hf_config)


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied parameters are yielded once


# -- parameter counts ------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", [QWEN7B, QWEN32B, R1_7B], ids=lambda p: p.parent.name)
def test_parameter_count_of_the_fixtures_equals_transformers(fixture: Path) -> None:
    config = json.loads(fixture.read_text())
    counts = P.count_parameters(P.ModelShape.from_config(config))
    assert counts.total == _numel(_transformers_model(config))


def test_qwen2_5_7b_count_is_the_published_one() -> None:
    shape = P.ModelShape.from_config(json.loads(QWEN7B.read_text()))
    assert P.count_parameters(shape).total == 7_615_616_512
    assert P.kv_bytes_per_token(shape, 2) == 57_344  # 2 x 28 layers x 4 KV heads x 128 x 2 bytes


@pytest.mark.parametrize(
    "extra",
    [
        dict(model_type="qwen2", tie_word_embeddings=True),
        dict(model_type="qwen2", tie_word_embeddings=False),
        dict(model_type="llama", tie_word_embeddings=False),
        dict(model_type="llama", tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
        dict(model_type="llama", attention_bias=True, head_dim=24),
        dict(model_type="mistral"),
        dict(model_type="qwen3", head_dim=32),
    ],
    ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()),
)
def test_parameter_count_equals_transformers(extra: dict) -> None:
    config = {**TINY, **extra}
    counts = P.count_parameters(P.ModelShape.from_config(config))
    model = _transformers_model(config)
    assert counts.total == _numel(model)
    layer = model.model.layers[0]
    assert counts.per_layer == sum(p.numel() for p in layer.parameters())


def test_qwen2_has_qkv_biases_and_llama_has_none_by_default() -> None:
    qwen = P.ModelShape.from_config({**TINY, "model_type": "qwen2"})
    llama = P.ModelShape.from_config({**TINY, "model_type": "llama"})
    assert qwen.qkv_bias and not qwen.o_bias and not llama.qkv_bias
    assert P.count_parameters(qwen).per_layer - P.count_parameters(llama).per_layer == 64 + 32 + 32


OTHER_DENSE = {  # counted from their transformers class on the meta device
    "gemma2": {**TINY, "model_type": "gemma2", "head_dim": 16},  # tied, four norms a layer
    "phi3": {**TINY, "model_type": "phi3", "pad_token_id": 0},  # fused qkv_proj and gate_up_proj
    "olmo2": {**TINY, "model_type": "olmo2"},  # q/k norms over the whole projection
    "gemma3-multimodal": {
        "model_type": "gemma3", "mm_tokens_per_image": 4,
        "text_config": {**TINY, "head_dim": 16},
        "vision_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=28, patch_size=14),
    },
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(OTHER_DENSE))
def test_other_dense_decoders_are_counted_exactly_from_their_class(name: str) -> None:
    config = OTHER_DENSE[name]
    shape = P.ModelShape.from_config(config)
    counts = P.count_parameters(shape)
    model = _transformers_model(config)
    assert counts.total == _numel(model) and counts.layers == 2 * counts.per_layer
    assert shape.hidden_size == 64 and shape.num_layers == 2 and shape.vocab_size == 300
    assert shape.tie_word_embeddings == (counts.output_head == 0)


@pytest.mark.parametrize("name", ["phi3", "gemma2"])
def test_lora_count_of_other_decoders_equals_peft(name: str) -> None:
    peft = pytest.importorskip("peft")
    model = _transformers_model(OTHER_DENSE[name], meta=False)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert P.lora_parameters(P.ModelShape.from_config(OTHER_DENSE[name]), 4, ["all-linear"]) == trainable


def test_other_decoders_are_planned_with_a_note() -> None:
    cfg = load_config(None, ["model.path=x", "model.lora.rank=8"])
    plan = P.plan_memory(cfg, model_config=OTHER_DENSE["phi3"], gpus=1, gpu_memory_gb=80)
    assert plan.peak_gb_per_device > 0 and any("phi3: parameters counted" in n for n in plan.notes)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({**TINY, "model_type": "mixtral", "num_local_experts": 4}, "mixture of experts"),
        ({**TINY, "model_type": "my_remote_model"}, "not one transformers knows"),
    ],
)
def test_a_model_the_plan_cannot_count_is_named_with_the_way_around(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"{config['model_type']}.*{message}.*runs it without a plan"):
        P.ModelShape.from_config(config)


@pytest.mark.parametrize("targets", [["all-linear"], ["q_proj", "v_proj"], ["down_proj", "o_proj", "k_proj"]])
@pytest.mark.parametrize("rank", [1, 8])
def test_lora_count_equals_peft(targets: list[str], rank: int) -> None:
    peft = pytest.importorskip("peft")
    config = {**TINY, "model_type": "qwen2", "tie_word_embeddings": True}
    model = _transformers_model(config, meta=False)
    lora = peft.LoraConfig(
        r=rank, lora_alpha=16, target_modules="all-linear" if targets == ["all-linear"] else targets
    )
    trainable, _ = peft.get_peft_model(model, lora).get_nb_trainable_parameters()
    assert P.lora_parameters(P.ModelShape.from_config(config), rank, targets) == trainable


def test_lora_count_of_qwen2_5_7b_at_rank_32() -> None:
    shape = P.ModelShape.from_config(json.loads(QWEN7B.read_text()))
    # 28 layers x 32 x (q 3584+3584, k 3584+512, v 3584+512, o 3584+3584, gate/up 3584+18944 x2, down)
    assert P.lora_parameters(shape, 32, ["all-linear"]) == 80_740_352


def test_an_unknown_lora_target_is_named() -> None:
    shape = P.ModelShape.from_config({**TINY, "model_type": "qwen2"})
    with pytest.raises(ValueError, match="qkv"):
        P.lora_parameters(shape, 8, ["qkv"])


@pytest.mark.parametrize("layers", [0, 1, 2, 3])
def test_log_z_head_count_equals_the_module(layers: int) -> None:
    head = LogZHead(48, num_layers=layers)
    assert P.log_z_head_parameters(48, layers) == sum(p.numel() for p in head.parameters())


# -- per-token terms against what autograd keeps --------------------------------------------------


def _saved_bytes_per_layer_token(*, dtype: torch.dtype, autocast: bool, lora_rank: int = 0) -> float:
    """Bytes autograd saves per token and decoder layer (two models, 1 and 2 layers, subtracted), less
    the autocast weight copies (counted separately by the plan)."""
    seen: dict[int, int] = {}

    def run(layers: int) -> int:
        config = {**TINY, "model_type": "qwen2", "num_hidden_layers": layers}
        model = _transformers_model(config, meta=False).to(dtype)
        if lora_rank:
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(r=lora_rank, target_modules="all-linear"))
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen.clear()

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        ids = torch.randint(0, TINY["vocab_size"], (2, 48))
        mask = torch.ones_like(ids)
        mask[0, :5] = 0  # left padding: the 4-D mask and repeated KV heads of a padded batch
        decoder = model.get_base_model().model if lora_rank else model.model
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
        ):
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        total = sum(seen.values())
        if autocast:  # the bf16 copies of the layer's linear weights (and biases): the plan counts them apart
            shape = P.ModelShape.from_config(config)
            total -= 2 * layers * P.count_parameters(shape).linear_per_layer
        return total

    return (run(2) - run(1)) / (2 * 48)


@pytest.mark.parametrize(
    "dtype, autocast, lora_rank",
    [
        (torch.float32, False, 0),
        (torch.float32, True, 0),
        (torch.bfloat16, False, 0),
        (torch.bfloat16, False, 4),
    ],
    ids=["fp32", "fp32-autocast", "bf16", "bf16-lora"],
)
def test_layer_activation_bytes_match_what_autograd_saves(
    dtype: torch.dtype, autocast: bool, lora_rank: int
) -> None:
    if lora_rank:
        pytest.importorskip("peft")
    shape = P.ModelShape.from_config({**TINY, "model_type": "qwen2"})
    compute = 2 if (autocast or dtype == torch.bfloat16) else 4
    residual = 4 if dtype == torch.float32 else 2
    lora_dims = P.lora_target_dims(shape, ["all-linear"])[:: shape.num_layers] if lora_rank else []
    planned = P.layer_activation_bytes(
        shape,
        compute_bytes=compute,
        residual_bytes=residual,
        autocast=autocast,
        frozen_base=bool(lora_rank),
        lora_dims=lora_dims,
        lora_rank=lora_rank,
    )
    measured = _saved_bytes_per_layer_token(dtype=dtype, autocast=autocast, lora_rank=lora_rank)
    assert planned == pytest.approx(measured, rel=0.10)


# -- the paper's presets ---------------------------------------------------------------------------


def _plan(preset: Path, fixture: Path, *overrides: str, **kwargs: object) -> P.MemoryPlan:
    cfg = load_config(preset, list(overrides))
    return P.plan_memory(cfg, model_config=fixture, **{"device": "cuda", **kwargs})  # type: ignore[arg-type]


def test_7b_lora_fits_one_80gb_gpu_within_60gb() -> None:
    plan = _plan(PRESET_7B, QWEN7B, "model.lora.rank=32", "model.dtype=bfloat16", gpus=1, gpu_memory_gb=80)
    assert plan.fits and plan.peak_gb_per_device <= 60
    assert plan.parameters["trainable"] == 80_740_352
    assert "reference" not in {c.name for c in plan.components}  # the base with adapters disabled


def test_7b_fsdp2_on_8_gpus_within_65gb_with_the_suggested_decode_slots() -> None:
    plan = _plan(PRESET_7B, QWEN7B, "train.strategy=fsdp2", gpus=8, gpu_memory_gb=80, budget_gb=65)
    assert plan.fits or plan.suggestions
    if not plan.fits:  # the preset's 64 decode slots of 10,240 tokens: the suggestion names the setting
        best = plan.suggestions[0]
        assert best.fits and best.peak_gb_per_device <= 65
        assert best.overrides[0].startswith("rollout.batch_size=")
        changed = _plan(PRESET_7B, QWEN7B, "train.strategy=fsdp2", *best.overrides, gpus=8, gpu_memory_gb=80)
        assert changed.peak_gb_per_device <= 65
    update = plan.phase_bytes()["update"] / P.GiB
    assert update <= 65  # the update itself fits at the preset's micro-batch


def test_7b_ddp_replica_on_8_gpus_does_not_fit_and_fsdp2_or_lora_is_suggested() -> None:
    plan = _plan(PRESET_7B, QWEN7B, gpus=8, gpu_memory_gb=80)
    assert not plan.fits and plan.peak_gb_per_device > 80
    changes = {s.change.split(":")[0] for s in plan.suggestions if s.fits}
    assert any(c.startswith("fsdp2") for c in changes) and any(c.startswith("LoRA") for c in changes)
    assert any("replica" in note for note in plan.notes)


def test_32b_and_code_presets_plan() -> None:
    big = _plan(PRESET_32B, QWEN32B, "train.strategy=fsdp2", gpus=8, gpu_memory_gb=80)
    assert big.parameters["total"] == 32_763_876_352
    code = _plan(PRESET_CODE, R1_7B, "model.lora.rank=32", "model.dtype=bfloat16", gpus=1, gpu_memory_gb=80)
    assert code.fits


# -- the command -----------------------------------------------------------------------------------


def test_flowrl_plan_prints_a_table_writes_json_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flowrl.commands import main

    out = tmp_path / "plan.json"
    args = ["plan", str(PRESET_7B), "train.strategy=fsdp2", "--gpus", "8", "--gpu-memory", "80",
            "--model-config", str(QWEN7B.parent), "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    for word in ("component", "weights", "KV cache", "optimizer states", "rollout", "update", "peak"):
        assert word in text
    report = json.loads(out.read_text())
    assert isinstance(report["peak_gb_per_device"], float) and isinstance(report["fits"], bool)
    assert report["peak_gb_per_device"] == pytest.approx(max(report["phases_gb"].values()), abs=1e-3)


def test_flowrl_plan_takes_overrides_alone_and_after_the_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No YAML and no data files: a plan needs the model's config.json and the run's settings only; the
    overrides may come before or after the options."""
    from flowrl.commands.plan import main

    out = tmp_path / "plan.json"
    args = [f"model.path={QWEN7B.parent}", "--gpus", "8", "--gpu-memory", "80", "train.strategy=fsdp2",
            "--json", str(out), "model.gradient_checkpointing=true"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["strategy"] == "fsdp2" and report["setup"]["gradient_checkpointing"]
    assert report["gpus"] == 8 and "fits in 80 GB" in capsys.readouterr().out


def test_flowrl_plan_names_a_missing_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flowrl.commands.plan import main

    code = main([str(PRESET_7B), f"model.path={tmp_path}", "--gpus", "1"])
    assert code == 2 and "config.json" in capsys.readouterr().err


def test_cpu_plan_counts_the_process_baseline_and_no_cuda_context() -> None:
    plan = _plan(PRESET_7B, QWEN7B, device="cpu", gpus=1, gpu_memory_gb=1000)
    runtime = next(c for c in plan.components if c.name == "runtime")
    assert runtime.bytes["update"] == int(P.CPU_BASELINE_GB * P.GiB)
    tokenizer = next(c for c in plan.components if c.name == "tokenizer")
    assert tokenizer.bytes["update"] == 152064 * P.TOKENIZER_BYTES_PER_ENTRY  # Qwen2.5-7B's vocabulary
    gpu = _plan(PRESET_7B, QWEN7B, device="cuda", gpus=1, gpu_memory_gb=80)
    assert "tokenizer" not in {c.name for c in gpu.components}  # host memory, not the GPU's
    assert plan.setup["policy_dtype"] == "float32" and plan.setup["reference_dtype"] == "float32"
    assert not plan.setup["autocast"] and not plan.setup["gradient_checkpointing"]


def test_no_reference_for_grpo_at_kl_0_and_one_at_kl_above_0() -> None:
    names = lambda p: {c.name for c in p.components}  # noqa: E731
    assert "reference" not in names(_plan(PRESET_7B, QWEN7B, "algorithm.name=grpo", gpus=1))
    assert "reference" in names(
        _plan(PRESET_7B, QWEN7B, "algorithm.name=grpo", "algorithm.loss.kl_coef=0.001")
    )
    assert "log Z head" not in names(_plan(PRESET_7B, QWEN7B, "algorithm.name=grpo", gpus=1))


# -- monotonic properties --------------------------------------------------------------------------


def _component(plan: P.MemoryPlan, name: str, phase: str) -> int:
    return next(c for c in plan.components if c.name == name).bytes.get(phase, 0)


@pytest.mark.parametrize("slots", [8, 16, 32])
def test_more_decode_slots_more_kv_cache(slots: int) -> None:
    fewer = _plan(PRESET_7B, QWEN7B, f"rollout.batch_size={slots}")
    more = _plan(PRESET_7B, QWEN7B, f"rollout.batch_size={2 * slots}")
    assert _component(more, "KV cache", "rollout") > _component(fewer, "KV cache", "rollout")
    assert more.phase_bytes()["rollout"] > fewer.phase_bytes()["rollout"]


def test_fsdp2_with_more_gpus_less_per_device() -> None:
    peaks = [
        _plan(PRESET_7B, QWEN7B, "train.strategy=fsdp2", gpus=n).phase_bytes()["update"]
        for n in (2, 4, 8, 16)
    ]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == 4


def test_bigger_micro_batch_more_activations_and_checkpointing_fewer() -> None:
    small = _plan(PRESET_7B, QWEN7B, "train.micro_batch_size=2")
    big = _plan(PRESET_7B, QWEN7B, "train.micro_batch_size=8")
    off = _plan(PRESET_7B, QWEN7B, "train.micro_batch_size=2", "model.gradient_checkpointing=false")
    act = lambda p: _component(p, "activations", "update")  # noqa: E731
    assert act(small) < act(big) and act(small) < act(off)


def test_vllm_share_counts_its_fraction_of_the_gpu() -> None:
    plan = _plan(
        PRESET_7B, QWEN7B, "rollout.engine=vllm", "rollout.gpu_memory_utilization=0.4", gpu_memory_gb=80
    )
    assert _component(plan, "vLLM share", "rollout") == int(0.4 * 80 * P.GiB)
    assert "KV cache" not in {c.name for c in plan.components}


@pytest.mark.parametrize("fixture", [QWEN7B, QWEN32B, R1_7B], ids=lambda p: p.parent.name)
def test_known_configs_of_the_presets_equal_the_published_files(fixture: Path) -> None:
    published = json.loads(fixture.read_text())
    known = P.KNOWN_CONFIGS[published["_name_or_path"]]
    assert {k: published[k] for k in known} == known
    assert P.ModelShape.from_config(published) == P.ModelShape.from_config(known)


def test_a_preset_plans_by_its_hub_id_without_a_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing local
    plan = P.plan_memory(load_config(PRESET_7B), gpus=8, gpu_memory_gb=80)
    assert plan.parameters["total"] == 7_615_616_512


def test_offloaded_optimizer_leaves_the_gpu() -> None:
    plain = _plan(PRESET_7B, QWEN7B, gpus=1)
    off = _plan(PRESET_7B, QWEN7B, "train.offload_optimizer=true", gpus=1)
    assert "optimizer states" not in {c.name for c in off.components}
    drop = plain.phase_bytes()["update"] - off.phase_bytes()["update"]
    assert drop == _component(plain, "optimizer states", "update")


def test_optimizer_in_backward_holds_only_the_input_embeddings_gradient_at_the_step() -> None:
    one_step = ["optim.max_grad_norm=0", "train.mini_batch_size=4"]  # the preset's micro-batch of 4
    plain = _plan(PRESET_7B, QWEN7B, *one_step, gpus=1)
    stepped = _plan(PRESET_7B, QWEN7B, *one_step, "train.optimizer_in_backward=true", gpus=1)
    vocab, hidden = 152_064, 3_584  # Qwen2.5-7B: an untied output head, float32 weights
    assert _component(stepped, "gradients", "optimizer step") == vocab * hidden * 4
    all_grads = _component(plain, "gradients", "optimizer step")
    drop = plain.phase_bytes()["optimizer step"] - stepped.phase_bytes()["optimizer step"]
    assert drop == all_grads - vocab * hidden * 4 > 25 * P.GiB
    assert plain.phase_bytes()["update"] == stepped.phase_bytes()["update"]  # one micro-batch: unchanged
    assert stepped.setup["optimizer_in_backward"] and "stepped in backward" in stepped.summary()


def test_one_gpu_full_fine_tuning_is_offered_the_steps_in_backward() -> None:
    plan = _plan(PRESET_7B, QWEN7B, gpus=1, gpu_memory_gb=200, budget_gb=160)  # the preset: 181.7 GB
    offered = next(s for s in plan.suggestions if s.change.startswith("optimizer steps in backward"))
    assert {"train.optimizer_in_backward=true", "optim.max_grad_norm=0", "train.mini_batch_size=4"} <= set(
        offered.overrides
    )
    replanned = _plan(PRESET_7B, QWEN7B, *offered.overrides, gpus=1)  # a config the trainer accepts
    assert offered.fits and offered.peak_gb_per_device == round(replanned.peak_gb_per_device, 2) < 160
    sharded = _plan(PRESET_7B, QWEN7B, gpus=8, gpu_memory_gb=200, budget_gb=160)  # one process only
    assert not any(s.change.startswith("optimizer steps in backward") for s in sharded.suggestions)


def _documented_preset_rows() -> list[list[str]]:
    text = (REPO / "docs" / "memory.md").read_text()
    table = text.split("## The paper's presets", 1)[1].split("\n\n")[2]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]


@pytest.mark.parametrize("row", _documented_preset_rows(), ids=lambda r: f"{r[0]} {r[1]} {r[2]}")
def test_the_documented_preset_plans_are_the_plans(row: list[str]) -> None:
    preset, changes, gpus, *phases, peak, fits = row
    config, fixture = {
        "Qwen2.5-7B math": (PRESET_7B, QWEN7B),
        "R1-Distill-Qwen-7B code": (PRESET_CODE, R1_7B),
        "Qwen2.5-32B math": (PRESET_32B, QWEN32B),
    }[preset]
    count, memory = gpus.removesuffix(" GB").split(" x ")
    overrides = [c.strip("`") for c in changes.split() if c.startswith("`")]
    plan = _plan(config, fixture, *overrides, gpus=int(count), gpu_memory_gb=float(memory))
    planned = [v / P.GiB for v in plan.phase_bytes().values()]
    assert [float(v) for v in phases] == pytest.approx(planned, abs=0.051)
    assert float(peak.split("**")[1]) == pytest.approx(plan.peak_gb_per_device, abs=0.051)
    assert f"({plan.peak_phase})" in peak and (fits == "yes") == plan.fits


def test_group_log_z_has_no_head_and_always_the_old_log_prob_pass() -> None:
    head = _plan(PRESET_7B, QWEN7B, "train.mini_batch_size=4096", gpus=1)
    group = _plan(PRESET_7B, QWEN7B, "train.mini_batch_size=4096", "log_z.mode=group", gpus=1)
    assert head.parameters["log_z_head"] > 0 and group.parameters["log_z_head"] == 0
    assert not head.setup["old_logprob_pass"] and group.setup["old_logprob_pass"]
