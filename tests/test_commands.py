"""Every ``flowrl ...`` command the documentation shows exists and parses, so copy-paste works.

Where commands are looked for:

- README.md, docs/*.md (and Markdown under examples/): every line of a ```bash (sh, shell, console)
  block, continuation lines (``\\``) joined, and every inline code span (also inside those blocks'
  comments and in tables);
- configs/*.yaml, configs/verl/*.sh and the other files under examples/: comment lines (``# Data:
  flowrl ...``, continued on the next comment line with ``\\``), code spans in them, and the shell
  lines of ``.sh`` files.

A command is ``flowrl ...``, ``.venv/bin/flowrl ...`` (any path ending in ``bin/flowrl``) or ``... -m
flowrl.commands ...`` (``torchrun``). ``<...>`` placeholders become one argument; a synopsis such as ``flowrl
train CONFIG.yaml [key=value ...] [--resume]`` is read with its optional parts in, ``CONFIG.yaml``
standing for a preset and ``key=value`` for nothing. An inline mention without arguments (``flowrl
eval`` in a sentence) only has to name an existing command.

What is checked: the subcommand is in ``flowrl.commands.COMMANDS``; its argparse parser (``build_parser()``
of the command's module; for ``flowrl train``, ``flowrl.commands.train.main`` up to the point where it loads
the config) accepts the arguments; ``flowrl train``'s config file exists and ``load_config(path,
overrides)`` accepts the overrides; ``flowrl data prepare NAME`` names a dataset by its canonical name
(aliases work on the command line, the docs use one name per dataset). Also: each preset's and verl
script's ``flowrl data prepare`` writes the file the preset trains on, and the ``make`` targets the
Markdown files name exist in the Makefile. No model is loaded.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

from flowrl import config as flowrl_config
from flowrl.commands import COMMANDS
from flowrl.config import load_config
from flowrl.data.converters import DATASETS, resolve_dataset_name

REPO = Path(__file__).parents[1]
MARKDOWN = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
EXAMPLES = sorted(p for p in (REPO / "examples").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
PRESETS = sorted((REPO / "configs").glob("*.yaml"))
VERL_SCRIPTS = sorted((REPO / "configs" / "verl").glob("*.sh"))
FILES = [
    *MARKDOWN,
    *PRESETS,
    *VERL_SCRIPTS,
    *EXAMPLES,
]

SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "zsh"}
SPAN = re.compile(r"(`+)(.+?)\1")
ANGLE_PLACEHOLDER = re.compile(r"<[^<>\n]*>")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
COMMENT_LABEL = re.compile(r"^(?:[A-Z][A-Za-z ]*:\s*)?")  # "Data: flowrl ..." in a comment
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}
# Synopsis words that stand for something else: CONFIG.yaml for a preset, key=value for nothing.
SYNOPSIS = {"CONFIG.yaml": "configs/paper_qwen2.5-7b_math.yaml", "key=value": None, "...": None}


@dataclass(frozen=True)
class Shown:
    """A command as shown in a file."""

    where: str  # file:line
    text: str
    args: tuple[str, ...]  # the words after `flowrl`
    mention: bool  # an inline code span with no arguments after the subcommand


# ---------------------------------------------------------------------------------------------
# Extraction


def _join_continuations(lines: list[tuple[int, str]], comment: bool) -> Iterator[tuple[int, str]]:
    """Join lines ending in a backslash with the next one (a comment's continuation drops its ``#``)."""
    start, parts = None, []
    for number, line in lines:
        text = line.strip()
        if comment and parts:
            text = text.lstrip("#").strip()
        if start is None:
            start = number
        if text.endswith("\\"):
            parts.append(text[:-1].rstrip())
            continue
        parts.append(text)
        yield start, " ".join(parts)
        start, parts = None, []
    if parts:
        yield start, " ".join(parts)  # type: ignore[misc]


def command_args(text: str) -> list[str] | None:
    """The words after ``flowrl`` when ``text`` is a flowrl command line, else None."""
    text = ANGLE_PLACEHOLDER.sub("PLACEHOLDER", text)
    if not re.search(r"(^|[\s/])flowrl(\s|$)|\s-m\s+flowrl\.commands(\s|$)", text):
        return None
    tokens = shlex.split(text, comments=True)
    first = 0
    while first < len(tokens) and ENV_ASSIGNMENT.match(tokens[first]):
        first += 1
    args = None
    for i, token in enumerate(tokens):
        if token == "-m" and tokens[i + 1 : i + 2] == ["flowrl.commands"]:
            args = tokens[i + 2 :]
            break
        if i == first and (token == "flowrl" or token.endswith("bin/flowrl")):
            args = tokens[i + 1 :]
            break
    if args is None:
        return None
    for i, token in enumerate(args):
        if token in SHELL_OPERATORS or token.startswith((">", "2>")):
            return args[:i]
    return args


def _is_mention(args: list[str]) -> bool:
    words = 2 if args[:1] == ["data"] else 1
    return len(args) <= words


def _from_text(path: Path, number: int, text: str, shell: bool) -> Iterator[Shown]:
    rel = path.relative_to(REPO)
    for match in SPAN.finditer(text):
        args = command_args(match.group(2).strip())
        if args:  # `flowrl` alone in a sentence names the package (or the loss), not a command
            yield Shown(f"{rel}:{number}", match.group(2).strip(), tuple(args), _is_mention(args))
    if shell:
        args = command_args(text)
        if args is not None:
            yield Shown(f"{rel}:{number}", text, tuple(args), False)


def _markdown(path: Path) -> Iterator[Shown]:
    language, block = None, []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip().startswith("```"):
            if language is None:
                language, block = line.strip()[3:].strip().lower(), []
                continue
            if language in SHELL_LANGUAGES:
                for start, text in _join_continuations(block, comment=False):
                    yield from _from_text(path, start, text, shell=True)
            else:
                for start, text in block:
                    yield from _from_text(path, start, text, shell=False)
            language = None
        elif language is not None:
            block.append((number, line))
        else:
            yield from _from_text(path, number, line, shell=False)


def _commented(path: Path) -> Iterator[Shown]:
    comments: list[tuple[int, str]] = []
    code: list[tuple[int, str]] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("#!"):
            continue
        if stripped.startswith("#") or path.suffix == ".py":
            comments.append((number, line))
        elif path.suffix == ".sh":
            code.append((number, line))
    for start, text in _join_continuations(comments, comment=True):
        text = COMMENT_LABEL.sub("", text.lstrip("#").strip(), count=1)
        yield from _from_text(path, start, text, shell=True)
    for start, text in _join_continuations(code, comment=False):
        yield from _from_text(path, start, text, shell=True)


def extract(path: Path) -> list[Shown]:
    """Every flowrl command shown in ``path``."""
    found = _markdown(path) if path.suffix == ".md" else _commented(path)
    unique: dict[tuple[str, tuple[str, ...]], Shown] = {}
    for shown in found:
        unique.setdefault((shown.where, shown.args), shown)
    return list(unique.values())


SHOWN = [shown for path in FILES for shown in extract(path)]


# ---------------------------------------------------------------------------------------------
# Checking


def _expand_synopsis(args: tuple[str, ...]) -> list[str]:
    out = []
    for arg in args:
        if arg.startswith("["):
            arg = arg[1:]
        if arg.endswith("]") and "=[" not in arg:
            arg = arg[:-1]
        arg = SYNOPSIS.get(arg, arg)
        if arg:
            out.append(arg)
    return out


def _parse(parser, args: list[str]) -> str | None:
    try:
        parser.parse_args(args)
    except SystemExit as exc:
        if exc.code:
            return f"`{parser.prog}` rejects {args} (exit {exc.code})"
    return None


def _check_train(args: list[str]) -> list[str]:
    """Parse with `flowrl train`'s own parser (its main, stopped at load_config), then load the config."""
    from flowrl.commands import train as train_cli

    class Parsed(Exception):
        pass

    seen: list[tuple[str, list[str]]] = []

    def stop(path, overrides=()):
        seen.append((str(path), list(overrides)))
        raise Parsed

    def refuse(*args, **kwargs):
        raise AssertionError("flowrl train got past load_config in a test that must not start a run")

    from flowrl import trainer

    # Stop at load_config; should train_cli ever get past it, nothing may start a run either.
    guards = [mock.patch.object(trainer, n, refuse, create=True) for n in ("train", "Trainer", "run")]
    with mock.patch.object(flowrl_config, "load_config", stop), guards[0], guards[1], guards[2]:
        try:
            train_cli.main(args)
        except Parsed:
            pass
        except SystemExit as exc:
            if exc.code:
                return [f"`flowrl train` rejects {args} (exit {exc.code})"]
            return []  # --help
    if not seen:
        return [f"`flowrl train {shlex.join(args)}` did not get as far as loading its config"]
    path, overrides = seen[0]
    if not (REPO / path).is_file():
        return [f"config file {path} does not exist"]
    try:
        load_config(REPO / path, overrides)
    except (ValueError, FileNotFoundError) as exc:
        return [f"load_config({path!r}, {overrides}) fails: {exc}"]
    return []


def _check_data(args: list[str]) -> list[str]:
    from flowrl.commands.data import build_parser

    problem = _parse(build_parser(), args)
    if problem:
        return [problem]
    if args[:1] == ["prepare"] and len(args) > 1 and not args[1].startswith("-"):
        name = args[1]
        if name.isupper():  # a placeholder (NAME)
            return []
        if name not in DATASETS:
            try:
                canonical = resolve_dataset_name(name)
            except ValueError as exc:
                return [str(exc)]
            return [f"dataset {name!r} is an alias of {canonical!r}: the docs use the canonical name"]
    return []


def check(shown: Shown) -> list[str]:
    """What is wrong with a shown command (empty when it exists and parses)."""
    args = _expand_synopsis(shown.args)
    if not args or args[0] in ("-h", "--help"):
        return []  # `flowrl` alone prints the list of commands
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        return [f"`flowrl {name}` is not a command; commands: {sorted(COMMANDS)}"]
    if shown.mention:
        if name == "data" and rest and rest[0] not in ("prepare", "list"):
            return [f"`flowrl data {rest[0]}` is not a command; use prepare or list"]
        return []
    if name == "train":
        return _check_train(rest)
    if name == "data":
        return _check_data(rest)
    import importlib

    module = importlib.import_module(COMMANDS[name][0])
    problem = _parse(module.build_parser(), rest)
    return [problem] if problem else []


@pytest.mark.parametrize("shown", SHOWN, ids=lambda s: f"{s.where}:{' '.join(s.args[:3])}")
def test_shown_command_exists_and_parses(shown: Shown) -> None:
    problems = check(shown)
    assert not problems, f"{shown.where}: `{shown.text}`: " + "; ".join(problems)


def test_commands_are_found_where_they_are_shown() -> None:
    """The extraction itself works: each file that shows commands yields them, continuations joined."""
    by_file: dict[str, list[Shown]] = {}
    for shown in SHOWN:
        by_file.setdefault(shown.where.split(":")[0], []).append(shown)
    for path in [*PRESETS, *VERL_SCRIPTS]:
        prepares = [
            s for s in by_file.get(str(path.relative_to(REPO)), []) if s.args[:2] == ("data", "prepare")
        ]
        assert prepares, f"{path.name}: no `flowrl data prepare` command found in its comments"
        assert all("--output" in s.args for s in prepares)  # the `\` continuation line was joined
    readme = {s.args[0] for s in by_file["README.md"] if s.args}
    assert {"toy", "demo", "train", "data", "eval", "export"} <= readme
    assert any(s.text.startswith(".venv/bin/torchrun") for s in by_file["README.md"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("flowrl data prepare dapo_math --input x.parquet", "alias of 'math_dapo'"),
        ("flowrl data prepare dapo_maths --input x.parquet", "unknown dataset 'dapo_maths'"),
        ("flowrl data prepare math_dapo", "rejects"),  # --input is required
        (".venv/bin/flowrl trian configs/x.yaml", "not a command"),
        ("flowrl eval --modle m --data d.parquet --output-dir o", "rejects"),
        ("flowrl train configs/demo.yaml optim.lr=1e-3", "configs/demo.yaml does not exist"),
        ("flowrl train configs/paper_qwen2.5-7b_math.yaml algorithm.loss.bta=1", "did you mean 'beta'"),
        ("torchrun --nproc_per_node 2 -m flowrl.commands train CONFIG.yaml --resme", "rejects"),
        ("flowrl toy --plot", "rejects"),
    ],
)
def test_the_check_catches_broken_commands(text: str, expected: str) -> None:
    args = command_args(text)
    assert args is not None
    problems = check(Shown("x:1", text, tuple(args), False))
    assert any(expected in p for p in problems), problems


def test_synopses_and_placeholders_are_read() -> None:
    args = command_args("flowrl train CONFIG.yaml [key=value ...] [--resume]")
    assert _expand_synopsis(tuple(args)) == ["train", "configs/paper_qwen2.5-7b_math.yaml", "--resume"]
    assert command_args("# not a command: pip install flowrl") is None
    assert command_args(".venv/bin/flowrl export runs/flowrl out") == ["export", "runs/flowrl", "out"]
    assert command_args("flowrl data prepare x --input <a file> && echo done") == [
        "data",
        "prepare",
        "x",
        "--input",
        "PLACEHOLDER",
    ]


# ---------------------------------------------------------------------------------------------
# The prepared file is the one the preset trains on


def _prepare_output(shown: Shown) -> str:
    args = list(shown.args)
    if "--output" in args:
        return args[args.index("--output") + 1]
    spec = DATASETS[resolve_dataset_name(args[2])]
    split = args[args.index("--split") + 1] if "--split" in args else spec.default_split
    return f"data/{spec.name}_{split}.parquet"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_trains_on_the_file_its_prepare_command_writes(preset: Path) -> None:
    cfg = load_config(preset, [])
    for shown in extract(preset):
        if shown.args[:2] == ("data", "prepare"):
            assert _prepare_output(shown) in cfg.data.train_files, shown.text


@pytest.mark.parametrize("script", VERL_SCRIPTS, ids=lambda p: p.name)
def test_verl_script_trains_on_the_file_its_prepare_command_writes(script: Path) -> None:
    text = script.read_text()
    for shown in extract(script):
        if shown.args[:2] == ("data", "prepare"):
            assert f'data.train_files="{_prepare_output(shown)}"' in text, shown.text


# ---------------------------------------------------------------------------------------------
# make targets


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, flags=re.M)}


def _shown_make_targets() -> list[tuple[str, str]]:
    """``make TARGET ...`` in code spans, and as lines of shell blocks, of the Markdown files."""
    found = []
    for path in MARKDOWN:
        language = None
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip().startswith("```"):
                language = line.strip()[3:].strip().lower() if language is None else None
                continue
            texts = [m.group(2) for m in SPAN.finditer(line)]
            if language in SHELL_LANGUAGES:
                texts.append(line)
            for text in texts:
                match = re.match(r"\s*make((?:\s+[A-Za-z0-9_.-]+)*)\s*(#|$)", text)
                if match:
                    found += [(f"{path.relative_to(REPO)}:{number}", word) for word in match.group(1).split()]
    return found


def test_make_targets_named_in_the_docs_exist() -> None:
    shown = _shown_make_targets()
    assert {"demo", "test"} <= {target for _, target in shown}  # the extraction finds the quick start
    targets = _make_targets()
    missing = [(where, target) for where, target in shown if target not in targets]
    assert not missing, f"make targets not in the Makefile: {missing}"


def test_train_help_lists_every_objectives_options_with_defaults(capsys) -> None:
    from flowrl.commands.train import build_parser
    from flowrl.objectives import OBJECTIVES

    text = build_parser().format_help()
    assert "algorithm.loss.beta=15.0" in text
    for name, objective in OBJECTIVES.items():
        if objective.needs_values:
            continue  # PPO needs a critic: not a choice of this trainer
        assert f"algorithm.name={name}:" in text
        for option in objective.loss_options.__dataclass_fields__:
            assert f"algorithm.loss.{option}=" in text, (name, option)
