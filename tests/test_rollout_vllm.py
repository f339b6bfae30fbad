"""The vLLM rollout engine (``rollout.engine=vllm``).

The first group runs everywhere: vLLM stays an optional import, configuration errors name the fix, and
the engine's pure parts (sampling parameters, completion rows, the weight stream without the log Z
head) do what the engine relies on. The ``gpu`` group needs vLLM and a CUDA GPU and is skipped
elsewhere: greedy rollouts equal the HF engine's, weight sync makes vLLM sample from the updated
policy, and the trainer runs with it end to end.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from flowrl.config import load_config
from flowrl.partition import LOG_Z_PREFIX, LogZHead
from flowrl.policy import Policy, load_model, load_tokenizer
from flowrl.rollout import HFRolloutEngine, SamplingParams
from flowrl.rollout.vllm import INSTALL_HINT, completion_row, vllm_sampling_kwargs, weights_for_vllm
from tests.conftest import trainer_overrides, write_config

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm_gpu = pytest.mark.skipif(
    not (HAS_VLLM and torch.cuda.is_available()), reason="needs vLLM and a CUDA GPU"
)


@pytest.mark.slow  # a fresh interpreter importing torch and transformers
def test_vllm_is_imported_only_when_chosen() -> None:
    code = "import sys, flowrl.trainer, flowrl.rollout, flowrl.rollout.vllm; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_config_errors_name_the_fix(model_dir: Path) -> None:
    base = [f"model.path={model_dir}", "data.train_files=[x.jsonl]"]
    with pytest.raises(ValueError, match="on CPU use rollout.engine=hf"):
        load_config(None, [*base, "rollout.engine=vllm", "train.device=cpu"])
    with pytest.raises(ValueError, match="choose 'hf' .* or 'vllm'"):
        load_config(None, [*base, "rollout.engine=sglang"])
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        load_config(None, [*base, "rollout.gpu_memory_utilization=1.5"])


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_without_vllm_the_engine_says_how_to_get_it() -> None:
    from flowrl.rollout.vllm import VLLMRolloutEngine

    with pytest.raises(ImportError, match=r"pip install 'flowrl\[vllm\]'") as err:
        VLLMRolloutEngine("unused", pad_token_id=0, eos_token_id=1)
    assert str(err.value) == INSTALL_HINT


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_flowrl_train_without_vllm_stops_before_loading_anything(
    model_dir: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flowrl import commands

    items = trainer_overrides(model_dir, data_file, tmp_path / "run", **{"rollout.engine": "vllm"})
    assert commands.main(["train", str(write_config(tmp_path / "vllm.yaml", items))]) == 2
    assert "pip install 'flowrl[vllm]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # no run directory: nothing was started


def test_sampling_parameters_map_onto_vllm() -> None:
    params = SamplingParams(n=4, temperature=0.6, top_p=0.9, top_k=0, max_new_tokens=32, return_logprobs=True)
    kwargs = vllm_sampling_kwargs(params, [7, 9], seed=123)
    assert kwargs["n"] == 4 and kwargs["temperature"] == 0.6 and kwargs["top_p"] == 0.9
    assert kwargs["top_k"] == 0  # disabled, in both conventions
    assert kwargs["max_tokens"] == 32 and kwargs["stop_token_ids"] == [7, 9] and not kwargs["ignore_eos"]
    assert kwargs["logprobs"] == 0 and kwargs["seed"] == 123 and kwargs["detokenize"] is False
    fixed = vllm_sampling_kwargs(SamplingParams(top_k=5, ignore_eos=True), [7], seed=0)
    assert fixed["top_k"] == 5 and fixed["ignore_eos"] and fixed["stop_token_ids"] == []
    assert fixed["logprobs"] is None


@dataclass
class _Logprob:  # the shape of vllm.sequence.Logprob: the engine reads `.logprob`
    logprob: float


def test_completion_rows_keep_the_stop_token() -> None:
    steps = [{5: _Logprob(-0.5)}, {9: _Logprob(-1.25)}]
    assert completion_row([5, 9], steps, "stop", [9]) == ([5, 9], [-0.5, -1.25])
    # vLLM left the stop token out: it is put back, so the response ends on EOS as the HF engine's do
    assert completion_row([5], steps[:1], "stop", [9, 11]) == ([5, 9], [-0.5, 0.0])
    assert completion_row([5, 6], None, "length", [9]) == ([5, 6], None)  # truncated: nothing added


def test_the_log_z_head_never_enters_the_weight_stream(model_dir: Path) -> None:
    model = load_model(str(model_dir))
    policy = Policy(model, LogZHead(model.config.hidden_size, num_layers=2))
    names = [name for name, _ in weights_for_vllm(policy.named_parameters())]
    assert names and not any(LOG_Z_PREFIX in n for n in names)
    assert set(names) == {f"model.{n}" for n, _ in model.named_parameters()}
    assert any(n.startswith(LOG_Z_PREFIX) for n, _ in policy.named_parameters())  # it was there to drop
    tensors = dict(weights_for_vllm(model.named_parameters()))
    assert all(not t.requires_grad for t in tensors.values())


# -- with vLLM on a GPU ------------------------------------------------------------------------------


@needs_vllm_gpu
@pytest.mark.gpu
def test_greedy_rollouts_equal_the_hf_engine_and_follow_weight_sync(model_dir: Path) -> None:
    from flowrl.rollout.vllm import VLLMRolloutEngine

    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), device="cuda").eval()
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    hf = HFRolloutEngine(model, **ids, show_progress=False)
    vllm_engine = VLLMRolloutEngine(str(model_dir), **ids, dtype="float32", gpu_memory_utilization=0.2)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("sum 7:", "sum 123:")]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)

    def same(a, b) -> bool:
        return torch.equal(a.response_ids.cpu(), b.response_ids.cpu())

    assert same(hf.generate(prompts, greedy), vllm_engine.generate(prompts, greedy))
    with torch.no_grad():  # a different policy: vLLM must follow it after sync_weights, not before
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    after = hf.generate(prompts, greedy)
    vllm_engine.sync_weights(model)
    assert same(after, vllm_engine.generate(prompts, greedy))


@needs_vllm_gpu
@pytest.mark.gpu
def test_trainer_runs_with_the_vllm_engine(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    from flowrl.trainer import Trainer

    settings = {
        "rollout.engine": "vllm",
        "rollout.vllm_dtype": "float32",
        "rollout.gpu_memory_utilization": 0.2,
        "train.device": "cuda",
    }
    cfg = load_config(None, trainer_overrides(model_dir, data_file, tmp_path, **settings))
    result = Trainer(cfg).fit()
    assert len(result.metrics) == 2 and all(m["rollout/response_length"] > 0 for m in result.metrics)
