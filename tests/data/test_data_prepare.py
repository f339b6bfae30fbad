"""`flowrl data prepare` on fixture files in each dataset's published layout (tests/data/fixtures/).

Expected values are read off the fixture files (see build_fixtures.py), never off the converter.
"""

from __future__ import annotations

import base64
import json
import pickle
import sys
import types
import zlib
from pathlib import Path

import pytest

from flowrl.commands.data import main
from flowrl.data import prepare
from flowrl.data.converters import (
    DAPO_PREFIX,
    DAPO_SUFFIX,
    DATASET_ALIASES,
    DATASETS,
    load_code_tests,
    resolve_dataset_name,
)
from flowrl.data.prepare import convert_records, prepare_dataset
from flowrl.data.schema import read_rows
from flowrl.rewards.math import math_reward
from flowrl.rewards.registry import get_reward_fn

FIXTURES = Path(__file__).parent / "fixtures"


def run(tmp_path: Path, name: str, fixture: str, suffix: str = ".parquet", **kwargs):
    """Prepare a fixture; return (rows read back through the schema reader, result, report lines)."""
    output = tmp_path / f"{name}{suffix}"
    result, out, report = prepare_dataset(name, FIXTURES / fixture, output=output, **kwargs)
    assert out == output
    rows = read_rows(out)
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    return rows, result, lines


def gts(rows):
    return [r["reward_model"]["ground_truth"] for r in rows]


def skipped(lines):
    return [line for line in lines if line["kind"] == "skipped"]


# ---------------------------------------------------------------------------------------------
# Math


def test_dapo_dedup_conflicts_and_skips(tmp_path):
    # fixture: 3 problems x 4 copies (rows 0-11), row 12 = problem of row 0 with answer "3", row 13 no answer
    rows, result, lines = run(tmp_path, "math_dapo", "dapo_math_17k.parquet")
    assert gts(rows) == ["2", "12", "5"]
    assert result.num_read == 14
    assert result.num_duplicates == 10  # 9 exact copies + the conflicting one
    summary = lines[-1]
    assert summary == {
        "kind": "summary",
        "read": 14,
        "written": 3,
        "skipped": 1,
        "skipped_by_reason": {"missing ground_truth": 1},
        "duplicates_removed": 10,
        "conflicting_duplicates": 1,
    }
    [conflict] = [line for line in lines if line["kind"] == "conflicting_duplicate"]
    assert (
        conflict["row"],
        conflict["kept_row"],
        conflict["ground_truth"],
        conflict["kept_ground_truth"],
    ) == (12, 0, "3", "2")
    [skip] = skipped(lines)
    assert skip["row"] == 13 and "uuid-bad" in skip["id"] and skip["reason"] == "missing ground_truth"
    # the dapo template rebuilds the published prompt exactly; verl's columns are all there
    assert rows[0]["prompt"] == [{"role": "user", "content": DAPO_PREFIX + "What is $1+1$?" + DAPO_SUFFIX}]
    assert rows[0]["data_source"] == "math_dapo" and rows[0]["ability"] == "math"
    assert rows[0]["reward_model"]["style"] == "rule"
    info = rows[2]["extra_info"]
    assert (info["index"], info["split"], info["original_index"], info["problem"]) == (
        2,
        "train",
        "uuid-0-2",
        "Find $x$ if $2x = 10$.",
    )


def test_dapo_without_dedupe_and_other_template(tmp_path):
    rows, result, _ = run(tmp_path, "math_dapo", "dapo_math_17k.parquet", dedupe=False, template="boxed")
    assert len(rows) == 13 and result.num_duplicates == 0
    content = rows[0]["prompt"][0]["content"]
    assert content.startswith("What is $1+1$?") and "\\boxed{}" in content and "Answer:" not in content


def test_limit_stops_after_n_rows(tmp_path):
    rows, result, _ = run(tmp_path, "math_dapo", "dapo_math_17k.parquet", limit=2)
    assert gts(rows) == ["2", "12"]
    assert result.num_read == 2


def test_math_directory_of_json_files(tmp_path):
    rows, _, lines = run(tmp_path, "math", "hendrycks_math", suffix=".jsonl")
    # 1.json: \boxed{2}; 2.json: the LAST boxed is \frac{1}{2}
    assert gts(rows) == ["2", "\\frac{1}{2}"]
    assert rows[1]["extra_info"]["level"] == "Level 2" and rows[1]["extra_info"]["type"] == "Algebra"
    [skip] = skipped(lines)
    assert skip["file"].endswith("3.json") and "boxed" in skip["reason"]


def test_gsm8k_final_answer_line(tmp_path):
    rows, _, lines = run(tmp_path, "gsm8k", "gsm8k_train.jsonl")
    assert gts(rows) == ["7", "2000"]  # "#### 2,000" loses its thousands separator
    assert "####" in rows[0]["extra_info"]["solution"]
    assert skipped(lines)[0]["row"] == 2 and "####" in skipped(lines)[0]["reason"]


def test_deepscaler_bad_rows_reported(tmp_path):
    rows, result, lines = run(tmp_path, "deepscaler", "deepscaler.json")
    assert gts(rows) == ["1024", "4"]
    assert [(s["row"], s["reason"]) for s in skipped(lines)] == [(2, "empty problem"), (3, "missing answer")]
    assert "Missing answer." in skipped(lines)[1]["id"]  # identified by the problem text (no id column)
    assert lines[-1]["skipped_by_reason"] == {"empty problem": 1, "missing answer": 1}


@pytest.mark.parametrize(
    ("fixture", "expected", "ids"),
    [
        ("aime_2024_h4.parquet", ["204", "025"], ["60", "61"]),
        ("aime_2024_maxwell.json", ["204", "25"], ["2024-I-1", "2024-I-2"]),
    ],
)
def test_aime24_layouts(tmp_path, fixture, expected, ids):
    rows, _, _ = run(tmp_path, "aime24", fixture)
    assert gts(rows) == expected
    assert [r["extra_info"]["id"] for r in rows] == ids
    assert rows[0]["extra_info"]["split"] == "test"
    assert rows[0]["prompt"][0]["content"].endswith("put your final answer within \\boxed{}.")


def test_aime25_and_minerva_question_layout(tmp_path):
    rows, _, _ = run(tmp_path, "aime25", "aime2025-I.jsonl")
    assert gts(rows) == ["70", "588"] and rows[0]["extra_info"]["problem"] == "AIME 2025 problem one."
    rows, _, _ = run(tmp_path, "minerva", "minervamath_test.jsonl")
    assert gts(rows) == ["11.2", "0.5"]


def test_amc23_float_answers(tmp_path):
    rows, _, lines = run(tmp_path, "amc23", "amc23_test.parquet")
    assert gts(rows) == ["27", "0.5"]  # published as 27.0 and 0.5
    assert skipped(lines)[0]["id"] == "id=2"


def test_math500_fields(tmp_path):
    rows, _, _ = run(tmp_path, "math500", "math500_test.jsonl", template="raw")
    assert gts(rows) == ["\\left( 3, \\frac{\\pi}{2} \\right)", "3"]
    assert rows[0]["extra_info"]["unique_id"] == "test/precalculus/807.json"
    assert rows[1]["prompt"][0]["content"] == "What is $1+2$?"  # raw: the problem as published


def test_olympiadbench_multi_answer_context_and_images(tmp_path):
    rows, _, lines = run(tmp_path, "olympiadbench", "olympiadbench.parquet")
    assert gts(rows) == ["6", "1, -1", "6"]  # $...$ removed, several answers joined
    assert rows[1]["extra_info"]["is_multiple_answer"] is True
    assert rows[2]["extra_info"]["problem"] == "Let $y = 2x$ and $x = 3$.\n\nPart (b): find $y$."
    [skip] = skipped(lines)
    assert skip["id"] == "id=1608" and "image_1" in skip["reason"]


# ---------------------------------------------------------------------------------------------
# Code


def test_deepcoder_test_formats(tmp_path):
    rows, _, lines = run(tmp_path, "deepcoder", "deepcoder_primeintellect.parquet")
    tests = [load_code_tests(g) for g in gts(rows)]
    assert tests[0] == {"inputs": ["1 2\n", "5 5\n"], "outputs": ["3\n", "10\n"]}
    assert tests[1] == {"fn_name": "add", "inputs": [[1, 2], [0, 0]], "outputs": [[3], [0]]}
    # LiveCodeBench-style functional tests: one JSON argument per line, name from metadata
    assert tests[2] == {"fn_name": "maxOf", "inputs": [[[1, 5, 2]], [[7]]], "outputs": [5, 7]}
    assert tests[3] == {"inputs": ["2\n", "3\n"], "outputs": ["4\n", "6\n"]}
    assert [r["extra_info"]["test_format"] for r in rows] == ["stdin", "function", "function", "stdin"]
    assert "standard input" in rows[0]["prompt"][0]["content"]
    assert "`add`" in rows[1]["prompt"][0]["content"] and "```python" in rows[1]["prompt"][0]["content"]
    [skip] = skipped(lines)
    assert skip["row"] == 4 and skip["reason"].startswith("unparsable tests")


def test_taco_lines_joined_and_starter_code(tmp_path):
    rows, _, lines = run(tmp_path, "taco", "taco_train.jsonl")
    first, second = (load_code_tests(g) for g in gts(rows))
    assert first == {"inputs": ["1 2\n3", "4\n"], "outputs": ["3\n3", "4\n"]}  # lists of lines joined
    assert second == {"fn_name": "square", "inputs": [[2], [3]], "outputs": [[4], [9]]}
    assert "def square(x):" in rows[1]["prompt"][0]["content"]
    assert rows[1]["extra_info"]["starter_code"].startswith("def square")
    assert skipped(lines)[0]["id"] == "name=bad" and "2 inputs but 1 outputs" in skipped(lines)[0]["reason"]


def test_apps_missing_tests(tmp_path):
    rows, _, lines = run(tmp_path, "apps", "apps_test.json")
    assert load_code_tests(gts(rows)[0]) == {"inputs": ["\n"], "outputs": ["hello\n"]}
    assert skipped(lines)[0]["id"] == "problem_id=4001" and "no tests" in skipped(lines)[0]["reason"]


def test_livecodebench_private_tests_decoded(tmp_path):
    rows, _, _ = run(tmp_path, "livecodebench", "livecodebench_test.jsonl")
    stdin, functional = (load_code_tests(g) for g in gts(rows))
    # public (1 2 -> 3) then the compressed private case (10 20 -> 30)
    assert stdin == {"inputs": ["1 2\n", "10 20\n"], "outputs": ["3\n", "30\n"]}
    assert functional == {
        "fn_name": "twoSum",
        "inputs": [[[2, 7, 11, 15], 9], [[3, 3], 6]],
        "outputs": [[0, 1], [0, 1]],
    }
    assert "class Solution" in rows[1]["prompt"][0]["content"]
    assert rows[0]["extra_info"]["question_id"] == "abc001_a"


def test_livecodebench_refuses_pickled_code(tmp_path):
    # a pickle that would call a function when loaded is refused, and the row is reported
    evil = base64.b64encode(zlib.compress(pickle.dumps(print))).decode()
    record = {
        "question_content": "q",
        "public_test_cases": "[]",
        "private_test_cases": evil,
        "metadata": "{}",
    }
    result = convert_records("livecodebench", [("mem", record)])
    assert result.rows == [] and "refusing" in result.skipped[0]["reason"]


def test_humanevalplus_test_code(tmp_path):
    rows, _, lines = run(tmp_path, "humanevalplus", "humanevalplus.jsonl")
    [row] = rows
    assert load_code_tests(row["reward_model"]["ground_truth"]) == {
        "test_code": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
        "entry_point": "add",
    }
    assert "def add(a: int, b: int) -> int:" in row["prompt"][0]["content"]
    assert row["extra_info"]["task_id"] == "HumanEval/0"
    assert skipped(lines)[0]["id"] == "task_id=HumanEval/1"


def test_max_tests_keeps_longest_inputs(tmp_path):
    rows, _, _ = run(tmp_path, "deepcoder", "deepcoder_primeintellect.parquet", max_tests=1)
    # row 1 add(): inputs [1, 2] and [0, 0] have the same JSON length -> the first is kept
    assert load_code_tests(gts(rows)[1])["inputs"] == [[1, 2]]
    # row 2: "[1, 5, 2]" is longer than "[7]"
    assert load_code_tests(gts(rows)[2]) == {"fn_name": "maxOf", "inputs": [[[1, 5, 2]]], "outputs": [5]}


# ---------------------------------------------------------------------------------------------
# Errors and the command line


def test_wrong_layout_names_expected_and_found_columns(tmp_path):
    with pytest.raises(ValueError) as info:
        prepare_dataset("math500", FIXTURES / "gsm8k_train.jsonl", output=tmp_path / "x.parquet")
    message = str(info.value)
    assert "MATH-500" in message and "['problem', 'unique_id']" in message
    assert "found: ['answer', 'question']" in message
    assert not (tmp_path / "x.parquet").exists()


def test_template_must_fit_the_ability():
    with pytest.raises(ValueError, match="--template with one of \\['code', 'raw'\\]"):
        convert_records("apps", [], template="boxed")
    with pytest.raises(ValueError, match="unknown dataset 'aime2026'"):
        convert_records("aime2026", [])


# ---------------------------------------------------------------------------------------------
# Names: one canonical name per dataset, common aliases resolved to it


def test_aliases_resolve_to_the_canonical_name():
    for spelling in (
        "math_dapo",
        "dapo_math",
        "DAPO",
        "dapo-math-17k",
        "DAPO_Math_17k",
        "BytedTsinghua-SIA/DAPO-Math-17k",
    ):
        assert resolve_dataset_name(spelling) == "math_dapo"
    assert resolve_dataset_name("aime2024") == resolve_dataset_name("AIME_2024") == "aime24"
    assert (
        resolve_dataset_name("MATH-500") == "math500"
        and resolve_dataset_name("HumanEval+") == "humanevalplus"
    )
    assert resolve_dataset_name("lcb") == "livecodebench"
    for name in DATASETS:  # every canonical name resolves to itself, every alias to its dataset
        assert resolve_dataset_name(name) == name
        assert all(resolve_dataset_name(alias) == name for alias in DATASET_ALIASES[name])


def test_an_alias_writes_the_canonical_data_source_which_the_math_reward_scores(tmp_path, monkeypatch):
    rows, _, _ = run(tmp_path, "dapo_math", "dapo_math_17k.parquet")
    assert {r["data_source"] for r in rows} == {"math_dapo"}
    assert get_reward_fn("math_dapo") is math_reward
    # the default output file is named after the canonical name too
    monkeypatch.chdir(tmp_path)
    _, out, _ = prepare_dataset("dapo-math-17k", FIXTURES / "dapo_math_17k.parquet")
    assert out == Path("data/math_dapo_train.parquet") and out.exists()


def test_unknown_name_lists_names_and_aliases(capsys):
    with pytest.raises(ValueError) as info:
        resolve_dataset_name("dapo_maths")
    message = str(info.value)
    assert "did you mean 'math_dapo'?" in message
    assert "math_dapo (dapo_math, dapo, dapo-math-17k)" in message and "humanevalplus" in message
    assert main(["prepare", "nope", "--input", "x.parquet"]) == 1
    err = capsys.readouterr().err
    assert "unknown dataset 'nope'" in err and "aime24 (aime2024, aime_2024)" in err


def test_prepare_help_lists_names_and_aliases(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    out = capsys.readouterr().out
    for name in DATASETS:
        line = next(line for line in out.splitlines() if line.strip().split(" ")[0] == name)
        assert all(alias in line for alias in DATASET_ALIASES[name])


def test_all_rows_bad_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": ""}) + "\n")
    with pytest.raises(ValueError, match="no usable rows"):
        prepare_dataset("minerva", path, output=tmp_path / "out.parquet")
    assert (tmp_path / "out.report.jsonl").exists()  # the reasons are still written


def test_cli_prepare_and_list(tmp_path, capsys):
    output = tmp_path / "amc.parquet"
    assert (
        main(["prepare", "amc23", "--input", str(FIXTURES / "amc23_test.parquet"), "--output", str(output)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "read 3 rows, wrote 2" in printed and "skipped 1: missing answer" in printed
    assert gts(read_rows(output)) == ["27", "0.5"]
    assert (tmp_path / "amc.report.jsonl").exists()  # default report path next to the output

    assert (
        main(
            [
                "prepare",
                "math500",
                "--input",
                str(FIXTURES / "gsm8k_train.jsonl"),
                "--output",
                str(tmp_path / "y.parquet"),
            ]
        )
        == 1
    )
    assert "expected columns" in capsys.readouterr().err.lower()

    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in DATASETS)
    assert "question_content" in listing  # columns are shown


def test_hub_input_uses_datasets_library(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"question": f"{config} question", "answer": "1"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    result, out, _ = prepare.prepare_dataset(
        "minerva", "hub:math-ai/minervamath", output=tmp_path / "m.jsonl", config="a,b"
    )
    assert calls == [("math-ai/minervamath", "a", "test"), ("math-ai/minervamath", "b", "test")]
    assert [r["extra_info"]["problem"] for r in read_rows(out)] == ["a question", "b question"]


@pytest.mark.parametrize(
    ("name", "fixture"),
    [
        ("math_dapo", "dapo_math_17k.parquet"),
        ("math", "hendrycks_math"),
        ("gsm8k", "gsm8k_train.jsonl"),
        ("deepscaler", "deepscaler.json"),
        ("aime24", "aime_2024_h4.parquet"),
        ("aime25", "aime2025-I.jsonl"),
        ("amc23", "amc23_test.parquet"),
        ("math500", "math500_test.jsonl"),
        ("minerva", "minervamath_test.jsonl"),
        ("olympiadbench", "olympiadbench.parquet"),
        ("deepcoder", "deepcoder_primeintellect.parquet"),
        ("taco", "taco_train.jsonl"),
        ("apps", "apps_test.json"),
        ("livecodebench", "livecodebench_test.jsonl"),
        ("humanevalplus", "humanevalplus.jsonl"),
    ],
)
def test_every_dataset_round_trips_through_parquet_and_jsonl(tmp_path, name, fixture):
    parquet_rows, _, _ = run(tmp_path, name, fixture, suffix=".parquet")
    jsonl_rows, _, _ = run(tmp_path, name, fixture, suffix=".jsonl")
    assert parquet_rows == jsonl_rows
    assert {r["data_source"] for r in parquet_rows} == {name}
    assert [r["extra_info"]["index"] for r in parquet_rows] == list(range(len(parquet_rows)))
    for row in parquet_rows:
        assert row["ability"] == DATASETS[name].ability
        assert isinstance(row["reward_model"]["ground_truth"], str) and row["reward_model"]["ground_truth"]
        if row["ability"] == "code":
            load_code_tests(row["reward_model"]["ground_truth"])
