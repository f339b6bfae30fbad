"""Code rewards: run model-written Python against tests, isolated by bubblewrap.

The reward (docs/algorithm.md#code): take the last fenced code block of the response, run at most
``max_tests`` tests (15, the longest inputs first), reward 1 only if all pass, else 0.

**What the sandbox protects against** (each claim has one adversarial test in
``tests/rewards/test_code_sandbox.py``):

* *Writing outside its directory.* The program sees a private root: ``/usr`` (and ``/bin``, ``/lib*``,
  and the interpreter's own prefix when it lives elsewhere) mounted read-only, a fresh ``/proc`` and
  minimal ``/dev``, and a private tmpfs of ``tmpfs_mb`` at ``/tmp`` (its working directory) and
  ``/dev/shm``, the only writable places; the sandbox's root and ``/dev`` are read-only. Nothing else
  of the host's file system exists inside: no home directory, no project checkout, no ``/etc``.
* *Network access.* Its own network namespace: only a loopback interface, unconnected to the host's.
* *Reading the parent's environment.* The environment is cleared (``PATH``, ``HOME``, ``LANG``,
  ``TMPDIR`` only); its own pid namespace hides the host's ``/proc/<pid>/environ``.
* *Fork bombs.* ``RLIMIT_NPROC`` (``max_processes``), counted inside a fresh user namespace. When the
  host runs as root, the sandbox runs as uid 65534, because the kernel never enforces ``RLIMIT_NPROC``
  for uid 0 (and a root sandbox is a needless risk).
* *Memory bombs.* ``RLIMIT_AS`` (``memory_mb``) per process: allocation fails with ``MemoryError``,
  reported as status ``memory``.
* *Infinite loops.* A per-test wall clock enforced by the runner (it kills the test's process group),
  ``RLIMIT_CPU`` as a backstop, and a wall clock per test on the host that kills the whole sandbox.
* *Output floods.* stdout + stderr are capped per test (``max_output_bytes``, raised to twice the
  expected output when that is larger); files are capped by ``RLIMIT_FSIZE`` and the tmpfs size.
* *Killing its parent, and escaping the process tree.* Its own pid namespace: the host's processes are
  invisible and the namespace's init ignores signals from inside. Killing the outer ``bwrap`` (timeout)
  tears down the namespace and every process in it (``--die-with-parent``); after each test the runner
  kills everything the test left behind.
* *Privileges.* No capabilities (``bwrap`` drops them) and not root, so no ``setuid``, mounts or
  ``chroot``; ``--new-session`` (no terminal injection); isolated IPC, UTS and cgroup namespaces.

**What it does not protect against.**

* Kernel exploits: there is no seccomp filter, so the whole system-call surface is reachable. Use a
  VM or gVisor for adversarial models.
* Total memory: ``memory_mb`` is per process, so the sandbox can use up to ``memory_mb x
  max_processes`` plus its tmpfs. There is no cgroup limit, and no CPU-share or disk-I/O limit (the
  runner only lowers its priority with ``nice``).
* Timing noise: under CPU oversubscription a correct but slow program can time out.
* Older systems: the tmpfs size needs a bwrap with ``--size`` (checked; otherwise the tmpfs is
  unbounded), and counting ``RLIMIT_NPROC`` per user namespace needs Linux >= 5.14 (before, all
  processes of the sandbox's uid on the host count together).
* Reward hacking through the runner: function-call and assert tests run in the same process as the
  candidate, which could in principle find the per-run nonce in memory and forge a pass.
  ``sys.exit(0)``/``os._exit(0)`` before the asserts do *not* pass, and expected outputs of
  stdin/stdout and function-call tests never enter the sandbox (they are compared on the host).
* Languages other than Python (the code block is run as Python).
* Without bubblewrap (``SandboxConfig(allow_rlimits_only=True)``, an explicit opt-in that logs a
  warning) only the rlimits, the scrubbed environment, the wall clock and the uid change (as root)
  remain: the program can read and write whatever its user can, use the network, and, when the host
  is not root, signal the trainer's processes. Descendants that leave their process group may
  outlive the run. Do not train on untrusted models this way.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import logging
import math
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowrl.rewards.base import RewardResult, RewardStatus

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
"""Per-test time limit (the paper's "a few seconds", docs/algorithm.md#code)."""
DEFAULT_MEMORY_MB = 1024
DEFAULT_MAX_TESTS = 15
"""At most this many tests per problem, the longest inputs first (docs/algorithm.md#code)."""
STARTUP_TIMEOUT_S = 15.0
"""The sandbox must be up this soon (bwrap + interpreter start, generous for loaded machines)."""
PER_TEST_GRACE_S = 2.0
"""Host-side slack over the runner's own per-test wall clock before the whole sandbox is killed."""
SANDBOX_UID = 65534
"""The uid the sandbox runs as when the host is root (``nobody`` on Debian)."""
_RUNNER_SOURCE = (Path(__file__).with_name("_sandbox_runner.py")).read_text()


class SandboxUnavailableError(RuntimeError):
    """bubblewrap is missing or cannot create a sandbox here, and rlimits-only mode was not opted into."""


class CodeStatus(str, enum.Enum):
    """Outcome of a program (overall) or of one test."""

    PASSED = "passed"
    WRONG_ANSWER = "wrong_answer"
    RUNTIME_ERROR = "runtime_error"
    TIMEOUT = "timeout"
    MEMORY = "memory"
    NO_CODE = "no_code"
    ERROR = "error"
    """The sandbox itself failed (not the program's fault); becomes reward status ``error``."""


@dataclass(frozen=True)
class SandboxConfig:
    """How programs are isolated. The defaults are the safe choice; see the module docstring.

    Attributes:
        bwrap: path or name (looked up on ``PATH``) of the bubblewrap binary.
        allow_rlimits_only: when bwrap is missing or unusable, run with rlimits only instead of refusing.
            Unsafe for untrusted code; logged as a warning.
        python: interpreter used inside the sandbox (default: this process's base interpreter, or
            ``/usr/bin/python3`` when the sandbox user cannot reach that one).
        max_processes: ``RLIMIT_NPROC`` (processes and threads) inside the sandbox.
        max_output_bytes: cap on stdout + stderr of one test.
        max_file_mb: ``RLIMIT_FSIZE``: largest file a program may write.
        max_open_files: ``RLIMIT_NOFILE``.
        tmpfs_mb: size of the private ``/tmp`` and ``/dev/shm`` (when bwrap supports ``--size``); it
            holds the program's files and each test's input, so it must exceed the largest input.
        nice: niceness added to sandboxed programs, so they yield the CPU to the trainer.
    """

    bwrap: str = "bwrap"
    allow_rlimits_only: bool = False
    python: str | None = None
    max_processes: int = 32
    max_output_bytes: int = 4 * 1024 * 1024
    max_file_mb: int = 16
    max_open_files: int = 64
    tmpfs_mb: int = 64
    nice: int = 10


@dataclass(frozen=True)
class TestCase:
    """One test, normalized from any supported format. ``expected`` stays on the host.

    ``kind``: ``"stdio"`` (``stdin`` -> stdout compared with ``expected``), ``"call"``
    (``fn_name(*args)`` compared with ``expected``), ``"assert"`` (``code`` must run without error,
    after ``setup``) or ``"check"`` (HumanEval: ``code`` defines ``check``, called on ``entry_point``).
    ``index`` is the test's position in the original spec.
    """

    __test__ = False  # not a pytest test class

    kind: str
    index: int
    stdin: str = ""
    fn_name: str = ""
    args: tuple[Any, ...] = ()
    code: str = ""
    setup: str = ""
    entry_point: str = ""
    expected: Any = None

    @property
    def size(self) -> int:
        """How long the input is; the longest tests are kept when capping."""
        if self.kind == "stdio":
            return len(self.stdin)
        if self.kind == "call":
            return len(json.dumps(list(self.args)))
        return len(self.code)

    def job(self, max_output_bytes: int) -> dict[str, Any]:
        """What the runner gets: everything but the expected output."""
        out: dict[str, Any] = {"kind": self.kind, "max_output_bytes": max_output_bytes}
        if self.kind == "stdio":
            out["stdin"] = self.stdin
        elif self.kind == "call":
            out.update(fn_name=self.fn_name, args=list(self.args))
        elif self.kind == "assert":
            out.update(code=self.code, setup=self.setup)
        else:
            out.update(code=self.code, entry_point=self.entry_point)
        return out


@dataclass(frozen=True)
class TestResult:
    """Outcome of one test: ``index`` in the original spec, status, wall time and a short reason."""

    __test__ = False

    index: int
    status: CodeStatus
    time_s: float = 0.0
    detail: str = ""


@dataclass(frozen=True)
class CodeResult:
    """Outcome of a program on its tests.

    ``status`` is ``passed`` when every selected test passed, else the status of the first test that
    did not (tests run longest first; with ``fail_fast`` the run stops there). ``tests`` holds the
    tests that ran, in run order; ``num_tests`` is how many were selected.
    """

    status: CodeStatus
    tests: tuple[TestResult, ...] = ()
    num_tests: int = 0
    detail: str = ""
    mode: str = ""

    @property
    def passed(self) -> bool:
        return self.status is CodeStatus.PASSED

    @property
    def num_passed(self) -> int:
        return sum(t.status is CodeStatus.PASSED for t in self.tests)


# ----------------------------------------------------------------------------------------------
# Extraction and test formats
# ----------------------------------------------------------------------------------------------

_FENCE_RE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str | None:
    """The content of the last complete fenced code block (```` ```python ... ``` ````), or None."""
    blocks = _FENCE_RE.findall(response)
    if not blocks:
        return None
    code = blocks[-1][1]
    return code if code.strip() else None


def _as_text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(str(v) for v in value)
    return str(value)


def parse_tests(spec: Any) -> list[TestCase]:
    """Normalize a test specification into :class:`TestCase` objects.

    Accepted (``spec`` may also be the JSON string of any of these, as datasets store it):

    * ``{"inputs": [...], "outputs": [...]}``: stdin/stdout (APPS, TACO, DeepCoder, CodeContests);
      an input or output given as a list of lines is joined with newlines.
    * ``{"fn_name": f, "inputs": [[args], ...], "outputs": [...]}``: function calls (APPS/TACO
      call-based; a ``class Solution`` method is found too, as in LeetCode-style problems).
    * ``[{"input": ..., "output": ..., "testtype": "stdin" | "functional"}, ...]`` or
      ``{"fn_name": f, "tests": [...]}`` of those: LiveCodeBench; a functional input holds one JSON
      argument per line.
    * ``{"asserts": ["assert f(1) == 2", ...], "setup": "import math"}`` or a plain list of assert
      strings: each assert is one test (MBPP, HumanEval+ ``plus`` inputs turned into asserts).
    * ``{"test": "def check(candidate): ...", "entry_point": "f"}``: HumanEval, one test; the key may
      also be ``"test_code"`` (what ``flowrl data prepare`` writes); test code without ``check`` is
      run as plain asserts.

    Raises:
        ValueError: the format is none of these (the message lists them).
    """
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError as exc:
            raise ValueError(f"test spec is a string but not JSON ({exc}); pass a dict or list") from None
    if isinstance(spec, Mapping) and "inputs" in spec and "outputs" in spec:
        inputs, outputs = list(spec["inputs"]), list(spec["outputs"])
        if len(inputs) != len(outputs):
            raise ValueError(f"test spec has {len(inputs)} inputs but {len(outputs)} outputs")
        fn_name = spec.get("fn_name")
        if fn_name:
            return [
                TestCase(
                    "call", i, fn_name=str(fn_name), args=tuple(a if isinstance(a, list) else [a]), expected=o
                )
                for i, (a, o) in enumerate(zip(inputs, outputs, strict=True))
            ]
        return [
            TestCase("stdio", i, stdin=_as_text(a), expected=_as_text(o))
            for i, (a, o) in enumerate(zip(inputs, outputs, strict=True))
        ]
    if isinstance(spec, Mapping) and "tests" in spec:
        return _livecodebench(spec["tests"], spec.get("fn_name"))
    if isinstance(spec, list) and spec and all(isinstance(t, Mapping) and "input" in t for t in spec):
        return _livecodebench(spec, None)
    if isinstance(spec, Mapping) and "asserts" in spec:
        setup = str(spec.get("setup") or "")
        return [TestCase("assert", i, code=str(a), setup=setup) for i, a in enumerate(spec["asserts"])]
    if isinstance(spec, list) and spec and all(isinstance(t, str) for t in spec):
        return [TestCase("assert", i, code=a) for i, a in enumerate(spec)]
    for key in ("test", "test_code"):
        if isinstance(spec, Mapping) and key in spec and "entry_point" in spec:
            return [TestCase("check", 0, code=str(spec[key]), entry_point=str(spec["entry_point"]))]
    raise ValueError(
        "unrecognized test spec; expected {'inputs', 'outputs'} (stdin/stdout), with 'fn_name' (function "
        "calls), LiveCodeBench [{'input', 'output', 'testtype'}], {'asserts': [...]}, a list of assert "
        f"strings, or {{'test' or 'test_code', 'entry_point'}} (HumanEval); got {str(spec)[:120]!r}"
    )


def _livecodebench(tests: Sequence[Mapping[str, Any]], fn_name: str | None) -> list[TestCase]:
    out = []
    for i, t in enumerate(tests):
        if t.get("testtype", "stdin") == "functional":
            name = t.get("fn_name") or fn_name
            if not name:
                raise ValueError("a functional LiveCodeBench test needs 'fn_name' (in the test or the spec)")
            args = tuple(json.loads(line) for line in str(t["input"]).splitlines() if line.strip())
            out.append(TestCase("call", i, fn_name=str(name), args=args, expected=json.loads(t["output"])))
        else:
            out.append(TestCase("stdio", i, stdin=str(t["input"]), expected=str(t["output"])))
    return out


def select_tests(tests: Sequence[TestCase], max_tests: int) -> list[TestCase]:
    """The ``max_tests`` tests with the longest inputs, longest first (ties keep the original order)."""
    if max_tests < 1:
        raise ValueError(f"max_tests must be >= 1, got {max_tests}")
    return sorted(tests, key=lambda t: (-t.size, t.index))[:max_tests]


# ----------------------------------------------------------------------------------------------
# Comparison (host side)
# ----------------------------------------------------------------------------------------------

_INT_TOKEN = re.compile(r"[+-]?\d+")
_NUM_TOKEN = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
FLOAT_TOLERANCE = 1e-6
"""Absolute and relative tolerance for non-integer numbers (the usual judge checker)."""


def _tokens_match(a: str, b: str) -> bool:
    if a == b:
        return True
    if _INT_TOKEN.fullmatch(a) and _INT_TOKEN.fullmatch(b):
        return int(a) == int(b)
    if _NUM_TOKEN.fullmatch(a) and _NUM_TOKEN.fullmatch(b):
        return math.isclose(float(a), float(b), rel_tol=FLOAT_TOLERANCE, abs_tol=FLOAT_TOLERANCE)
    return False


def outputs_match(actual: str, expected: str) -> bool:
    """Judge-style comparison of program output.

    Equal after normalizing line endings and dropping trailing whitespace on each line and trailing
    blank lines; otherwise equal token by token (any whitespace between tokens), where integers must be
    equal and other numbers may differ by :data:`FLOAT_TOLERANCE` (``0.50`` = ``0.5`` = ``5e-1``).
    """

    def lines(s: str) -> list[str]:
        out = [line.rstrip() for line in s.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
        while out and not out[-1]:
            out.pop()
        return out

    if lines(actual) == lines(expected):
        return True
    a, b = actual.split(), expected.split()
    return len(a) == len(b) and all(_tokens_match(x, y) for x, y in zip(a, b, strict=True))


def _values_equal(a: Any, e: Any) -> bool:
    if isinstance(a, bool) or isinstance(e, bool):
        return isinstance(a, bool) and isinstance(e, bool) and a == e
    if isinstance(a, (int, float)) and isinstance(e, (int, float)):
        if isinstance(a, int) and isinstance(e, int):
            return a == e
        return math.isclose(a, e, rel_tol=FLOAT_TOLERANCE, abs_tol=FLOAT_TOLERANCE)
    if isinstance(a, (list, tuple)) and isinstance(e, (list, tuple)):
        return len(a) == len(e) and all(_values_equal(x, y) for x, y in zip(a, e, strict=True))
    if isinstance(a, dict) and isinstance(e, dict):
        return a.keys() == e.keys() and all(_values_equal(a[k], e[k]) for k in a)
    return a == e


def values_match(actual: Any, expected: Any) -> bool:
    """Compare a function's return value (as JSON) with the expected one.

    Tuples equal lists, floats use :data:`FLOAT_TOLERANCE`, booleans are not numbers; an expected
    value wrapped in a one-element list also matches its element (APPS/TACO store call-based outputs
    that way).
    """
    if _values_equal(actual, expected):
        return True
    return isinstance(expected, list) and len(expected) == 1 and _values_equal(actual, expected[0])


# ----------------------------------------------------------------------------------------------
# Launching the sandbox
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Launcher:
    argv: tuple[str, ...]
    mode: str  # "bwrap" or "rlimits"
    popen_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def pid_namespace(self) -> bool:
        return self.mode == "bwrap"


def _reachable_by_others(path: str) -> bool:
    """True when a user other than the owner can execute ``path`` (every directory on the way too)."""
    p = Path(path)
    try:
        if not p.stat().st_mode & 0o001:
            return False
        return all(parent.stat().st_mode & 0o001 for parent in p.parents)
    except OSError:
        return False


def _interpreter(config: SandboxConfig, other_user: bool) -> str:
    if config.python:
        return config.python
    own = os.path.realpath(sys.executable)
    if not other_user or _reachable_by_others(own):
        return own
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        real = os.path.realpath(candidate)
        if os.path.exists(real) and _reachable_by_others(real):
            return real
    raise SandboxUnavailableError(
        f"the sandbox runs as uid {SANDBOX_UID} when flowrl runs as root, and that user cannot reach "
        f"{own}. Install a system Python (apt-get install python3) or pass SandboxConfig(python=...) "
        "with an interpreter every user can run."
    )


@functools.lru_cache(maxsize=8)
def _bwrap_supports_size(bwrap: str) -> bool:
    try:
        out = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--size" in out.stdout + out.stderr


def _mounts_for(interpreter: str) -> list[str]:
    """Read-only binds of the system directories and of the interpreter's prefix if outside ``/usr``."""
    args = ["--ro-bind", "/usr", "/usr"]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    prefixes = {os.path.dirname(os.path.dirname(interpreter))}
    if os.path.realpath(interpreter) == os.path.realpath(sys.executable):
        prefixes.add(os.path.realpath(sys.base_prefix))
    for prefix in sorted(prefixes):
        if prefix not in ("/", "/usr") and not prefix.startswith("/usr/"):
            args += ["--ro-bind", prefix, prefix]
    return args


_SANDBOX_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "TMPDIR": "/tmp"}
"""The whole environment of a sandboxed program."""


def _build_launcher(config: SandboxConfig) -> _Launcher:
    as_root = os.geteuid() == 0
    user_kwargs: dict[str, Any] = (
        {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []} if as_root else {}
    )
    bwrap = shutil.which(config.bwrap)
    if bwrap is None:
        if not config.allow_rlimits_only:
            raise SandboxUnavailableError(
                f"bubblewrap ({config.bwrap!r}) was not found, and flowrl will not run model-written code "
                "without it. Install it: `sudo apt-get install bubblewrap` (Debian/Ubuntu), `dnf install "
                "bubblewrap` (Fedora), `pacman -S bubblewrap` (Arch). To run with resource limits only "
                "(no file-system, network or process isolation), opt in explicitly with "
                "SandboxConfig(allow_rlimits_only=True)."
            )
        interpreter = _interpreter(config, as_root)
        return _Launcher(
            (interpreter, "-I", "-c", _RUNNER_SOURCE),
            "rlimits",
            {"env": dict(_SANDBOX_ENV), "cwd": "/tmp", **user_kwargs},
        )
    interpreter = _interpreter(config, as_root)
    size = ["--size", str(config.tmpfs_mb * 1024 * 1024)] if _bwrap_supports_size(bwrap) else []
    env = [arg for name, value in _SANDBOX_ENV.items() for arg in ("--setenv", name, value)]
    # fmt: off
    argv = [
        bwrap,
        "--unshare-all",                        # user, pid, network, IPC, UTS, cgroup namespaces
        "--die-with-parent", "--new-session",
        *_mounts_for(interpreter),              # /usr, /bin, /lib*, the interpreter: read-only
        "--proc", "/proc", "--dev", "/dev",
        *size, "--tmpfs", "/tmp",
        *size, "--tmpfs", "/dev/shm",
        "--remount-ro", "/dev",                 # its tmpfs would otherwise take files of any total size
        "--remount-ro", "/",
        "--chdir", "/tmp",
        "--clearenv", *env,
        interpreter, "-I", "-c", _RUNNER_SOURCE,
    ]
    # fmt: on
    return _Launcher(tuple(argv), "bwrap", {"env": {"PATH": "/usr/bin:/bin"}, **user_kwargs})


_LAUNCHERS: dict[SandboxConfig, _Launcher] = {}
_LAUNCHERS_LOCK = threading.Lock()
_USERNS_HINT = (
    " Unprivileged user namespaces may be disabled: `sysctl kernel.unprivileged_userns_clone=1`; on "
    "Ubuntu >= 23.10 `sysctl kernel.apparmor_restrict_unprivileged_userns=0`; in Docker, run the "
    "container with `--security-opt seccomp=unconfined --security-opt apparmor=unconfined`."
)


def _self_test(launcher: _Launcher, config: SandboxConfig) -> CodeResult:
    echo = [TestCase("stdio", 0, stdin="ok", expected="ok")]
    return _run_job(
        launcher, config, "print(input())", echo, timeout_s=DEFAULT_TIMEOUT_S, memory_mb=256, fail_fast=True
    )


def _launcher(config: SandboxConfig) -> _Launcher:
    """Resolve the sandbox once per config and self-test it: a trivial program must run and print."""
    with _LAUNCHERS_LOCK:
        if config in _LAUNCHERS:
            return _LAUNCHERS[config]
        launcher = _build_launcher(config)
        probe = _self_test(launcher, config)
        if not probe.passed and launcher.mode == "bwrap" and config.allow_rlimits_only:
            logger.warning("bubblewrap could not start a sandbox (%s); using rlimits only", probe.detail)
            launcher = _build_launcher(dataclasses.replace(config, bwrap="/nonexistent/bwrap"))
            probe = _self_test(launcher, config)
        if not probe.passed:
            raise SandboxUnavailableError(
                f"the {launcher.mode} sandbox failed its self-test ({probe.status.value}: {probe.detail})."
                + (_USERNS_HINT if launcher.mode == "bwrap" else "")
            )
        if launcher.mode == "rlimits":
            logger.warning(
                "running model-written code WITHOUT bubblewrap isolation (rlimits only, "
                "SandboxConfig.allow_rlimits_only=True): no file-system, network or process isolation"
            )
        else:
            logger.info("code sandbox: bubblewrap at %s", launcher.argv[0])
        _LAUNCHERS[config] = launcher
        return launcher


def check_sandbox(config: SandboxConfig | None = None) -> str:
    """Make sure programs can run (probing once) and return the mode: ``"bwrap"`` or ``"rlimits"``.

    Raises:
        SandboxUnavailableError: bwrap is missing (and rlimits-only was not opted into) or cannot start.
    """
    return _launcher(config or SandboxConfig()).mode


class _Stream:
    """Reads the runner's JSON lines and stderr under per-record deadlines, then kills the sandbox."""

    def __init__(self, launcher: _Launcher, job: bytes, stdout_cap: int) -> None:
        self.proc = subprocess.Popen(
            launcher.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            **launcher.popen_kwargs,
        )
        self.stdout_cap = stdout_cap
        self.stderr = bytearray()
        self._buf = bytearray()
        self._received = 0
        self._sel = selectors.DefaultSelector()
        assert self.proc.stdin and self.proc.stdout and self.proc.stderr
        os.set_blocking(self.proc.stdin.fileno(), False)
        self._job = memoryview(job)
        self._sel.register(self.proc.stdin, selectors.EVENT_WRITE)
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self._sel.register(self.proc.stderr, selectors.EVENT_READ)

    def next_record(self, timeout_s: float) -> dict[str, Any] | str:
        """The next JSON record, or why there is none: ``"deadline"``, ``"eof"`` or ``"overflow"``."""
        deadline = time.monotonic() + timeout_s
        while True:
            newline = self._buf.find(b"\n")
            if newline >= 0:
                line = bytes(self._buf[:newline])
                del self._buf[: newline + 1]
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # not the runner's: ignore
                if isinstance(record, dict):
                    return record
                continue
            if not self._sel.get_map():
                return "eof"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "deadline"
            for key, _ in self._sel.select(remaining):
                f = key.fileobj
                if f is self.proc.stdin:
                    try:
                        n = os.write(self.proc.stdin.fileno(), self._job[:65536])
                    except (BrokenPipeError, OSError):
                        n = len(self._job)
                    self._job = self._job[n:]
                    if not self._job:
                        self._sel.unregister(f)
                        self.proc.stdin.close()
                    continue
                chunk = os.read(f.fileno(), 65536)  # type: ignore[union-attr]
                if not chunk:
                    self._sel.unregister(f)
                    continue
                if f is self.proc.stderr:
                    self.stderr = (self.stderr + chunk)[-8192:]
                else:
                    self._received += len(chunk)
                    if self._received > self.stdout_cap:
                        return "overflow"
                    self._buf += chunk

    def close(self) -> None:
        """Kill the sandbox: the outer process (bwrap: the namespace goes with it) and its group."""
        for kill in (lambda: os.killpg(self.proc.pid, signal.SIGKILL), self.proc.kill):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait()
        self._sel.close()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None and not f.closed:
                f.close()


def _judge(test: TestCase, record: Mapping[str, Any]) -> TestResult:
    """Turn the runner's record into a verdict; expected outputs are only looked at here."""
    status = record.get("status")
    elapsed = float(record.get("time_s", 0.0))
    stderr = str(record.get("stderr", ""))[-500:]
    if status == "ok":
        if test.kind == "stdio":
            ok = outputs_match(str(record.get("stdout", "")), str(test.expected))
            detail = (
                "" if ok else f"output {str(record.get('stdout', ''))[:80]!r} != {str(test.expected)[:80]!r}"
            )
        elif test.kind == "call":
            ok = "value" in record and values_match(record["value"], test.expected)
            detail = "" if ok else f"returned {str(record.get('value'))[:80]} != {str(test.expected)[:80]}"
        else:
            ok, detail = True, ""
        return TestResult(test.index, CodeStatus.PASSED if ok else CodeStatus.WRONG_ANSWER, elapsed, detail)
    if status == "failed":
        return TestResult(test.index, CodeStatus.WRONG_ANSWER, elapsed, stderr)
    if status == "timeout":
        return TestResult(test.index, CodeStatus.TIMEOUT, elapsed, "time limit exceeded")
    if status == "memory":
        return TestResult(test.index, CodeStatus.MEMORY, elapsed, "memory limit exceeded")
    if status == "output_limit":
        return TestResult(test.index, CodeStatus.RUNTIME_ERROR, elapsed, "output limit exceeded")
    return TestResult(
        test.index, CodeStatus.RUNTIME_ERROR, elapsed, stderr or f"exit code {record.get('exit_code')}"
    )


def _run_job(
    launcher: _Launcher,
    config: SandboxConfig,
    code: str,
    tests: Sequence[TestCase],
    *,
    timeout_s: float,
    memory_mb: int,
    fail_fast: bool,
) -> CodeResult:
    caps = [max(config.max_output_bytes, 2 * len(str(t.expected or "")) + 4096) for t in tests]
    job = {
        "code": code,
        "tests": [t.job(cap) for t, cap in zip(tests, caps, strict=True)],
        "nonce": secrets.token_hex(16),
        "timeout_s": timeout_s,
        "memory_mb": memory_mb,
        "max_processes": config.max_processes,
        "max_file_mb": config.max_file_mb,
        "max_open_files": config.max_open_files,
        "nice": config.nice,
        "pid_namespace": launcher.pid_namespace,
    }
    try:
        stream = _Stream(
            launcher, json.dumps(job).encode(), stdout_cap=2 * sum(caps) + 65536 * (len(tests) + 1)
        )
    except OSError as exc:
        return CodeResult(
            CodeStatus.ERROR, (), len(tests), f"could not start the sandbox: {exc}", launcher.mode
        )
    results: list[TestResult] = []
    try:
        ready = stream.next_record(STARTUP_TIMEOUT_S + timeout_s)
        if not isinstance(ready, dict) or not ready.get("ready"):
            message = stream.stderr.decode("utf-8", "replace").strip()[-1000:]
            detail = f"sandbox did not start ({ready}): {message}"
            return CodeResult(CodeStatus.ERROR, (), len(tests), detail, launcher.mode)
        for pos, test in enumerate(tests):
            record = stream.next_record(timeout_s + PER_TEST_GRACE_S)
            if isinstance(record, dict) and record.get("pos") != pos:
                record = "out-of-order record"
            if record == "deadline":
                result = TestResult(
                    test.index, CodeStatus.TIMEOUT, timeout_s, "killed by the host's wall clock"
                )
            elif isinstance(record, dict):
                result = _judge(test, record)
            else:
                detail = f"the sandboxed run ended early ({record})"
                result = TestResult(test.index, CodeStatus.RUNTIME_ERROR, 0.0, detail)
            results.append(result)
            if result.status is not CodeStatus.PASSED and (fail_fast or not isinstance(record, dict)):
                break
    finally:
        stream.close()
    failed = next((r for r in results if r.status is not CodeStatus.PASSED), None)
    if failed is None and len(results) == len(tests):
        return CodeResult(CodeStatus.PASSED, tuple(results), len(tests), "", launcher.mode)
    assert failed is not None
    return CodeResult(failed.status, tuple(results), len(tests), failed.detail, launcher.mode)


def run_tests(
    code: str | None,
    tests: Any,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    max_tests: int = DEFAULT_MAX_TESTS,
    fail_fast: bool = True,
    sandbox: SandboxConfig | None = None,
) -> CodeResult:
    """Run ``code`` against ``tests`` in the sandbox.

    Args:
        code: Python source (e.g. from :func:`extract_code`); None or blank gives status ``no_code``.
        tests: a test spec in any format :func:`parse_tests` accepts (or its JSON string).
        timeout_s: wall-clock limit per test (the CPU-time limit is one second more).
        memory_mb: address-space limit per process.
        max_tests: run at most this many tests, the longest inputs first.
        fail_fast: stop at the first test that does not pass (the reward is all-or-nothing).
        sandbox: isolation settings (default :class:`SandboxConfig`).

    Returns:
        A :class:`CodeResult`; ``.passed`` is True when every selected test passed.

    Raises:
        ValueError: the test spec or a limit is invalid.
        SandboxUnavailableError: bwrap is missing or unusable and rlimits-only was not opted into.
    """
    if timeout_s <= 0 or memory_mb < 32:
        raise ValueError(f"need timeout_s > 0 and memory_mb >= 32, got {timeout_s} and {memory_mb}")
    cases = select_tests(parse_tests(tests), max_tests)
    if not cases:
        raise ValueError("the test spec holds no tests; a problem without tests cannot be scored")
    if code is None or not code.strip():
        return CodeResult(CodeStatus.NO_CODE, (), len(cases), "no code")
    config = sandbox or SandboxConfig()
    launcher = _launcher(config)
    return _run_job(
        launcher, config, code, cases, timeout_s=timeout_s, memory_mb=memory_mb, fail_fast=fail_fast
    )


def default_num_workers() -> int:
    """Half the CPU cores (the rest stays with the trainer), at least one."""
    return max(1, (os.cpu_count() or 2) // 2)


def run_many(
    codes: Sequence[str | None],
    tests: Sequence[Any],
    *,
    num_workers: int | None = None,
    **kwargs: Any,
) -> list[CodeResult]:
    """:func:`run_tests` for many programs through a bounded pool of ``num_workers`` sandboxes.

    A bad test spec gives that program status ``error``; a missing sandbox raises (it concerns all).
    """
    if len(codes) != len(tests):
        raise ValueError(f"{len(codes)} programs but {len(tests)} test specs; pass one spec per program")
    check_sandbox(kwargs.get("sandbox"))

    def one(pair: tuple[str | None, Any]) -> CodeResult:
        try:
            return run_tests(pair[0], pair[1], **kwargs)
        except ValueError as exc:
            return CodeResult(CodeStatus.ERROR, (), 0, f"invalid test spec: {exc}")

    with ThreadPoolExecutor(max_workers=num_workers or default_num_workers()) as pool:
        return list(pool.map(one, zip(codes, tests, strict=True)))


# ----------------------------------------------------------------------------------------------
# The reward
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeRewardConfig:
    """Settings of :func:`code_reward` (the trainer sets them once with :func:`set_code_reward_config`)."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    memory_mb: int = DEFAULT_MEMORY_MB
    max_tests: int = DEFAULT_MAX_TESTS
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


_REWARD_CONFIG = CodeRewardConfig()


def set_code_reward_config(config: CodeRewardConfig) -> None:
    """Set the limits and sandbox used by :func:`code_reward` and the registry's code sources."""
    global _REWARD_CONFIG
    _REWARD_CONFIG = config


def get_code_reward_config() -> CodeRewardConfig:
    return _REWARD_CONFIG


def to_reward_result(result: CodeResult) -> RewardResult:
    """1 for passed; 0 for a program that failed (wrong, crashed, too slow, too big) or is missing;
    NaN with status ``error`` when the sandbox failed, so it is counted rather than trained on.

    A program that ran out of time is the program's fault: it scores 0 like a wrong one, with status
    ``timeout`` so timeouts are counted on their own (as the math reward's are)."""
    detail = f"{result.status.value}: {result.detail}"[:300] if result.detail else result.status.value
    if result.status is CodeStatus.PASSED:
        return RewardResult(1.0, RewardStatus.CORRECT, f"passed {result.num_tests} tests")
    if result.status is CodeStatus.NO_CODE:
        return RewardResult(0.0, RewardStatus.NO_ANSWER, "no fenced code block")
    if result.status is CodeStatus.ERROR:
        return RewardResult(math.nan, RewardStatus.ERROR, detail)
    if result.status is CodeStatus.TIMEOUT:
        return RewardResult(0.0, RewardStatus.TIMEOUT, detail)
    return RewardResult(0.0, RewardStatus.WRONG, detail)


def code_reward(response: str, example: Mapping[str, Any]) -> RewardResult:
    """The code :data:`~flowrl.rewards.base.RewardFn`: 1 if the last code block passes all tests, else 0.

    The tests are ``example["reward_model"]["ground_truth"]`` in any :func:`parse_tests` format.
    """
    return score_code_many([response], [example])[0]


def score_code_many(
    responses: Sequence[str], examples: Sequence[Mapping[str, Any]], *, num_workers: int | None = None
) -> list[RewardResult]:
    """:func:`code_reward` for a batch, through the bounded sandbox pool."""
    cfg = _REWARD_CONFIG
    specs = []
    for example in examples:
        try:
            specs.append(example["reward_model"]["ground_truth"])
        except (KeyError, TypeError):
            specs.append(None)
    codes = [extract_code(r) for r in responses]
    results = run_many(
        codes,
        specs,
        num_workers=num_workers,
        timeout_s=cfg.timeout_s,
        memory_mb=cfg.memory_mb,
        max_tests=cfg.max_tests,
        sandbox=cfg.sandbox,
    )
    return [to_reward_result(r) for r in results]
