"""The paper-reproduction presets in configs/ load and validate, and keep the paper's settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from flowrl.config import load_config
from flowrl.objectives import OBJECTIVES

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


# docs/algorithm.md#4-training-settings: (prompts per step, optimizer steps per rollout batch,
# rollout temperature)
PAPER = {
    "paper_qwen2.5-7b_math": (512, 16, 1.0),
    "paper_qwen2.5-32b_math": (512, 16, 1.0),
    "paper_r1-distill-qwen-7b_code": (64, 2, 0.6),
}


def test_every_preset_is_checked() -> None:
    assert sorted(p.stem for p in CONFIGS) == sorted(PAPER)


# What a preset must write itself rather than inherit from a default: the numbers the paper's run depends
# on, which a later change of a default must not move silently.
STATED = {"algorithm.name": "flowrl", "algorithm.loss.beta": 15.0}


def paper_problems(path: Path, paper: tuple[int, int, float]) -> list[str]:
    """How the preset at ``path`` departs from the paper's run ``(prompts per step, optimizer steps per
    rollout batch, temperature)``, stated values included; empty when it is the paper's."""
    written = OmegaConf.load(path)
    problems = [
        f"{key} must be written in the preset as {value!r}, found {OmegaConf.select(written, key)!r}"
        for key, value in STATED.items()
        if OmegaConf.select(written, key) != value
    ]
    cfg = load_config(str(path), [])
    prompts, optimizer_steps, temperature = paper
    checks = {
        "algorithm.name=flowrl, beta 15": cfg.algorithm.name == "flowrl" and cfg.algorithm.loss.beta == 15.0,
        "8 samples per prompt": cfg.rollout.num_samples_per_prompt == 8,
        f"temperature {temperature}": cfg.rollout.temperature == temperature,
        f"{prompts} prompts per step": cfg.train.prompts_per_step == prompts,
        f"{optimizer_steps} optimizer steps per rollout batch": (
            prompts * 8 // cfg.train.mini_batch_size * cfg.train.epochs_per_rollout == optimizer_steps
        ),
        "2048 prompt and 8192 response tokens": (
            (cfg.data.max_prompt_length, cfg.rollout.max_new_tokens) == (2048, 8192)
        ),
        "lr 1e-6, weight decay 0.1, clip 1.0": (
            (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.max_grad_norm) == (1e-6, 0.1, 1.0)
        ),
        "10 warm-up steps": cfg.optim.warmup_steps == 10,
    }
    return problems + [f"not the paper's {what}" for what, ok in checks.items() if not ok]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_preset_validates_with_the_papers_settings(name: str) -> None:
    assert paper_problems(CONFIGS[0].parent / f"{name}.yaml", PAPER[name]) == []


def test_a_preset_that_leaves_beta_to_the_default_fails_the_check(tmp_path: Path) -> None:
    """beta 15 is also the loss's default, so a preset without it loads with beta 15 and would pass a check
    of the loaded value; the check reads what the preset writes."""
    name = "paper_qwen2.5-7b_math"
    preset = OmegaConf.load(CONFIGS[0].parent / f"{name}.yaml")
    del preset.algorithm.loss["beta"]
    path = tmp_path / f"{name}.yaml"
    OmegaConf.save(preset, path)
    assert load_config(str(path), []).algorithm.loss.beta == 15.0  # the default fills it in
    assert paper_problems(path, PAPER[name]) == [
        "algorithm.loss.beta must be written in the preset as 15.0, found None"
    ]
    preset.algorithm.loss.beta = 3.0
    OmegaConf.save(preset, path)
    problems = paper_problems(path, PAPER[name])
    assert problems[0].endswith("found 3.0") and "not the paper's algorithm.name=flowrl, beta 15" in problems


# ---------------------------------------------------------------------------------------------
# algorithm.name=... on the command line switches objectives: the file's options the new objective
# does not take are dropped with a note; options given on the command line are never dropped.

PRESET_7B = str(CONFIGS[0].parent / "paper_qwen2.5-7b_math.yaml")
FLOWRL_OPTIONS = ("beta", "importance_weight", "max_importance_weight")


def defaults(name: str, section: str = "loss", **values: object) -> object:
    """The typed options of objective ``name``'s ``section``: its defaults, but for ``values``."""
    return getattr(OBJECTIVES[name], f"{section}_options")(**values)


def write_yaml(tmp_path: Path, algorithm: str) -> str:
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  path: m\ndata:\n  train_files: [d.parquet]\n" + algorithm)
    return str(path)


@pytest.mark.parametrize("preset", [p.name for p in CONFIGS])
@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "reinforce_pp"])
def test_switching_a_flowrl_preset_to_a_baseline_drops_the_flowrl_options(preset, name, capsys) -> None:
    path = str(CONFIGS[0].parent / preset)
    cfg = load_config(path, [f"algorithm.name={name}"])
    assert cfg.algorithm.name == name and cfg.algorithm.loss == defaults(name)
    assert cfg.algorithm.advantage == defaults(name, "advantage")
    notes = capsys.readouterr().err.splitlines()
    assert notes == [
        f"note: algorithm.name={name} does not take algorithm.loss.{key} (from {path}, written for flowrl); "
        "dropped"
        for key in FLOWRL_OPTIONS
    ]
    # the other settings of the preset are kept
    assert cfg.train.prompts_per_step == load_config(path, []).train.prompts_per_step


def test_options_given_with_the_switch_are_kept(capsys) -> None:
    cfg = load_config(
        PRESET_7B, ["algorithm.name=grpo", "algorithm.loss.kl_coef=0.01", "algorithm.advantage.eps=1e-4"]
    )
    assert cfg.algorithm.loss == defaults("grpo", kl_coef=0.01)
    assert cfg.algorithm.advantage == defaults("grpo", "advantage", eps=1e-4)
    assert "algorithm.loss.beta" in capsys.readouterr().err


def test_an_option_given_on_the_command_line_for_another_objective_still_fails(capsys) -> None:
    with pytest.raises(ValueError, match="unknown option algorithm.loss.beta .*valid: clip_eps"):
        load_config(PRESET_7B, ["algorithm.name=grpo", "algorithm.loss.beta=1.0"])
    with pytest.raises(ValueError, match="unknown option algorithm.loss.kl_cof; did you mean 'kl_coef'"):
        load_config(PRESET_7B, ["algorithm.name=grpo", "algorithm.loss.kl_cof=0.01"])
    with pytest.raises(ValueError, match="unknown option algorithm.advantage.eps"):
        load_config(PRESET_7B, ["algorithm.name=dr_grpo", "algorithm.advantage.eps=1e-4"])
    # no file at all: every option is explicit
    with pytest.raises(ValueError, match="unknown option algorithm.loss.beta"):
        load_config(
            None, ["model.path=m", "data.train_files=[d]", "algorithm.name=grpo", "algorithm.loss.beta=1"]
        )
    assert capsys.readouterr().err == ""  # a failed load prints no notes


def test_a_misspelled_option_in_the_file_still_fails_with_or_without_a_switch(tmp_path) -> None:
    path = write_yaml(tmp_path, "algorithm:\n  name: flowrl\n  loss:\n    bta: 3.0\n")
    with pytest.raises(ValueError, match="unknown option algorithm.loss.bta; did you mean 'beta'"):
        load_config(path, [])
    # taken by neither objective: not a switch leftover, so not dropped
    with pytest.raises(ValueError, match="unknown option algorithm.loss.bta"):
        load_config(path, ["algorithm.name=grpo"])
    # the file's own objective does not take it: an error in the file, not dropped either
    path = write_yaml(tmp_path, "algorithm:\n  name: grpo\n  loss:\n    beta: 3.0\n")
    with pytest.raises(ValueError, match="unknown option algorithm.loss.beta"):
        load_config(path, [])


def test_shared_options_are_kept_and_the_advantage_section_is_handled_too(tmp_path, capsys) -> None:
    path = write_yaml(
        tmp_path,
        "algorithm:\n  name: grpo\n  loss:\n    clip_eps: 0.3\n    kl_coef: 0.1\n"
        "  advantage:\n    eps: 1e-4\n",
    )
    cfg = load_config(path, ["algorithm.name=dr_grpo"])  # dr_grpo takes clip_eps and kl_coef, not eps
    assert cfg.algorithm.loss == defaults("dr_grpo", clip_eps=0.3, kl_coef=0.1)
    assert cfg.algorithm.advantage == defaults("dr_grpo", "advantage")
    assert capsys.readouterr().err.splitlines() == [
        f"note: algorithm.name=dr_grpo does not take algorithm.advantage.eps "
        f"(from {path}, written for grpo); dropped"
    ]
    cfg = load_config(path, ["algorithm.name=reinforce_pp"])  # reinforce_pp: kl_coef is an advantage option
    assert cfg.algorithm.loss == defaults("reinforce_pp", clip_eps=0.3)
    assert cfg.algorithm.advantage == defaults("reinforce_pp", "advantage")
    assert len(capsys.readouterr().err.splitlines()) == 2  # loss.kl_coef, advantage.eps


def test_a_file_without_algorithm_name_is_written_for_the_default_objective(tmp_path, capsys) -> None:
    path = write_yaml(tmp_path, "algorithm:\n  loss:\n    beta: 3.0\n")
    assert load_config(path, []).algorithm.loss == defaults("flowrl", beta=3.0)
    assert load_config(path, ["algorithm.name=grpo"]).algorithm.loss == defaults("grpo")
    assert "algorithm.loss.beta (from" in capsys.readouterr().err


def test_only_rank_0_prints_the_notes(monkeypatch, capsys) -> None:
    monkeypatch.setenv("RANK", "1")
    assert load_config(PRESET_7B, ["algorithm.name=grpo"]).algorithm.loss == defaults("grpo")
    assert capsys.readouterr().err == ""


def test_flowrl_train_shows_the_dropped_options(monkeypatch, capsys) -> None:
    import flowrl.trainer
    from flowrl.commands import train as train_cli

    class Loaded(Exception):  # stops `flowrl train` right after the config is loaded, before any model
        pass

    def stop(cfg, *args, **kwargs):
        raise Loaded(cfg)

    for name in ("Trainer", "train"):  # whichever train_cli uses to start the run
        monkeypatch.setattr(flowrl.trainer, name, stop, raising=False)
    with pytest.raises(Loaded) as info:
        train_cli.main([PRESET_7B, "algorithm.name=grpo"])
    cfg = info.value.args[0]
    assert cfg.algorithm.name == "grpo" and cfg.algorithm.loss == defaults("grpo")
    err = capsys.readouterr().err
    assert f"note: algorithm.name=grpo does not take algorithm.loss.beta (from {PRESET_7B}" in err


# ---------------------------------------------------------------------------------------------
# algorithm.loss / algorithm.advantage are the objective's typed options (flowrl.objectives.options)


def test_a_saved_config_shows_every_option_of_the_objective(tmp_path) -> None:
    from flowrl.config import from_dict, to_yaml
    from flowrl.objectives import FlowRLLossOptions, GroupAdvantageOptions

    cfg = load_config(PRESET_7B, [])
    assert (
        type(cfg.algorithm.loss) is FlowRLLossOptions
        and type(cfg.algorithm.advantage) is GroupAdvantageOptions
    )
    saved = OmegaConf.create(to_yaml(cfg))
    assert dict(saved.algorithm.loss) == dict(FlowRLLossOptions()) and saved.algorithm.loss.beta == 15.0
    assert dict(saved.algorithm.advantage) == {"eps": 1e-6}
    assert (saved.log_z.num_layers, saved.log_z.dropout, saved.model.logprob_chunk_size) == (3, 0.1, 1024)
    # and it loads back to the same config, as a file and as a dict
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "config.yaml", []) == cfg
    assert from_dict(OmegaConf.to_container(saved)) == cfg


def test_option_values_are_typed_and_checked_where_they_are_set(tmp_path) -> None:
    path = write_yaml(tmp_path, "algorithm:\n  loss:\n    beta: 3\n    max_importance_weight: '5'\n")
    loss = load_config(path, []).algorithm.loss
    assert (loss.beta, loss.max_importance_weight) == (3.0, 5.0) and isinstance(loss.beta, float)
    with pytest.raises(ValueError, match="invalid value in algorithm.loss.*beta"):
        load_config(path, ["algorithm.loss.beta=hot"])
    with pytest.raises(
        ValueError, match="algorithm.loss: unknown importance_weight 'clamped'; use one of clamp"
    ):
        load_config(path, ["algorithm.loss.importance_weight=clamped"])
    with pytest.raises(ValueError, match="algorithm.advantage: unknown kl_estimator 'k9'"):
        load_config(path, ["algorithm.name=reinforce_pp", "algorithm.advantage.kl_estimator=k9"])


def test_validate_asks_the_objective_whether_it_needs_groups(tmp_path) -> None:
    path = write_yaml(tmp_path, "rollout:\n  num_samples_per_prompt: 1\n")
    assert load_config(path, ["algorithm.name=reinforce_pp"]).rollout.num_samples_per_prompt == 1
    for name in ("flowrl", "grpo", "dr_grpo"):
        with pytest.raises(ValueError, match=f"{name} compares the responses of a prompt.*>= 2"):
            load_config(path, [f"algorithm.name={name}"])


def test_the_help_lists_every_objectives_options_with_defaults() -> None:
    from flowrl.config import options_help

    text = options_help()
    assert "algorithm.loss.beta=15.0: inverse temperature" in text
    assert "algorithm.advantage.kl_coef=0.001" in text and "algorithm.loss.clip_eps_high=null" in text
    assert "algorithm.name=ppo" not in text  # the trainer does not train a critic


# -- the command line's shapes --------------------------------------------------------------------------


def test_a_first_argument_that_reads_key_value_is_an_override_not_a_config_file() -> None:
    from flowrl.config import config_arguments

    assert config_arguments("model.path=m", ["optim.lr=1"]) == (None, ["model.path=m", "optim.lr=1"])
    assert config_arguments(str(CONFIGS[0]), ["optim.lr=1"]) == (str(CONFIGS[0]), ["optim.lr=1"])
    assert config_arguments("missing.yaml", []) == ("missing.yaml", [])  # load_config names the fix
    with pytest.raises(FileNotFoundError, match="key=value overrides alone"):
        load_config("missing.yaml", [])


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("model.lora.target_modules=q_proj,v_proj", "model.lora.target_modules", ["q_proj", "v_proj"]),
        ("model.lora.target_modules=all-linear", "model.lora.target_modules", ["all-linear"]),
        ("data.train_files=a.parquet", "data.train_files", ["a.parquet"]),
        ("data.train_files=[a.parquet,b.jsonl]", "data.train_files", ["a.parquet", "b.jsonl"]),
        ("optim.betas=0.9,0.95", "optim.betas", [0.9, 0.95]),
    ],
)
def test_a_list_valued_key_takes_a_bare_value_or_commas(override: str, key: str, expected: list) -> None:
    cfg = load_config(None, ["model.path=m", "data.train_files=[x.jsonl]", override])
    assert list(OmegaConf.select(OmegaConf.structured(cfg), key)) == expected


def test_a_scalar_key_given_a_list_still_fails_naming_the_key() -> None:
    with pytest.raises(ValueError, match="optim.lr"):
        load_config(None, ["model.path=m", "optim.lr=[1,2]"])


def test_lora_with_a_reference_dtype_says_it_has_no_effect(capsys: pytest.CaptureFixture[str]) -> None:
    load_config(None, ["model.path=m", "model.lora.rank=8", "model.ref_dtype=bfloat16"])
    assert "model.ref_dtype=bfloat16 has no effect with LoRA" in capsys.readouterr().err
    assert load_config(None, ["model.path=m", "model.ref_dtype=bfloat16"]).model.ref_dtype == "bfloat16"
    assert "no effect" not in capsys.readouterr().err


def test_flowrl_train_reads_overrides_alone_and_after_its_flags(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``flowrl train key=value --overwrite key=value``: the config file is optional and overrides may
    follow the flags (the run stops at the missing data file, before any weights load)."""
    from flowrl.commands.train import main

    code = main([f"model.path={model_dir}", "--overwrite", f"train.output_dir={tmp_path / 'run'}",
                 f"data.train_files={tmp_path / 'missing.jsonl'}"])  # fmt: skip
    assert code == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert main([f"model.path={model_dir}", f"train.output_dir={tmp_path / 'run'}"]) == 2
    assert "data.train_files is empty" in capsys.readouterr().err
