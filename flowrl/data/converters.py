"""Converters from public datasets, in the layouts they are published with, to verl's schema.

Each converter takes one record of the published file (a dict of its columns) and returns a
:class:`Problem`: the problem text, the ground truth as a string, and the original fields worth
keeping. :mod:`flowrl.data.prepare` turns a :class:`Problem` into a row of verl's schema (see
:mod:`flowrl.data.schema`) with a prompt template from :mod:`flowrl.data.templates`. A record that
cannot be used raises :class:`SkipRow` with the reason; ``flowrl data prepare`` counts and reports it.
:data:`DATASETS` lists every dataset with the columns it expects (``flowrl data list`` prints them).

Math ground truths are the answer as a string (``"204"``, ``"\\frac{1}{2}"``); numbers published as
floats with an integer value are written without the ``.0`` (AMC 2023 publishes ``27.0``).

Code tests format
-----------------
For ``ability == "code"``, ``reward_model.ground_truth`` is a JSON string of one object in one of
three formats (the code reward, :mod:`flowrl.rewards.code`, consumes it; :func:`load_code_tests`
parses and checks it):

1. stdin/stdout::

       {"inputs": ["1 2\\n", ...], "outputs": ["3\\n", ...]}

   Run the program with ``inputs[i]`` on standard input; its standard output must match
   ``outputs[i]``. Both are strings (published lists of lines are joined with ``"\\n"`` here).

2. function call::

       {"fn_name": "add", "inputs": [[1, 2], ...], "outputs": [3, ...]}

   Call ``fn_name(*inputs[i])`` (each ``inputs[i]`` is the list of positional arguments) and compare
   the result with ``outputs[i]``. ``fn_name`` is a top-level function, or a method of a class
   ``Solution`` when the program defines one (LeetCode-style starter code, as in LiveCodeBench and
   some TACO/APPS rows). APPS, TACO and DeepCoder publish many expected values wrapped in a
   one-element list (``[3]`` for 3) and their own checkers accept either, so a result ``r`` should
   count as correct when ``r == outputs[i]`` or ``[r] == outputs[i]`` (tuples compared as lists).

3. test code::

       {"test_code": "def check(candidate):\\n    assert candidate(1, 2) == 3\\n", "entry_point": "add"}

   Execute the program, then ``test_code``; when ``test_code`` defines ``check``, call
   ``check(<the program's entry_point>)``. Any exception (a failed assert) fails the tests
   (HumanEval / HumanEval+ convention).

Sources of the layouts: the dataset cards on the Hugging Face hub named in each :class:`DatasetSpec`.
"""

from __future__ import annotations

import base64
import difflib
import io
import json
import math
import pickle
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------------------------------------
# What a converter returns


class SkipRow(Exception):
    """A record that cannot be converted; the message says why (it goes into the skip report)."""


@dataclass
class Problem:
    """One converted record, before a prompt template is applied.

    Attributes:
        text: the problem statement as published (what the ``raw`` template sends).
        ground_truth: the answer (math) or the JSON tests (code, see the module docstring).
        extra: original fields worth keeping; they go into ``extra_info``.
        test_format: code only: ``"stdin"``, ``"function"`` or ``"test_code"``.
        starter_code: code only: the published starter code, if any.
        fn_name: code only: the function the tests call (``"function"``/``"test_code"`` formats).
    """

    text: str
    ground_truth: str
    extra: dict[str, Any] = field(default_factory=dict)
    test_format: str | None = None
    starter_code: str = ""
    fn_name: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A public dataset that ``flowrl data prepare`` converts.

    Attributes:
        name: the CLI name, also written as ``data_source``.
        title: a human name.
        hub_id: where it is published (the layout documented in ``layout`` is this one's).
        ability: ``"math"`` or ``"code"``.
        purpose: ``"train"`` or ``"eval"``.
        columns: required columns; each entry lists accepted alternative names (one must be present).
        convert: record -> :class:`Problem`, raising :class:`SkipRow`.
        layout: the accepted layouts in words (shown by ``flowrl data list``).
        default_template: the prompt template used when ``--template`` is not given.
        default_split: the ``extra_info.split`` written when ``--split`` is not given.
        hub_split: the split loaded from the hub when the input is ``hub:...``.
        hub_config: the hub configuration(s) (subsets, comma-separated) loaded by default, if any.
        dedupe: drop repeated problems (same text up to whitespace) by default.
    """

    name: str
    title: str
    hub_id: str
    ability: str
    purpose: str
    columns: tuple[tuple[str, ...], ...]
    convert: Callable[[Mapping[str, Any]], Problem]
    layout: str
    default_template: str
    default_split: str
    hub_split: str
    hub_config: str | None = None
    dedupe: bool = False

    def missing_columns(self, found: Sequence[str]) -> list[str]:
        """The required columns (``"a|b"`` for alternatives) absent from ``found``."""
        present = set(found)
        return ["|".join(alts) for alts in self.columns if not present.intersection(alts)]

    def expected_columns(self) -> str:
        return ", ".join("|".join(alts) for alts in self.columns)


# ---------------------------------------------------------------------------------------------
# Small helpers shared by the converters

# Columns that identify a record in reports, in order of preference.
ID_COLUMNS = ("id", "ID", "unique_id", "task_id", "problem_id", "question_id", "uid", "name")


def row_identifier(record: Mapping[str, Any]) -> str:
    """A short string naming a record in reports: its id column, else the start of its problem text."""
    for key in ID_COLUMNS:
        value = record.get(key)
        if value is not None and str(value).strip():
            return f"{key}={value}"
    extra = record.get("extra_info")
    if isinstance(extra, Mapping) and extra.get("index") is not None:
        return f"extra_info.index={extra['index']}"
    for key in ("problem", "Problem", "question", "question_content", "prompt"):
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            snippet = " ".join(value.split())
            return f"{key}={snippet[:60]!r}"
    return "?"


def _first(record: Mapping[str, Any], *names: str) -> Any:
    """The value of the first of ``names`` present in ``record`` (None if none is)."""
    for name in names:
        if name in record and record[name] is not None:
            return record[name]
    return None


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SkipRow(f"empty {what}")
    return value.strip()


def answer_text(value: Any) -> str | None:
    """A published answer as a string, or None when there is none.

    Integral floats lose their ``.0``; a list of one answer is that answer; a list of several is
    joined with ``", "`` (OlympiadBench multi-answer problems); ``$...$`` around an answer is removed.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (list, tuple)):
        parts = [answer_text(v) for v in value]
        parts = [p for p in parts if p]
        return ", ".join(parts) if parts else None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    text = str(value).strip()
    if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    return text or None


def _answer(value: Any, what: str = "answer") -> str:
    text = answer_text(value)
    if text is None:
        raise SkipRow(f"missing {what}")
    return text


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces matched."""
    starts = [m.start() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        i = text.index("{", start) + 1
        depth, j = 1, i
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            return text[i : j - 1].strip()
    match = re.search(r"\\boxed ([^\s$]+)", text)  # "\boxed 5" (no braces) also occurs in MATH
    return match.group(1) if match else None


def _json_value(value: Any, what: str) -> Any:
    """Parse a JSON string column (already-parsed values pass through)."""
    if isinstance(value, (list, dict)):
        return value
    if not isinstance(value, str) or not value.strip():
        raise SkipRow(f"no {what}")
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise SkipRow(f"unparsable {what} ({exc.msg} at char {exc.pos})") from exc


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


# ---------------------------------------------------------------------------------------------
# Code tests


def _as_stdio(value: Any, what: str) -> str:
    """A stdin/stdout value as a string (APPS/TACO sometimes publish a list of lines)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    raise SkipRow(f"stdin/stdout test {what} is {type(value).__name__}, expected a string")


def stdin_tests(inputs: Sequence[Any], outputs: Sequence[Any]) -> str:
    """Format 1 of the module docstring, as a JSON string; raises SkipRow on malformed tests."""
    if len(inputs) != len(outputs):
        raise SkipRow(f"tests have {len(inputs)} inputs but {len(outputs)} outputs")
    if not inputs:
        raise SkipRow("no tests")
    return json.dumps(
        {
            "inputs": [_as_stdio(v, "input") for v in inputs],
            "outputs": [_as_stdio(v, "output") for v in outputs],
        }
    )


def function_tests(fn_name: Any, inputs: Sequence[Any], outputs: Sequence[Any]) -> str:
    """Format 2 of the module docstring, as a JSON string; raises SkipRow on malformed tests."""
    if not isinstance(fn_name, str) or not fn_name.strip():
        raise SkipRow("function-call tests without a function name")
    if len(inputs) != len(outputs):
        raise SkipRow(f"tests have {len(inputs)} inputs but {len(outputs)} outputs")
    if not inputs:
        raise SkipRow("no tests")
    args = [list(a) if isinstance(a, (list, tuple)) else [a] for a in inputs]
    return json.dumps({"fn_name": fn_name.strip(), "inputs": args, "outputs": list(outputs)})


def test_code_tests(test_code: Any, entry_point: Any) -> str:
    """Format 3 of the module docstring, as a JSON string; raises SkipRow on malformed tests."""
    if not isinstance(test_code, str) or not test_code.strip():
        raise SkipRow("empty test code")
    if not isinstance(entry_point, str) or not entry_point.strip():
        raise SkipRow("test code without an entry point")
    return json.dumps({"test_code": test_code, "entry_point": entry_point.strip()})


def load_code_tests(ground_truth: str) -> dict[str, Any]:
    """Parse a code ``ground_truth`` and check it is one of the three formats of the module docstring.

    Raises:
        ValueError: naming the format problem.
    """
    try:
        tests = json.loads(ground_truth)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"code ground_truth is not JSON ({exc}); re-create it with `flowrl data prepare`"
        ) from exc
    if not isinstance(tests, dict):
        raise ValueError(
            "code ground_truth must be a JSON object; see flowrl/data/converters.py for the formats"
        )
    if "test_code" in tests:
        if not isinstance(tests.get("entry_point"), str):
            raise ValueError("test-code tests need an 'entry_point' string")
        return tests
    if not isinstance(tests.get("inputs"), list) or not isinstance(tests.get("outputs"), list):
        raise ValueError(
            "code ground_truth needs 'inputs' and 'outputs' lists (or 'test_code' and 'entry_point'); "
            "see flowrl/data/converters.py for the formats"
        )
    if len(tests["inputs"]) != len(tests["outputs"]):
        raise ValueError(f"code tests have {len(tests['inputs'])} inputs but {len(tests['outputs'])} outputs")
    if "fn_name" not in tests and not all(isinstance(v, str) for v in tests["inputs"] + tests["outputs"]):
        raise ValueError("stdin/stdout tests must have string inputs and outputs")
    return tests


def limit_tests(ground_truth: str, max_tests: int) -> str:
    """Keep at most ``max_tests`` input/output tests, the ones with the longest inputs (original order).

    The paper runs at most 15 tests per problem, the longest inputs (docs/algorithm.md#code); test-code tests
    are returned unchanged.
    """
    if max_tests < 1:
        raise ValueError(f"max_tests must be >= 1 (got {max_tests})")
    tests = json.loads(ground_truth)
    if "inputs" not in tests or len(tests["inputs"]) <= max_tests:
        return ground_truth
    sizes = [len(json.dumps(x)) for x in tests["inputs"]]
    keep = sorted(sorted(range(len(sizes)), key=lambda i: -sizes[i])[:max_tests])
    tests["inputs"] = [tests["inputs"][i] for i in keep]
    tests["outputs"] = [tests["outputs"][i] for i in keep]
    return json.dumps(tests)


def _tests_from_inputs_outputs(tests: Any) -> tuple[str, str, str | None]:
    """APPS/TACO ``input_output`` -> (ground truth, test format, fn_name)."""
    if not isinstance(tests, dict) or "inputs" not in tests or "outputs" not in tests:
        raise SkipRow("tests are not an object with 'inputs' and 'outputs'")
    inputs, outputs = tests["inputs"], tests["outputs"]
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise SkipRow("tests 'inputs'/'outputs' are not lists")
    if tests.get("fn_name"):
        return function_tests(tests["fn_name"], inputs, outputs), "function", tests["fn_name"]
    return stdin_tests(inputs, outputs), "stdin", None


def _lcb_functional_args(text: str) -> list[Any]:
    """LiveCodeBench functional input: one JSON value per line, one line per argument."""
    try:
        return [json.loads(line) for line in text.split("\n") if line.strip()]
    except json.JSONDecodeError as exc:
        raise SkipRow(f"unparsable functional test input ({exc.msg})") from exc


def _lcb_functional_output(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SkipRow(f"unparsable functional test output ({exc.msg})") from exc


def _fn_name_from_starter(starter_code: str) -> str | None:
    match = re.search(r"^\s*def\s+([A-Za-z_]\w*)\s*\(", starter_code, re.MULTILINE)
    return match.group(1) if match else None


def _tests_from_case_list(
    cases: list[Any], metadata: Mapping[str, Any], starter_code: str
) -> tuple[str, str, str | None]:
    """A list of ``{"input", "output", "testtype"|"type", ...}`` cases (LiveCodeBench, DeepCoder)."""
    if not cases:
        raise SkipRow("no tests")
    if not all(isinstance(c, Mapping) and "input" in c and "output" in c for c in cases):
        raise SkipRow("tests are not a list of {'input', 'output'} objects")
    kinds = {str(c.get("testtype") or c.get("type") or "stdin") for c in cases}
    if len(kinds) > 1:
        raise SkipRow(f"mixed test types {sorted(kinds)}")
    kind = kinds.pop()
    if kind in ("stdin", "stdin_stdout"):
        return stdin_tests([c["input"] for c in cases], [c["output"] for c in cases]), "stdin", None
    if kind == "functional":  # LiveCodeBench: arguments as JSON lines, name in metadata
        fn_name = metadata.get("func_name") or _fn_name_from_starter(starter_code)
        inputs = [_lcb_functional_args(str(c["input"])) for c in cases]
        outputs = [_lcb_functional_output(str(c["output"])) for c in cases]
        return function_tests(fn_name, inputs, outputs), "function", fn_name
    if kind == "function_call":  # DeepCoder primeintellect: arguments already a list
        fn_name = cases[0].get("fn_name") or metadata.get("func_name")
        return (
            function_tests(fn_name, [c["input"] for c in cases], [c["output"] for c in cases]),
            "function",
            fn_name,
        )
    raise SkipRow(f"unknown test type {kind!r}")


class _StringOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain data only: any class or function reference is refused (no code can run)."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - refusing is the point
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def decode_lcb_tests(value: Any) -> list[Any]:
    """LiveCodeBench test cases: a JSON list, or (``private_test_cases`` of code_generation_lite)
    base64 of zlib of a pickled JSON string. Unpickling is restricted to plain data."""
    if isinstance(value, list):
        return value
    if not isinstance(value, str) or not value.strip():
        return []
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    try:
        raw = zlib.decompress(base64.b64decode(value.encode("utf-8")))
        decoded = _StringOnlyUnpickler(io.BytesIO(raw)).load()
        return json.loads(decoded) if isinstance(decoded, (str, bytes)) else decoded
    except Exception as exc:  # noqa: BLE001 - any decoding failure makes the row unusable, reported
        raise SkipRow(f"unparsable test cases ({type(exc).__name__}: {exc})") from exc


# ---------------------------------------------------------------------------------------------
# Math converters

DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the "
    "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


def convert_dapo(record: Mapping[str, Any]) -> Problem:
    """BytedTsinghua-SIA/DAPO-Math-17k (``data/dapo-math-17k.parquet``), already verl-like:
    ``prompt`` [{content, role}] wrapped in the DAPO template, ``reward_model`` {ground_truth, style},
    ``data_source``, ``ability``, ``extra_info`` {index: uuid}. The template is stripped to recover
    the problem text (so that another template can be applied)."""
    messages = record.get("prompt")
    if isinstance(messages, str):
        content = messages
    else:
        users = [m for m in (messages or []) if isinstance(m, Mapping) and m.get("role", "user") == "user"]
        content = users[-1].get("content") if users else None
    text = _text(content, "problem")
    if text.startswith(DAPO_PREFIX.strip()):
        text = text[len(DAPO_PREFIX.strip()) :]
    if text.endswith(DAPO_SUFFIX.strip()):
        text = text[: -len(DAPO_SUFFIX.strip())]
    text = _text(text, "problem")
    reward_model = record.get("reward_model")
    gt = reward_model.get("ground_truth") if isinstance(reward_model, Mapping) else None
    extra_info = record.get("extra_info") if isinstance(record.get("extra_info"), Mapping) else {}
    return Problem(
        text, _answer(gt, "ground_truth"), {"original_index": _str_or_none(extra_info.get("index"))}
    )


def convert_math(record: Mapping[str, Any]) -> Problem:
    """hendrycks MATH (EleutherAI/hendrycks_math, the original per-problem JSON files):
    ``problem``, ``solution`` (answer in the last ``\\boxed{}``), ``level``, ``type``."""
    text = _text(record.get("problem"), "problem")
    solution = record.get("solution")
    answer = last_boxed(solution) if isinstance(solution, str) else None
    if not answer:
        raise SkipRow("missing answer (no \\boxed{} in solution)")
    extra = {
        "level": _str_or_none(record.get("level")),
        "type": _str_or_none(record.get("type")),
        "solution": solution,
    }
    return Problem(text, answer, extra)


def convert_gsm8k(record: Mapping[str, Any]) -> Problem:
    """openai/gsm8k (``main/train.jsonl``): ``question``, ``answer`` = reasoning then ``#### 42``.
    Thousands separators are removed from the final number (``1,200`` -> ``1200``)."""
    text = _text(record.get("question"), "question")
    answer = record.get("answer")
    if not isinstance(answer, str) or "####" not in answer:
        raise SkipRow("missing answer (no '####' line)")
    final = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return Problem(text, _answer(final), {"solution": answer})


def convert_deepscaler(record: Mapping[str, Any]) -> Problem:
    """agentica-org/DeepScaleR-Preview-Dataset (``deepscaler.json``): ``problem``, ``answer``,
    ``solution``."""
    text = _text(record.get("problem"), "problem")
    return Problem(text, _answer(record.get("answer")), {"solution": _str_or_none(record.get("solution"))})


def convert_competition(record: Mapping[str, Any]) -> Problem:
    """AIME/AMC layouts: problem text in ``problem``/``Problem``/``question``, answer in ``answer``/``Answer``
    (HuggingFaceH4/aime_2024: id, problem, solution, answer, url, year; Maxwell-Jia/AIME_2024: ID,
    Problem, Solution, Answer; opencompass/AIME2025: question, answer; math-ai/aime25: problem, answer,
    id; math-ai/amc23: id, question, answer (float), url)."""
    text = _text(_first(record, "problem", "Problem", "question"), "problem")
    answer = _answer(_first(record, "answer", "Answer"))
    return Problem(
        text, answer, {"id": _str_or_none(_first(record, "id", "ID")), "url": _str_or_none(record.get("url"))}
    )


def convert_math500(record: Mapping[str, Any]) -> Problem:
    """HuggingFaceH4/MATH-500 (``test.jsonl``): problem, solution, answer, subject, level, unique_id."""
    text = _text(record.get("problem"), "problem")
    extra = {
        "unique_id": _str_or_none(record.get("unique_id")),
        "subject": _str_or_none(record.get("subject")),
        "level": _str_or_none(record.get("level")),
        "solution": _str_or_none(record.get("solution")),
    }
    return Problem(text, _answer(record.get("answer")), extra)


def convert_minerva(record: Mapping[str, Any]) -> Problem:
    """math-ai/minervamath (``test.jsonl``): ``question``, ``answer`` (``problem`` also accepted)."""
    text = _text(_first(record, "question", "problem"), "question")
    return Problem(text, _answer(record.get("answer")), {"id": _str_or_none(record.get("id"))})


def convert_olympiadbench(record: Mapping[str, Any]) -> Problem:
    """OlympiadBench (Hothan/OlympiadBench ``OE_TO_maths_en_COMP``, math-ai/olympiadbench): ``question``,
    ``final_answer`` (a list; several answers are joined with ", "; ``$`` delimiters removed),
    optional ``context`` (prepended), ``image_1``..``image_5``, ``unit``, ``id``, ``subfield``.
    Problems with an image are skipped: the benchmark used in the paper is the text-only subset."""
    images = [k for k in ("image_1", "image_2", "image_3", "image_4", "image_5") if record.get(k)]
    if images:
        raise SkipRow(f"multimodal problem ({images[0]} is set); only text-only problems are used")
    question = _text(record.get("question"), "question")
    context = record.get("context")
    text = f"{context.strip()}\n\n{question}" if isinstance(context, str) and context.strip() else question
    answer = _answer(_first(record, "final_answer", "answer"), "final_answer")
    extra = {
        "id": _str_or_none(record.get("id")),
        "unit": _str_or_none(record.get("unit")),
        "subfield": _str_or_none(record.get("subfield")),
        "answer_type": _str_or_none(record.get("answer_type")),
        "is_multiple_answer": bool(record.get("is_multiple_answer") or False),
    }
    return Problem(text, answer, extra)


# ---------------------------------------------------------------------------------------------
# Code converters


def convert_deepcoder(record: Mapping[str, Any]) -> Problem:
    """agentica-org/DeepCoder-Preview-Dataset (configs primeintellect, taco, lcbv5, codeforces):
    ``problem``, ``tests`` (a JSON string: a list of ``{"input", "output", "type": "stdin_stdout" |
    "function_call", "fn_name"}`` (primeintellect), ``{"input", "output", "testtype": "stdin" |
    "functional"}`` (lcbv5, name in ``metadata.func_name``), ``{"input", "output"}`` (codeforces), or
    ``{"inputs", "outputs", "fn_name"?}`` (taco)), optional ``metadata`` (JSON string) and
    ``starter_code``."""
    text = _text(record.get("problem"), "problem")
    tests = _json_value(record.get("tests"), "tests")
    metadata = _metadata(record)
    starter_code = record.get("starter_code") or metadata.get("starter_code") or ""
    if isinstance(tests, dict):
        gt, fmt, fn_name = _tests_from_inputs_outputs(tests)
    elif isinstance(tests, list):
        gt, fmt, fn_name = _tests_from_case_list(tests, metadata, starter_code)
    else:
        raise SkipRow(f"tests are a JSON {type(tests).__name__}, expected a list or an object")
    return Problem(text, gt, {}, fmt, starter_code, fn_name)


def _metadata(record: Mapping[str, Any]) -> Mapping[str, Any]:
    """A record's ``metadata``, given as a mapping or a JSON string; empty when absent or unparsable."""
    metadata = record.get("metadata")
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata) if metadata.strip() else {}
        except json.JSONDecodeError:
            metadata = {}
    return metadata if isinstance(metadata, Mapping) else {}


def _convert_apps_like(record: Mapping[str, Any], extra_keys: Sequence[str]) -> Problem:
    text = _text(record.get("question"), "question")
    tests = _json_value(record.get("input_output"), "tests (input_output)")
    gt, fmt, fn_name = _tests_from_inputs_outputs(tests)
    extra = {k: _str_or_none(record.get(k)) for k in extra_keys}
    return Problem(text, gt, extra, fmt, record.get("starter_code") or "", fn_name)


def convert_taco(record: Mapping[str, Any]) -> Problem:
    """BAAI/TACO: ``question``, ``input_output`` (JSON string ``{"inputs", "outputs", "fn_name"?}``),
    ``starter_code``, ``difficulty``, ``source``, ``name``, ``url`` (and solutions, tags, ...)."""
    return _convert_apps_like(record, ("name", "source", "difficulty", "url"))


def convert_apps(record: Mapping[str, Any]) -> Problem:
    """codeparrot/apps (``train.jsonl``, ``test.jsonl``): ``problem_id``, ``question``, ``input_output``
    (JSON string, empty for a few problems), ``starter_code``, ``difficulty``, ``url``, ``solutions``.
    The hub repository is script-based: download the JSON Lines files and pass them as ``--input``."""
    return _convert_apps_like(record, ("problem_id", "difficulty", "url"))


def convert_livecodebench(record: Mapping[str, Any]) -> Problem:
    """livecodebench/code_generation_lite (``test*.jsonl``): ``question_title``, ``question_content``,
    ``platform``, ``question_id``, ``contest_id``, ``contest_date``, ``starter_code``, ``difficulty``,
    ``public_test_cases`` (JSON list of {input, output, testtype}), ``private_test_cases`` (the same,
    compressed: base64(zlib(pickle(json)))), ``metadata`` (JSON string with ``func_name``). The hub
    repository is script-based, which recent ``datasets`` versions do not run: download its
    ``test*.jsonl`` files and pass them (or their directory) as ``--input``."""
    text = _text(record.get("question_content"), "question_content")
    cases = decode_lcb_tests(record.get("public_test_cases")) + decode_lcb_tests(
        record.get("private_test_cases")
    )
    metadata = _metadata(record)
    starter_code = record.get("starter_code") or ""
    gt, fmt, fn_name = _tests_from_case_list(cases, metadata, starter_code)
    keys = ("question_id", "question_title", "platform", "contest_id", "contest_date", "difficulty")
    extra = {k: _str_or_none(record.get(k)) for k in keys}
    return Problem(text, gt, extra, fmt, starter_code, fn_name)


def convert_humanevalplus(record: Mapping[str, Any]) -> Problem:
    """evalplus/humanevalplus: ``task_id``, ``prompt`` (signature + docstring), ``canonical_solution``,
    ``entry_point``, ``test`` (defines ``check(candidate)``)."""
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise SkipRow("empty prompt")
    gt = test_code_tests(record.get("test"), record.get("entry_point"))
    extra = {
        "task_id": _str_or_none(record.get("task_id")),
        "canonical_solution": _str_or_none(record.get("canonical_solution")),
    }
    entry_point = str(record["entry_point"]).strip()
    return Problem(prompt, gt, extra, "test_code", prompt, entry_point)


# ---------------------------------------------------------------------------------------------
# The registry

_COMPETITION_COLUMNS = (("problem", "Problem", "question"), ("answer", "Answer"))


def _spec(
    name: str,
    title: str,
    hub_id: str,
    ability: str,
    purpose: str,
    columns: tuple[tuple[str, ...], ...],
    convert: Callable[[Mapping[str, Any]], Problem],
    **kwargs: Any,
) -> DatasetSpec:
    is_train = purpose == "train"
    defaults: dict[str, Any] = {
        "layout": " ".join((convert.__doc__ or "").split()),
        "default_template": "code" if ability == "code" else ("dapo" if name == "math_dapo" else "boxed"),
        "default_split": "train" if is_train else "test",
        "hub_split": "train" if is_train else "test",
        "dedupe": is_train,
    }
    defaults.update(kwargs)
    return DatasetSpec(name, title, hub_id, ability, purpose, columns, convert, **defaults)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        _spec(
            "math_dapo",
            "DAPO-Math-17k",
            "BytedTsinghua-SIA/DAPO-Math-17k",
            "math",
            "train",
            (("prompt",), ("reward_model",)),
            convert_dapo,
        ),
        _spec(
            "math",
            "MATH (Hendrycks et al.)",
            "EleutherAI/hendrycks_math",
            "math",
            "train",
            (("problem",), ("solution",)),
            convert_math,
            hub_config="algebra,counting_and_probability,geometry,intermediate_algebra,number_theory,prealgebra,"
            "precalculus",
        ),
        _spec(
            "gsm8k",
            "GSM8K",
            "openai/gsm8k",
            "math",
            "train",
            (("question",), ("answer",)),
            convert_gsm8k,
            hub_config="main",
        ),
        _spec(
            "deepscaler",
            "DeepScaleR-Preview",
            "agentica-org/DeepScaleR-Preview-Dataset",
            "math",
            "train",
            (("problem",), ("answer",)),
            convert_deepscaler,
        ),
        _spec(
            "aime24",
            "AIME 2024",
            "HuggingFaceH4/aime_2024",
            "math",
            "eval",
            _COMPETITION_COLUMNS,
            convert_competition,
            hub_split="train",
        ),
        _spec(
            "aime25", "AIME 2025", "math-ai/aime25", "math", "eval", _COMPETITION_COLUMNS, convert_competition
        ),
        _spec(
            "amc23", "AMC 2023", "math-ai/amc23", "math", "eval", _COMPETITION_COLUMNS, convert_competition
        ),
        _spec(
            "math500",
            "MATH-500",
            "HuggingFaceH4/MATH-500",
            "math",
            "eval",
            (("problem",), ("answer",), ("unique_id",)),
            convert_math500,
        ),
        _spec(
            "minerva",
            "Minerva Math",
            "math-ai/minervamath",
            "math",
            "eval",
            (("question", "problem"), ("answer",)),
            convert_minerva,
        ),
        _spec(
            "olympiadbench",
            "OlympiadBench (text-only math, English)",
            "math-ai/olympiadbench",
            "math",
            "eval",
            (("question",), ("final_answer", "answer")),
            convert_olympiadbench,
        ),
        _spec(
            "deepcoder",
            "DeepCoder-Preview",
            "agentica-org/DeepCoder-Preview-Dataset",
            "code",
            "train",
            (("problem",), ("tests",)),
            convert_deepcoder,
            hub_config="primeintellect,taco,lcbv5",
        ),
        _spec("taco", "TACO", "BAAI/TACO", "code", "train", (("question",), ("input_output",)), convert_taco),
        _spec(
            "apps",
            "APPS",
            "codeparrot/apps",
            "code",
            "train",
            (("question",), ("input_output",)),
            convert_apps,
        ),
        _spec(
            "livecodebench",
            "LiveCodeBench (code_generation_lite)",
            "livecodebench/code_generation_lite",
            "code",
            "eval",
            (("question_content",), ("public_test_cases",), ("private_test_cases",)),
            convert_livecodebench,
        ),
        _spec(
            "humanevalplus",
            "HumanEval+",
            "evalplus/humanevalplus",
            "code",
            "eval",
            (("task_id",), ("prompt",), ("test",), ("entry_point",)),
            convert_humanevalplus,
        ),
    ]
}

# Other names people use for the same datasets: the hub names, the benchmark's year spelled out, verl's
# and other projects' spellings. ``flowrl data prepare`` resolves them (case, ``-`` and ``_`` do not
# matter, and a dataset's hub id works too) to the canonical name, the key of :data:`DATASETS`, which is
# what the docs use and what is written as ``data_source``.
DATASET_ALIASES: dict[str, tuple[str, ...]] = {
    "math_dapo": ("dapo_math", "dapo", "dapo-math-17k"),
    "math": ("hendrycks_math", "competition_math"),
    "gsm8k": (),
    "deepscaler": ("deepscaler-preview",),
    "aime24": ("aime2024", "aime_2024"),
    "aime25": ("aime2025", "aime_2025"),
    "amc23": ("amc2023", "amc_2023"),
    "math500": ("math-500",),
    "minerva": ("minerva_math", "minervamath"),
    "olympiadbench": ("olympiad_bench",),
    "deepcoder": ("deepcoder-preview",),
    "taco": (),
    "apps": (),
    "livecodebench": ("lcb", "code_generation_lite"),
    "humanevalplus": ("humaneval_plus", "humaneval+"),
}


def _normalize_name(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def _name_lookup() -> dict[str, str]:
    if set(DATASET_ALIASES) != set(DATASETS):
        raise AssertionError("DATASET_ALIASES must have one entry per dataset of DATASETS")
    lookup: dict[str, str] = {}
    for canonical, spec in DATASETS.items():
        for name in (canonical, spec.hub_id, *DATASET_ALIASES[canonical]):
            key = _normalize_name(name)
            if lookup.setdefault(key, canonical) != canonical:
                raise AssertionError(f"dataset name {name!r} means both {lookup[key]} and {canonical}")
    return lookup


_NAME_LOOKUP = _name_lookup()


def resolve_dataset_name(name: str) -> str:
    """The canonical dataset name (a key of :data:`DATASETS`) for a name or one of its aliases.

    Raises:
        ValueError: an unknown name; the message lists every name with its aliases and the closest one.
    """
    canonical = _NAME_LOOKUP.get(_normalize_name(name))
    if canonical is not None:
        return canonical
    close = difflib.get_close_matches(_normalize_name(name), list(_NAME_LOOKUP), n=1, cutoff=0.6)
    hint = f" (did you mean {_NAME_LOOKUP[close[0]]!r}?)" if close else ""
    raise ValueError(
        f"unknown dataset {name!r}{hint}. Known datasets (aliases in parentheses; a dataset's hub id works "
        f"too): {dataset_names_text()} (see `flowrl data list`)"
    )


def dataset_names_text(sep: str = ", ") -> str:
    """Every canonical dataset name with its aliases: ``math_dapo (dapo_math, dapo, dapo-math-17k), ...``."""
    return sep.join(
        name + (f" ({', '.join(DATASET_ALIASES[name])})" if DATASET_ALIASES[name] else "")
        for name in DATASETS
    )
