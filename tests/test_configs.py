"""The paper-reproduction presets in configs/ load and validate, and keep the paper's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowrl.config import load_config

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


@pytest.mark.parametrize("name", sorted(PAPER))
def test_preset_validates_with_the_papers_settings(name: str) -> None:
    cfg = load_config(str(CONFIGS[0].parent / f"{name}.yaml"), [])
    prompts, optimizer_steps, temperature = PAPER[name]
    assert cfg.algorithm.name == "flowrl"
    assert cfg.algorithm.loss.get("beta", 15.0) == 15.0
    assert cfg.rollout.num_samples_per_prompt == 8 and cfg.rollout.temperature == temperature
    assert cfg.train.prompts_per_step == prompts
    assert prompts * 8 // cfg.train.mini_batch_size * cfg.train.epochs_per_rollout == optimizer_steps
    assert (cfg.data.max_prompt_length, cfg.rollout.max_new_tokens) == (2048, 8192)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.max_grad_norm) == (1e-6, 0.1, 1.0)
    assert cfg.optim.warmup_steps == 10


# ---------------------------------------------------------------------------------------------
# algorithm.name=... on the command line switches objectives: the file's options the new objective
# does not take are dropped with a note; options given on the command line are never dropped.

PRESET_7B = str(CONFIGS[0].parent / "paper_qwen2.5-7b_math.yaml")
FLOWRL_OPTIONS = ("beta", "importance_weight", "max_importance_weight")


def write_yaml(tmp_path: Path, algorithm: str) -> str:
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  path: m\ndata:\n  train_files: [d.parquet]\n" + algorithm)
    return str(path)


@pytest.mark.parametrize("preset", [p.name for p in CONFIGS])
@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "reinforce_pp"])
def test_switching_a_flowrl_preset_to_a_baseline_drops_the_flowrl_options(preset, name, capsys) -> None:
    path = str(CONFIGS[0].parent / preset)
    cfg = load_config(path, [f"algorithm.name={name}"])
    assert cfg.algorithm.name == name and cfg.algorithm.loss == {} and cfg.algorithm.advantage == {}
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
    assert cfg.algorithm.loss == {"kl_coef": 0.01} and cfg.algorithm.advantage == {"eps": 1e-4}
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
    assert cfg.algorithm.loss == {"clip_eps": 0.3, "kl_coef": 0.1} and cfg.algorithm.advantage == {}
    assert capsys.readouterr().err.splitlines() == [
        f"note: algorithm.name=dr_grpo does not take algorithm.advantage.eps "
        f"(from {path}, written for grpo); dropped"
    ]
    cfg = load_config(path, ["algorithm.name=reinforce_pp"])  # reinforce_pp: kl_coef is an advantage option
    assert cfg.algorithm.loss == {"clip_eps": 0.3} and cfg.algorithm.advantage == {}
    assert len(capsys.readouterr().err.splitlines()) == 2  # loss.kl_coef, advantage.eps


def test_a_file_without_algorithm_name_is_written_for_the_default_objective(tmp_path, capsys) -> None:
    path = write_yaml(tmp_path, "algorithm:\n  loss:\n    beta: 3.0\n")
    assert load_config(path, []).algorithm.loss == {"beta": 3.0}
    assert load_config(path, ["algorithm.name=grpo"]).algorithm.loss == {}
    assert "algorithm.loss.beta (from" in capsys.readouterr().err


def test_only_rank_0_prints_the_notes(monkeypatch, capsys) -> None:
    monkeypatch.setenv("RANK", "1")
    assert load_config(PRESET_7B, ["algorithm.name=grpo"]).algorithm.loss == {}
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
    assert cfg.algorithm.name == "grpo" and cfg.algorithm.loss == {}
    err = capsys.readouterr().err
    assert f"note: algorithm.name=grpo does not take algorithm.loss.beta (from {PRESET_7B}" in err
