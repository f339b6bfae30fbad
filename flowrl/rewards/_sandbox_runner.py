"""The trusted runner that executes inside the sandbox: candidate code against tests, one child per test.

Standard library only: it runs under the sandbox's interpreter (``python -I -c <this file>``), where
flowrl is not importable. :mod:`flowrl.rewards.code` is the host side and documents the guarantees.

Protocol. stdin: one JSON job ``{"code", "tests", "nonce", "timeout_s", "memory_mb", "max_processes",
"max_file_mb", "max_open_files", "nice", "pid_namespace"}``; each test is ``{"kind": "stdio", "stdin"}``,
``{"kind": "call", "fn_name", "args"}``, ``{"kind": "assert", "code", "setup"}`` or
``{"kind": "check", "code", "entry_point"}``, plus ``"max_output_bytes"``. Expected outputs never
enter the sandbox: the host compares. stdout: JSON lines, ``{"ready": true}`` once the runner is up,
then one record per test in order: ``{"pos", "status", "stdout"|"value", "stderr", "time_s"}`` with
``status`` in ``ok``, ``failed`` (an assertion of the test failed), ``runtime_error``, ``timeout``,
``memory``, ``output_limit``.

Each test runs in a forked child that sets its own rlimits (address space, CPU time, processes, file
size, open files), gets stdin from a file and stdout/stderr/result pipes, then executes the code. The
runner enforces the per-test wall clock (kills the child's process group) and caps what it reads. For
function-call and assert tests the child reports success on a separate pipe together with a per-run
nonce, so ``sys.exit(0)`` or ``os._exit(0)`` before the assertions does not count as a pass.
"""

from __future__ import annotations

import builtins
import json
import math
import os
import resource
import select
import shutil
import signal
import sys
import tempfile
import time
import traceback

STDERR_TAIL_BYTES = 4096
POLL_S = 0.02  # how often to check whether the test's process exited while its pipes stay open
DRAIN_S = 0.05  # after it exited, how long to keep reading what is already in the pipes
RESULT_FD = 3


def _emit(record: dict) -> None:
    data = (json.dumps(record) + "\n").encode()
    while data:
        data = data[os.write(1, data) :]


def _limit(kind: int, value: int) -> None:
    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))


def _jsonable(value: object) -> object:
    if isinstance(value, (set, frozenset)):
        try:
            return sorted(value)
        except TypeError:
            return list(value)
    raise TypeError(f"return value of type {type(value).__name__} is not JSON-serializable")


def _run_test(test: dict, namespace: dict, nonce: str) -> dict:
    """Run a function-call, assert or check test against the candidate's namespace."""
    kind = test["kind"]
    if kind == "call":
        fn = namespace.get(test["fn_name"])
        if fn is None and isinstance(namespace.get("Solution"), type):
            fn = getattr(namespace["Solution"](), test["fn_name"], None)
        if not callable(fn):
            raise NameError(f"no function or Solution method named {test['fn_name']!r}")
        value = fn(*test["args"])
        # Through JSON: the host compares plain data, so an object with a rigged __eq__ cannot pass.
        return {"nonce": nonce, "value": json.loads(json.dumps(value, default=_jsonable))}
    if kind == "assert":
        if test.get("setup"):
            exec(compile(test["setup"], "test_setup.py", "exec"), namespace)
        exec(compile(test["code"], "test.py", "exec"), namespace)
    else:  # "check" (HumanEval)
        exec(compile(test["code"], "test.py", "exec"), namespace)
        if "check" in namespace:  # test code without check() is plain asserts, already run
            namespace["check"](namespace[test["entry_point"]])
    return {"nonce": nonce, "ok": True}


def _child(test: dict, code: object, job: dict, stdin_fd: int, w_out: int, w_err: int, w_res: int) -> None:
    """Body of the forked child: limits, file descriptors, then the candidate code. Never returns."""
    exit_code = 1
    try:
        os.setpgid(0, 0)
        if not job["pid_namespace"]:
            # Without a pid namespace, make sure the child dies with the runner (best effort).
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        os.dup2(stdin_fd, 0)
        os.dup2(w_out, 1)
        os.dup2(w_err, 2)
        os.dup2(w_res, RESULT_FD)
        os.closerange(RESULT_FD + 1, 65536)
        mb = 1024 * 1024
        cpu = int(math.ceil(job["timeout_s"])) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        _limit(resource.RLIMIT_AS, job["memory_mb"] * mb)
        _limit(resource.RLIMIT_NPROC, job["max_processes"])
        _limit(resource.RLIMIT_FSIZE, job["max_file_mb"] * mb)
        _limit(resource.RLIMIT_NOFILE, job["max_open_files"])
        _limit(resource.RLIMIT_CORE, 0)
        sys.stdin = sys.__stdin__ = open(0, encoding="utf-8", errors="replace", closefd=False)
        sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False)
        sys.stderr = sys.__stderr__ = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
        sys.argv = ["solution.py"]
    except BaseException:  # noqa: BLE001 - the runner's own setup failed; say so on stderr
        os.write(w_err, traceback.format_exc().encode())
        os._exit(70)
    nonce = job["nonce"]
    memory_msg = json.dumps({"nonce": nonce, "error": "memory"}).encode()
    kind = test["kind"]
    namespace = {"__name__": "__main__" if kind == "stdio" else "solution", "__builtins__": builtins}
    try:
        exec(code, namespace)  # the candidate's definitions (and, for stdio tests, the whole program)
        message = None
        if kind != "stdio":
            try:
                message = _run_test(test, namespace, nonce)
            except AssertionError:  # a failed assertion of the test itself is a wrong answer
                message = {"nonce": nonce, "failed": traceback.format_exc(limit=-1)[-500:]}
        sys.stdout.flush()
        if message is not None:
            data = json.dumps(message).encode()
            while data:
                data = data[os.write(RESULT_FD, data) :]
        exit_code = 0
    except MemoryError:
        os.write(RESULT_FD, memory_msg)
        exit_code = 1
    except SystemExit as exc:
        if exc.code is None or exc.code == 0:
            exit_code = 0
        elif isinstance(exc.code, int):
            exit_code = exc.code & 0xFF or 1
        else:
            print(exc.code, file=sys.stderr)
            exit_code = 1
    except BaseException:  # noqa: BLE001 - the candidate's exception is its runtime error
        try:
            exc_type, exc_value, tb = sys.exc_info()
            traceback.print_exception(exc_type, exc_value, tb.tb_next if tb else None)  # hide this frame
        except MemoryError:
            os.write(RESULT_FD, memory_msg)
        exit_code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - a closed or broken stdout is the candidate's business
        pass
    os._exit(exit_code)


def _kill_group(pid: int) -> None:
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass


def _run_one(test: dict, code: object, job: dict, workdir: str) -> dict:
    """Fork a child for one test, enforce its wall clock and output cap, and describe what happened."""
    cap = int(test["max_output_bytes"])
    if test["kind"] == "stdio":
        stdin_file = tempfile.TemporaryFile(dir=workdir)
        stdin_file.write(test["stdin"].encode("utf-8", "surrogateescape"))
        stdin_file.seek(0)
    else:
        stdin_file = open(os.devnull, "rb")
    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    r_res, w_res = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(test, code, job, stdin_file.fileno(), w_out, w_err, w_res)
    for fd in (w_out, w_err, w_res):
        os.close(fd)
    stdin_file.close()
    out, res, err_tail = bytearray(), bytearray(), bytearray()
    received = 0
    open_fds = {r_out, r_err, r_res}
    deadline = start + float(job["timeout_s"])
    verdict = None
    status = None
    cpu_s = 0.0
    exited_at = 0.0
    while verdict is None:
        now = time.monotonic()
        if status is None:
            done, wait_status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                status, exited_at = wait_status, now
                cpu_s = usage.ru_utime + usage.ru_stime
        if status is not None and (not open_fds or now - exited_at > DRAIN_S):
            break  # exited; a descendant still holding the pipes does not keep the test alive
        remaining = deadline - now
        if remaining <= 0:
            verdict = "timeout"
            break
        if not open_fds:
            time.sleep(min(remaining, 0.002))
            continue
        ready, _, _ = select.select(list(open_fds), [], [], min(remaining, POLL_S))
        for fd in ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.discard(fd)
                continue
            received += len(chunk)
            if fd == r_out:
                out += chunk
            elif fd == r_res:
                res += chunk
            else:
                err_tail = (err_tail + chunk)[-STDERR_TAIL_BYTES:]
            if received > cap:
                verdict = "output_limit"
                break
    elapsed = time.monotonic() - start
    _kill_group(pid)
    if status is None:
        _, status = os.waitpid(pid, 0)
    for fd in (r_out, r_err, r_res):
        os.close(fd)
    record: dict = {"time_s": round(elapsed, 4), "stderr": err_tail.decode("utf-8", "replace")}
    if verdict is not None:
        record["status"] = verdict
        return record
    exit_code = os.waitstatus_to_exitcode(status)
    record["exit_code"] = exit_code
    message = None
    try:
        message = json.loads(res.decode()) if res else None
    except ValueError:
        message = None
    if not isinstance(message, dict) or message.get("nonce") != job["nonce"]:
        message = None
    if message is not None and message.get("error") == "memory":
        record["status"] = "memory"
    elif message is not None and "failed" in message:
        record["status"] = "failed"
        record["stderr"] = str(message["failed"])
    elif exit_code == -signal.SIGXCPU or (exit_code == -signal.SIGKILL and cpu_s >= float(job["timeout_s"])):
        record["status"] = "timeout"  # the CPU-time limit fired before the wall clock
    elif exit_code == -signal.SIGXFSZ:
        record["status"] = "output_limit"
    elif exit_code != 0:
        record["status"] = "runtime_error"
    elif test["kind"] == "stdio":
        record["status"] = "ok"
        record["stdout"] = out.decode("utf-8", "replace")
    elif message is None:
        record["status"] = "runtime_error"
        record["stderr"] = (record["stderr"] + "\nexited before the test completed").strip()
    else:
        record["status"] = "ok"
        if "value" in message:
            record["value"] = message["value"]
    return record


def _clean_up(job: dict) -> None:
    """Kill whatever a test left behind. Only inside a pid namespace, where -1 means "the sandbox"."""
    if job["pid_namespace"] and os.getpid() != 1 and os.getppid() == 1:
        try:
            os.kill(-1, signal.SIGKILL)  # every process of the sandbox except pid 1 and this runner
        except ProcessLookupError:
            pass
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main() -> None:
    job = json.loads(sys.stdin.buffer.read())
    try:
        os.nice(int(job["nice"]))
    except OSError:
        pass
    workdir = tempfile.mkdtemp(prefix="flowrl-run-")
    os.chdir(workdir)
    try:
        try:
            code = compile(job["code"], "solution.py", "exec")
        except (SyntaxError, ValueError):
            _emit({"ready": True})
            _emit(
                {"pos": 0, "status": "runtime_error", "stderr": traceback.format_exc(limit=0), "time_s": 0.0}
            )
            return
        _emit({"ready": True})
        for pos, test in enumerate(job["tests"]):
            record = _run_one(test, code, job, workdir)
            record["pos"] = pos
            _emit(record)
            _clean_up(job)
    finally:
        os.chdir("/")
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
