"""Math answers: extraction, symbolic equivalence with Math-Verify, and a time bound from outside.

Pipeline for one response and its gold answer (``ground_truth``):

1. **Extraction** (:func:`extract_answer`, in the calling process, linear time): the last complete
   ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces; ``\\boxed 5`` without braces), or a final
   ``Answer: ...`` line (the DAPO prompt format, arXiv 2503.14476, of the paper's training data),
   whichever comes last in the text. Surrounding ``$``, markdown bold and a trailing period are removed.
2. **Fast paths** (calling process): identical answers up to whitespace and sizing commands are correct;
   two plain integers are compared as integers; a multiple-choice gold (one letter ``A``-``J``) is
   compared with the letter of the answer (``B``, ``(B)``, ``B)``, ``\\text{(B)}``). These never call SymPy.
3. **Math-Verify** (``math-verify``, huggingface/Math-Verify, the field's standard) in a worker process:
   gold and answer are each wrapped as ``\\boxed{...}`` (Skywork-OR1#16: parsing a raw gold can change it),
   parsed, then ``verify(gold, answer)`` (gold first: it is asymmetric by design). This covers fractions
   and decimals, radicals, intervals, tuples, sets, ``x = 5`` against ``5``, LaTeX text and thousands
   separators.
4. **Fallback** when step 1 found nothing: Math-Verify's own extraction (its "final answer is" anchors,
   then the last LaTeX or plain expression) on the last :data:`FALLBACK_TAIL_CHARS` characters. If that
   finds nothing either, the status is ``no_answer``. Pass ``fallback=False`` to require a box or an
   ``Answer:`` line.

**Time bound.** Math-Verify's own timeouts use ``signal.alarm``, which fails off the main thread, and an
alarm cannot interrupt SymPy inside C code (``9^{9^{9^{9}}}``). So both are disabled and every check runs
in a persistent pool of worker processes (:class:`VerifierPool`) with a deadline per task measured from
the moment a worker takes it; a worker that overruns is killed and replaced, and the task is reported
as ``timeout``. This works from any thread. Answers longer than :data:`MAX_ANSWER_CHARS` are ``wrong``
without being parsed. Workers are plain subprocesses of this interpreter (``python -c``, exec'd, so
safe when the parent holds CUDA or threads, and they never re-import the caller's ``__main__`` as
multiprocessing's spawn would); a replacement starts in the background (about 0.3 s to import
Math-Verify) while the others keep working.

**Scores** (:func:`score`): ``correct_score`` (1) when correct, ``wrong_score`` otherwise (wrong or no
answer), NaN for ``timeout`` and ``error`` (left out of the update and counted, see
:mod:`flowrl.rewards.base`). :func:`math_reward` is the training reward: +1/-1 for DAPO data
(``data_source`` containing ``"dapo"``, FlowRL spec section 5; group normalization removes the scale),
1/0 for everything else (evaluation benchmarks, GSM8K, MATH).
"""

from __future__ import annotations

import atexit
import collections
import logging
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from flowrl.rewards.base import RewardResult, RewardStatus

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 3.0
"""Deadline of one Math-Verify check in a worker; normal checks take 1-100 ms."""
MAX_ANSWER_CHARS = 1000
"""Longer extracted answers are scored wrong without parsing (no MATH/AIME answer comes close)."""
FALLBACK_TAIL_CHARS = 300
"""The fallback extraction looks at this many final characters (verl's math_dapo uses 300 too)."""
WORKER_MEMORY_MB = 4096
"""Address-space limit of a verifier worker; SymPy blowing up then fails fast instead of swapping."""

# ----------------------------------------------------------------------------------------------
# Extraction (pure string code, runs in the caller)
# ----------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)  # a backslash escapes the next character
# A final-answer line: "Answer: 42", "**Final Answer:** $42$", "> answer: 42". Greedy (.*) keeps it linear.
_ANSWER_LINE_RE = re.compile(
    r"^[ \t>*#_]*(?:final[ \t]+)?answer[ \t*_]*[:：][ \t*_]*(.*)$", re.IGNORECASE | re.MULTILINE
)


@dataclass(frozen=True)
class ExtractedAnswer:
    """An answer found in a response: the text and where it came from (``"boxed"`` or ``"answer_line"``)."""

    text: str
    source: str
    position: int


def _matching_braces(text: str) -> dict[int, int]:
    """Index of each ``{`` -> index of its ``}``, in one pass (unclosed ones are absent).

    ``\\{`` and ``\\}`` are literal braces in LaTeX (set notation) and do not open or close groups.
    """
    pairs: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE_TOKEN_RE.finditer(text):
        token = m.group()
        if token == "{":
            stack.append(m.start())
        elif token == "}" and stack:
            pairs[stack.pop()] = m.start()
    return pairs


def _box_argument(text: str, pos: int, pairs: dict[int, int]) -> str | None:
    """The argument of ``\\boxed`` whose name ends at ``pos``: a brace group or, like TeX, one bare token."""
    n = len(text)
    i = pos
    while i < n and text[i] in " \t":
        i += 1
    if i >= n:
        return None
    if text[i] == "{":
        end = pairs.get(i)
        return None if end is None else text[i + 1 : end]
    j = i
    while j < n and not text[j].isspace() and text[j] not in "$}":
        j += 1
    return text[i:j] or None


def _last_boxed(text: str) -> tuple[str, int] | None:
    """The content and start of the last complete ``\\boxed``/``\\fbox`` (a truncated last one is skipped)."""
    boxes = list(_BOX_RE.finditer(text))
    if not boxes:
        return None
    pairs = _matching_braces(text)
    for m in reversed(boxes):
        content = _box_argument(text, m.end(), pairs)
        if content is not None:
            return content, m.start()
    return None


def clean_answer(answer: str) -> str:
    """Strip what is presentation, not content: ``$...$``, ``\\(...\\)``, bold markers, a trailing period.

    Also removes thousands separators from a plain number (``1\\,000``, ``1{,}000``, ``1 000`` -> ``1000``),
    which Math-Verify would otherwise read as a product.
    """
    s = answer.strip()
    changed = True
    while changed and s:
        changed = False
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**")):
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : len(s) - len(right)].strip()
                changed = True
        if s.endswith(".") and not s.endswith(".."):
            s = s[:-1].rstrip()
            changed = True
    if _THOUSANDS_RE.fullmatch(s):
        s = _THOUSANDS_SEP_RE.sub("", s)
    return s


_THOUSANDS_SEP = r"(?:\\,|\\;|\\!|\\ |~|\{,\}|,| )"
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:" + _THOUSANDS_SEP + r"\d{3})+(?:\.\d+)?")
_THOUSANDS_SEP_RE = re.compile(_THOUSANDS_SEP)


def extract_answer(response: str) -> ExtractedAnswer | None:
    """Find the final answer of a response: the last ``\\boxed``/``\\fbox`` or ``Answer:`` line.

    Whichever of the two starts later in the text wins; a ``\\boxed`` inside the ``Answer:`` line wins
    over the rest of that line. Returns None when neither is present (the caller may then use the
    Math-Verify fallback); the text is cleaned with :func:`clean_answer`.
    """
    boxed = _last_boxed(response)
    line_match = None
    for line_match in _ANSWER_LINE_RE.finditer(response):  # noqa: B007 - we want the last one
        pass
    if line_match is not None and (boxed is None or line_match.start() > boxed[1]):
        text = clean_answer(line_match.group(1))
        if text:
            return ExtractedAnswer(text, "answer_line", line_match.start())
    if boxed is not None:
        text = clean_answer(boxed[0])
        if text:
            return ExtractedAnswer(text, "boxed", boxed[1])
    return None


# ----------------------------------------------------------------------------------------------
# Fast paths (no SymPy)
# ----------------------------------------------------------------------------------------------

_CANON_DROP_RE = re.compile(r"\\left|\\right|\\displaystyle|\\[,;!: ]")
_CANON_SPACE_RE = re.compile(r" ?([^A-Za-z0-9 ]) ?")
_INT_RE = re.compile(r"[+-]?\d+")
_MC_GOLD_RE = re.compile(r"\(?([A-J])\)?")
_MC_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")
_MC_ANSWER_RE = re.compile(r"(?:option|choice)?\s*\(?([A-Ja-j])(?:\)|\.|:|\s|$)", re.IGNORECASE)


def _canon(s: str) -> str:
    """Spacing and sizing removed: spaces survive only between letters or digits ("1 2" is not "12")."""
    s = " ".join(_CANON_DROP_RE.sub(" ", s).split())
    s = _CANON_SPACE_RE.sub(r"\1", s)
    return s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def _multiple_choice_letter(answer: str) -> str | None:
    s = _MC_TEXT_RE.sub(r"\1", answer).strip()
    m = _MC_ANSWER_RE.match(s)
    return m.group(1).upper() if m else None


def _fast_verdict(answer: str, gold: str) -> tuple[RewardStatus, str] | None:
    """Decide without SymPy when that is certain; None means "ask Math-Verify"."""
    if _canon(answer) == _canon(gold):
        return RewardStatus.CORRECT, "identical"
    if len(answer) > MAX_ANSWER_CHARS:
        return RewardStatus.WRONG, f"answer longer than {MAX_ANSWER_CHARS} characters"
    mc = _MC_GOLD_RE.fullmatch(gold.strip())
    if mc:
        letter = _multiple_choice_letter(answer)
        if letter == mc.group(1):
            return RewardStatus.CORRECT, f"choice {letter}"
        return RewardStatus.WRONG, f"choice {letter or answer[:20]!r}, expected {mc.group(1)}"
    if _INT_RE.fullmatch(answer) and _INT_RE.fullmatch(gold) and len(gold) <= MAX_ANSWER_CHARS:
        same = int(answer) == int(gold)
        return (RewardStatus.CORRECT if same else RewardStatus.WRONG), "integer"
    return None


# ----------------------------------------------------------------------------------------------
# Worker side (runs in a child process; Math-Verify timeouts disabled, the parent enforces deadlines)
# ----------------------------------------------------------------------------------------------


def _boxed(s: str) -> str:
    return s if "\\boxed" in s else "\\boxed{" + s + "}"


def _verify_task(answer: str | None, tail: str, gold: str) -> tuple[str, str]:
    """One Math-Verify check; returns ``(status value, detail)``. ``answer=None`` means use the fallback."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    boxed_first = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    gold_parsed = parse(_boxed(gold), boxed_first, parsing_timeout=None)
    if not gold_parsed:
        return RewardStatus.ERROR.value, f"ground truth {gold[:80]!r} could not be parsed by Math-Verify"
    if answer is None:
        pred = parse(tail, [LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None)
        if not pred:
            return RewardStatus.NO_ANSWER.value, "no \\boxed{}, no 'Answer:' line, no expression at the end"
    else:
        pred = parse(_boxed(answer), boxed_first, parsing_timeout=None)
        if not pred:
            return RewardStatus.WRONG.value, f"answer {answer[:80]!r} could not be parsed"
    ok = verify(gold_parsed, pred, timeout_seconds=None)
    shown = str(pred[0])[:80]
    return (RewardStatus.CORRECT if ok else RewardStatus.WRONG).value, f"parsed {shown!r}"


def _worker_main() -> None:
    """Entry point of a verifier worker process: ``python -c ... <socket fd> <memory_mb>``.

    Sends ``"ready"`` once Math-Verify is imported, then loops: receive ``(answer, tail, gold)``, send
    ``(status, detail)``. Exits when the parent closes the socket.
    """
    import resource
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    conn = Connection(int(sys.argv[1]))
    memory_mb = int(sys.argv[2])
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    import math_verify  # noqa: F401 - import before saying ready, so deadlines do not include it

    conn.send("ready")
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return  # the parent went away
        try:
            out = _verify_task(*task)
        except MemoryError:
            out = (RewardStatus.WRONG.value, f"Math-Verify ran out of memory ({memory_mb} MB)")
        except Exception as exc:  # noqa: BLE001 - reported to the parent as an error result
            out = (RewardStatus.ERROR.value, f"{type(exc).__name__}: {exc}"[:300])
        try:
            conn.send(out)
        except (EOFError, OSError):
            return


class _Worker:
    """One verifier process and its end of a socket pair; it takes tasks once it has said "ready"."""

    def __init__(self, memory_mb: int) -> None:
        parent_sock, child_sock = socket.socketpair()
        # The child imports flowrl the way this process does, installed or from a source checkout.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE, str(child_sock.fileno()), str(memory_mb)],
            pass_fds=(child_sock.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=env,
        )
        child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.ready = False

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.conn.close()


_WORKER_CODE = "from flowrl.rewards.math import _worker_main; _worker_main()"


@dataclass
class _Task:
    index: int
    payload: tuple[str | None, str, str]
    deadline: float = math.inf


class VerifierPool:
    """Persistent Math-Verify worker processes with a deadline per task, enforced from outside.

    Safe to call from any thread (calls are serialized by a lock; one call scores a whole batch in
    parallel). A worker whose task passes its deadline is killed and a fresh one started; a worker
    that dies is replaced and its task reported as ``error``. Workers are plain subprocesses
    (``sys.executable -c ...``), so they never re-import the caller's ``__main__``.

    Args:
        num_workers: worker processes (default: half the CPU cores, at least one).
        timeout_s: deadline of one check, from the moment a worker takes it.
        memory_mb: address-space limit of each worker.
    """

    def __init__(
        self,
        num_workers: int | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        memory_mb: int = WORKER_MEMORY_MB,
    ) -> None:
        import importlib.util

        if importlib.util.find_spec("math_verify") is None:
            raise RuntimeError(
                "math rewards need the math-verify package: pip install 'flowrl[math]' "
                "(or pip install math-verify)"
            )
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.num_workers = num_workers or default_num_workers()
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._pid = os.getpid()
        self.replaced = 0  # workers killed for overrunning or dying; for tests and logs

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers.remove(worker)
        self._workers.append(_Worker(self.memory_mb))
        self.replaced += 1

    def run(
        self, tasks: Sequence[tuple[str | None, str, str]], *, timeout_s: float | None = None
    ) -> list[tuple[RewardStatus, str]]:
        """Check ``(answer or None, response tail, gold)`` tasks in parallel; results in input order."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        results: list[tuple[RewardStatus, str] | None] = [None] * len(tasks)
        with self._lock:
            if os.getpid() != self._pid:
                raise RuntimeError("VerifierPool was created in another process; create a new one after fork")
            while len(self._workers) < self.num_workers:
                self._workers.append(_Worker(self.memory_mb))
            pending = collections.deque(_Task(i, t) for i, t in enumerate(tasks))
            busy: dict[_Worker, _Task] = {}
            while pending or busy:
                for worker in list(self._workers):
                    if pending and worker.ready and worker not in busy:
                        task = pending.popleft()
                        try:
                            worker.conn.send(task.payload)
                        except OSError:  # died while idle: retry the task on a fresh worker
                            pending.appendleft(task)
                            self._replace(worker)
                            continue
                        task.deadline = time.monotonic() + timeout
                        busy[worker] = task
                deadlines = [t.deadline for t in busy.values()]
                wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
                by_conn = {w.conn: w for w in self._workers if w in busy or not w.ready}
                for conn in wait(list(by_conn), timeout=wait_s):
                    worker = by_conn[conn]
                    try:
                        message = conn.recv()
                    except (EOFError, OSError) as exc:
                        if not worker.ready:  # died while starting: a broken install, not one bad answer
                            worker.kill()
                            self._workers.remove(worker)
                            raise RuntimeError(
                                f"a Math-Verify worker exited with code {worker.proc.returncode} while "
                                f"starting; run `{sys.executable} -c 'import math_verify'` to see why"
                            ) from exc
                        task = busy.pop(worker)
                        results[task.index] = (RewardStatus.ERROR, f"verifier worker died ({exc!r})")
                        self._replace(worker)
                        continue
                    if message == "ready":
                        worker.ready = True
                    else:
                        task = busy.pop(worker)
                        results[task.index] = (RewardStatus(message[0]), message[1])
                now = time.monotonic()
                for worker, task in list(busy.items()):
                    if now >= task.deadline:
                        del busy[worker]
                        detail = f"Math-Verify took longer than {timeout:g} s"
                        results[task.index] = (RewardStatus.TIMEOUT, detail)
                        self._replace(worker)
        assert all(r is not None for r in results), "every task gets a result"
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        with self._lock:
            for worker in self._workers:
                worker.kill()
            self._workers.clear()


def default_num_workers() -> int:
    """Half the CPU cores (the other half stays with the trainer), at least one."""
    return max(1, (os.cpu_count() or 2) // 2)


_POOL: VerifierPool | None = None
_POOL_LOCK = threading.Lock()


def get_pool(num_workers: int | None = None) -> VerifierPool:
    """The process-wide verifier pool, created on first use (and re-created after a fork or a resize)."""
    global _POOL
    with _POOL_LOCK:
        want = num_workers or default_num_workers()
        if _POOL is None or _POOL._pid != os.getpid() or _POOL.num_workers != want:
            if _POOL is not None and _POOL._pid == os.getpid():
                _POOL.close()
            _POOL = VerifierPool(want)
        return _POOL


@atexit.register
def _close_pool() -> None:
    if _POOL is not None and _POOL._pid == os.getpid():
        _POOL.close()


# ----------------------------------------------------------------------------------------------
# Public scoring API
# ----------------------------------------------------------------------------------------------


def _as_gold(ground_truth: Any) -> str:
    if isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, int, float)):
        raise ValueError(
            f"math ground_truth must be a string (or a number), got {type(ground_truth).__name__}: "
            f"{ground_truth!r:.80}; store the gold answer as a LaTeX string"
        )
    gold = clean_answer(str(ground_truth))
    if not gold:
        raise ValueError("math ground_truth is empty; every math row needs a gold answer")
    return gold


def _to_result(status: RewardStatus, detail: str, correct_score: float, wrong_score: float) -> RewardResult:
    if status is RewardStatus.CORRECT:
        return RewardResult(correct_score, status, detail)
    if status in (RewardStatus.WRONG, RewardStatus.NO_ANSWER):
        return RewardResult(wrong_score, status, detail)
    return RewardResult(math.nan, status, detail)


def score_many(
    responses: Sequence[str],
    ground_truths: Sequence[Any],
    *,
    correct_score: float = 1.0,
    wrong_score: float | Sequence[float] = 0.0,
    fallback: bool = True,
    timeout_s: float | None = None,
    num_workers: int | None = None,
) -> list[RewardResult]:
    """Score many responses; the Math-Verify checks run in parallel in the worker pool.

    Args:
        responses: N decoded responses.
        ground_truths: N gold answers (LaTeX strings or numbers).
        correct_score: score of a correct answer.
        wrong_score: score of a wrong or missing answer, one value or one per response.
        fallback: use Math-Verify's own extraction when there is no box and no ``Answer:`` line.
        timeout_s: deadline of one check (default :data:`DEFAULT_TIMEOUT_S`).
        num_workers: size of the process-wide pool (default: half the cores).

    Returns:
        N :class:`RewardResult`; a bad ground truth gives status ``error`` for that response only.
    """
    if len(responses) != len(ground_truths):
        raise ValueError(
            f"{len(responses)} responses but {len(ground_truths)} ground truths; pass one per response"
        )
    if isinstance(wrong_score, (int, float)):
        wrong = [float(wrong_score)] * len(responses)
    else:
        wrong = [float(w) for w in wrong_score]
    if len(wrong) != len(responses):
        raise ValueError(f"wrong_score has {len(wrong)} values for {len(responses)} responses")
    out: list[RewardResult | None] = [None] * len(responses)
    todo: list[tuple[int, tuple[str | None, str, str]]] = []
    for i, (response, gt) in enumerate(zip(responses, ground_truths, strict=True)):
        try:
            gold = _as_gold(gt)
        except ValueError as exc:
            out[i] = RewardResult(math.nan, RewardStatus.ERROR, str(exc))
            continue
        found = extract_answer(response)
        if found is None:
            if fallback and response.strip():
                todo.append((i, (None, response[-FALLBACK_TAIL_CHARS:], gold)))
            else:
                detail = "no \\boxed{} and no 'Answer:' line"
                out[i] = _to_result(RewardStatus.NO_ANSWER, detail, correct_score, wrong[i])
            continue
        verdict = _fast_verdict(found.text, gold)
        if verdict is not None:
            out[i] = _to_result(*verdict, correct_score, wrong[i])
        else:
            todo.append((i, (found.text, "", gold)))
    if todo:
        checked = get_pool(num_workers).run([payload for _, payload in todo], timeout_s=timeout_s)
        for (i, _), (status, detail) in zip(todo, checked, strict=True):
            out[i] = _to_result(status, detail, correct_score, wrong[i])
    return [r for r in out if r is not None]


def score(
    response: str,
    ground_truth: Any,
    *,
    correct_score: float = 1.0,
    wrong_score: float = 0.0,
    fallback: bool = True,
    timeout_s: float | None = None,
) -> RewardResult:
    """Score one response and say why: status ``correct``, ``wrong``, ``no_answer``, ``timeout`` or ``error``.

    Bounded in time from outside (see the module docstring); callable from any thread.
    """
    return score_many(
        [response],
        [ground_truth],
        correct_score=correct_score,
        wrong_score=wrong_score,
        fallback=fallback,
        timeout_s=timeout_s,
    )[0]


def is_correct(response: str, ground_truth: str) -> bool:
    """True when the response's final answer is equivalent to ``ground_truth`` (timeouts count as False)."""
    return score(response, ground_truth).status is RewardStatus.CORRECT


def wrong_score_for(data_source: str | None) -> float:
    """-1 for DAPO-style data (FlowRL spec section 5), 0 otherwise."""
    return -1.0 if data_source and "dapo" in data_source.lower() else 0.0


def ground_truth_of(example: Mapping[str, Any]) -> Any:
    """``example["reward_model"]["ground_truth"]`` with an error that names the schema."""
    try:
        return example["reward_model"]["ground_truth"]
    except (KeyError, TypeError):
        raise ValueError(
            "example has no reward_model.ground_truth; rows must follow verl's schema "
            "(see flowrl.data.schema)"
        ) from None


def math_reward(response: str, example: Mapping[str, Any]) -> RewardResult:
    """The math :data:`~flowrl.rewards.base.RewardFn`: 1 correct; -1 (DAPO data) or 0 otherwise."""
    return score(response, ground_truth_of(example), wrong_score=wrong_score_for(example.get("data_source")))
