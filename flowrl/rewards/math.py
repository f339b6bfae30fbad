"""Math answers: extraction, symbolic equivalence with Math-Verify, hedge rejection, and a time bound.

A math reward is what the policy attacks: every false positive is a reward hack it will find, every false
negative a right answer it is punished for. The rules below are chosen so that a response gets credit
for committing to the right answer in any of the forms models write, and never for hedging.

**1. Extraction** (:func:`extract_answer`, in the calling process, linear time).

* *Where.* When the response has a ``</think>`` and a box or an answer statement after the last one,
  only the text after it counts (the reasoning before it is scratch work); otherwise the whole response.
* *Boxes.* Every complete, non-empty ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces; ``\\boxed 5``
  without braces; a box inside a box is part of the outer one). Empty boxes and a truncated last box are
  ignored (a box holding only spacing, ``\\boxed{\\quad}``, is empty), so ``\\boxed{5} and then
  \\boxed{}`` answers 5. **All boxes count, not only the last**:
  several boxes with different contents are read as one list of answers (Math-Verify joins boxes the
  same way), which is right only when the gold is that list (gold ``1,-2``, boxes ``-2`` and ``1``).
  For a single-answer gold, boxing several different candidates is hedging and scores wrong, and so
  does a self-correction left in boxes (``\\boxed{3} ... no, \\boxed{5}``): box only the final answer.
  Repeating the same answer (``\\boxed{004}`` twice, or ``\\frac12`` and ``0.5``) is one answer.
* *Answer statements.* ``Answer: ...`` at the start of a line (the DAPO format, arXiv 2503.14476) or
  ``Final Answer: ...`` anywhere in a line (the Minerva format, "Final Answer: The final answer is $X$.
  I hope it is correct."); only the last statement counts. It is **the** answer when no box comes after
  it: boxes before it are working (``I first thought \\boxed{24}.\\nAnswer: 42`` answers 42), a box
  inside it is its answer, and boxes after it replace it (only the boxes after it count then). A
  statement written as a sentence is reduced to its answer: the first sentence only (``... $28\\%$.
  I hope it is correct.``; not when the next sentence hedges: ``34. Or 35.``), then, when there is prose,
  the part after the last copula (``n is 34`` -> ``34``, ``The largest $n$ is 34.`` -> ``34``), then,
  when prose is still left, the one number or ``$...$`` formula in it (``Jane started 3 hours ago`` ->
  ``3``; with several, nothing is picked and the sentence will not match). A sentence that negates
  (``5 is not the answer``) is not reduced.
* *Cleaning* (:func:`clean_answer`): surrounding ``$``, ``\\(...\\)``, markdown bold and a trailing period
  are removed; a plain number with thousands separators (``1,000``, ``1{,}000``, ``1\\,000``) loses
  them, but only when its first group has no leading zero (``0,111`` and ``0,500`` are not thousands:
  Math-Verify reads them as the decimals 0.111 and 0.5; ``0\\,500`` or ``0 500``, which it would read
  as 500, score wrong). A number in E notation (``1e+16``, ``1e-05``,
  how Python prints large and small floats) is written out (``10000000000000000``, ``0.00001``; beyond
  an exponent of 100 as ``1 \\times 10^{300}``); Math-Verify would read the ``e`` as Euler's number.
  The same applies to a gold given as a number.
* *Hedges become lists.* ``or``, ``either``, ``and/or``, ``\\lor``, ``\\vee``, ``maybe``, ``perhaps``,
  ``possibly``, ``probably`` (also inside ``\\text{}`` and ``(or ...)`` asides) and LaTeX line breaks
  ``\\\\`` outside an environment split an answer into candidates: ``\\boxed{3 \\text{ (or 4)}}`` is
  the list 3, 4, never 3. A list is right only for a list gold with the same elements (``x = 3 or
  x = 5`` for gold ``3, 5``).
* *Fallback* when there is no box and no statement: Math-Verify's own extraction (its "final answer
  is" anchors, then the last LaTeX or plain expression) on the last :data:`FALLBACK_TAIL_CHARS`
  characters; a single value extracted from a sentence with one of those hedge words (``3 or maybe
  5``) is wrong. If that finds nothing either, the status is ``no_answer``. Pass ``fallback=False`` to
  require a box or an answer statement.

**2. Fast paths** (calling process, never SymPy): identical answers up to spacing and sizing commands
are correct; plain integers are compared as integers (several different integers for an integer gold
are wrong); an integer, decimal or fraction of integers (optionally ``x = ...``) exactly equal to a gold
of that kind is correct (``9.25`` for ``\\frac{37}{4}``), anything else about numbers is left to
Math-Verify. A multiple-choice gold (one letter ``A``-``J``, optionally in parentheses) is compared
with the answer's letter, read strictly: the whole answer must be the letter (``B``, ``b``, ``(B)``,
``B)``, ``\\text{(B)}``, ``Option B``), or a labelled choice followed by its content (``C) 12``,
``(C) 12``, ``C. 12``) whose content names no other choice. ``A and C``, ``A, C``, ``ABCD``, ``A or B``
and ``a = 3`` are not letters and score wrong; so do boxes naming different letters.

**3. Math-Verify** (``math-verify``, huggingface/Math-Verify, the field's standard) in a worker process:
gold and answer are each wrapped as ``\\boxed{...}`` (Skywork-OR1#16: parsing a raw gold can change it),
parsed, then ``verify(gold, answer)`` (gold first: it is asymmetric by design) with its default options
(floats rounded to 6 decimal places, strict variables, no set-relation comparison). This covers fractions
and decimals, radicals, intervals, tuples, sets, ``x = 5`` against ``5``, LaTeX text and units. A range
or set that merely contains the gold (``[4, 6]``, ``\\{4,5,6\\}``, ``5 \\pm 1``, ``x \\ge 5``) is not
equal to it and scores wrong. Several candidates are first deduplicated by equivalence, then joined
into one list. Each worker caches parsed golds (the samples of a prompt share one).

**Time bound.** Math-Verify's own timeouts use ``signal.alarm``, which fails off the main thread, and an
alarm cannot interrupt SymPy inside C code (``9^{9^{9^{9}}}``). So both are disabled and every check runs
in a persistent pool of worker processes (:class:`VerifierPool`) with a deadline per task measured from
the moment a worker takes it; a worker that overruns is killed and replaced, and one that dies is
replaced too (its task is an ``error``). This works from any thread. Answers longer than
:data:`MAX_ANSWER_CHARS` are ``wrong`` without being parsed. Workers are plain subprocesses of this
interpreter (``python -c``, exec'd, so safe when the parent holds CUDA or threads, and they never
re-import the caller's ``__main__`` as multiprocessing's spawn would); a replacement starts in the
background (about 0.3 s to import Math-Verify) while the others keep working.

**Scores** (:func:`score`): ``correct_score`` (1) when correct, ``wrong_score`` otherwise. What the
candidate's answer causes is the candidate's fault and scores ``wrong_score``: a wrong or missing
answer, an answer that does not parse, makes Math-Verify raise or run out of memory, and an answer
that makes the check overrun its deadline (status ``timeout``, still counted separately, so
``\\boxed{(10^{100})!}`` gets DAPO's -1 instead of escaping the update). Only failures of the machinery
or the data leave a sample out (NaN, status ``error``): a worker that died, a missing dependency, a gold
answer that cannot be parsed. See :mod:`flowrl.rewards.base`. :func:`math_reward` is the training
reward: +1/-1 for DAPO data (``data_source`` containing ``"dapo"``, docs/algorithm.md#math; group
normalization removes the scale), 1/0 for everything else (evaluation benchmarks, GSM8K, MATH).
"""

from __future__ import annotations

import atexit
import collections
import decimal
import fractions
import functools
import logging
import math
import numbers
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
FALLBACK_TAIL_CHARS = 20_000
"""The fallback extraction reads this many final characters (about 5,000 tokens; parsing them takes
milliseconds). verl's math_dapo reads 300, which misses a "final answer is" a paragraph before the end."""
WORKER_MEMORY_MB = 4096
"""Address-space limit of a verifier worker; SymPy blowing up then fails fast instead of swapping."""
GOLD_CACHE_SIZE = 4096
"""Parsed gold answers each worker keeps (a training step asks about each gold once per sample)."""
MAX_START_FAILURES = 3
"""Workers of a working pool that may die while starting, in a row, before the pool gives up."""
MAX_DEDUP_PARTS = 16
"""Several candidates are deduplicated by equivalence (pairwise Math-Verify checks) up to this many."""

Task = tuple[tuple[str, ...] | None, str, str]
"""A worker task: (answer candidates, or None for the fallback; response text for the fallback; gold)."""

# ----------------------------------------------------------------------------------------------
# Extraction (pure string code, runs in the caller)
# ----------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)  # a backslash escapes the next character
# An answer statement: "Answer: 42", "**Final Answer:** $42$", "> answer: 42" at the start of a line, or
# "Final Answer: ..." anywhere in a line. Greedy (.*) to the end of the line keeps both linear.
_ANSWER_LINE_RE = re.compile(
    r"^[ \t>*#_]*(?:final[ \t]+)?answer[ \t*_]*[:：][ \t*_]*(.*)$", re.IGNORECASE | re.MULTILINE
)
_FINAL_ANSWER_RE = re.compile(r"final[ \t]+answer[ \t*_]*[:：][ \t*_]*([^\n]*)", re.IGNORECASE)
_THINK_END = "</think>"


@dataclass(frozen=True)
class ExtractedAnswer:
    """The final answer of a response.

    Attributes:
        text: the answer as checked: the candidates joined by ``", "`` (one candidate: that candidate).
        source: ``"boxed"`` (one or more boxes) or ``"answer_line"`` (an ``Answer:`` statement).
        position: where the answer starts in the response.
        parts: the distinct candidates, in order (several: several boxes or a hedge such as ``3 or 4``).
    """

    text: str
    source: str
    position: int
    parts: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Span:
    content: str
    start: int
    end: int


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


def _box_argument(text: str, pos: int, pairs: dict[int, int]) -> tuple[str, int] | None:
    """The argument of ``\\boxed`` whose name ends at ``pos`` and where it ends: a brace group or, like TeX,
    one bare token."""
    n = len(text)
    i = pos
    while i < n and text[i] in " \t":
        i += 1
    if i >= n:
        return None
    if text[i] == "{":
        end = pairs.get(i)
        return None if end is None else (text[i + 1 : end], end + 1)
    j = i
    while j < n and not text[j].isspace() and text[j] not in "$}":
        j += 1
    return (text[i:j], j) if j > i else None


def _all_boxed(text: str) -> list[_Span]:
    """Every complete, non-empty box, outermost only, in order (a truncated one is skipped)."""
    boxes = list(_BOX_RE.finditer(text))
    if not boxes:
        return []
    pairs = _matching_braces(text)
    out: list[_Span] = []
    inside_until = -1
    for m in boxes:
        if m.start() < inside_until:
            continue  # a box inside the previous box is part of its content
        arg = _box_argument(text, m.end(), pairs)
        if arg is None:
            continue
        content, end = arg
        inside_until = end
        if not _is_blank(content):
            out.append(_Span(content, m.start(), end))
    return out


# What a box can hold and still say nothing: spacing commands, empty groups and empty \text{}.
_BLANK_RE = re.compile(
    r"\\(?:q?quad|[,;:! ]|[hv]space\*?\{[^{}]*\}|h?phantom\{[^{}]*\}|(?:text|mbox|mathrm)\s*\{\s*\})"
    r"|~|\{\s*\}|\s|\$|\\(?=\s|$)"
)


def _is_blank(content: str) -> bool:
    """True when a box holds only spacing: ``\\boxed{}``, ``\\boxed{\\quad}``, ``\\boxed{\\text{}}``."""
    previous = None
    while previous != content:
        previous, content = content, _BLANK_RE.sub("", content)
    return not clean_answer(content)


def _last_statement(text: str) -> _Span | None:
    """The last ``Answer:`` statement (line start) or ``Final Answer:`` (anywhere in a line)."""
    best: _Span | None = None
    for regex in (_ANSWER_LINE_RE, _FINAL_ANSWER_RE):
        last = None
        for last in regex.finditer(text):  # noqa: B007 - we want the last one
            pass
        if last is not None and (best is None or last.start(1) > best.start):
            best = _Span(last.group(1), last.start(1), last.end(1))
    return best


_THOUSANDS_SEP = r"(?:\\,|\\;|\\!|\\ |~|\{,\}|,| )"
# The first group has no leading zero: "0,111" and "0,500" are decimals with a comma, not thousands.
_THOUSANDS_RE = re.compile(r"-?[1-9]\d{0,2}(?:" + _THOUSANDS_SEP + r"\d{3})+(?:\.\d+)?")
_THOUSANDS_SEP_RE = re.compile(_THOUSANDS_SEP)
# "0 500", "0\\,111": spaced groups after a leading zero group. Not thousands, and Math-Verify would drop
# the space and read 500; a comma ("0,500") it reads as a decimal comma (0.5), which is left to it.
_ZERO_GROUP_RE = re.compile(r"-?0+(?:(?:\\[,;! ]|~| )\d{3})+(?:\.\d+)?")
# Unambiguous (``\d+(?:\.\d*)?``, not ``\d+\.?\d*``): a failed match on a long run of digits is linear.
_E_NOTATION_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)[eE][+-]?\d{1,3}")
MAX_E_EXPONENT = 100
"""E-notation numbers are written out up to this exponent (``1e+16``); beyond, as ``1 \\times 10^{300}``."""


def _expand_e_notation(s: str) -> str:
    """``1e+16`` -> ``10000000000000000``, ``1e-05`` -> ``0.00001`` (the whole string must be the number)."""
    if not _E_NOTATION_RE.fullmatch(s):
        return s
    value = decimal.Decimal(s)
    if abs(value.adjusted()) > MAX_E_EXPONENT:
        mantissa, _, exponent = s.lower().partition("e")
        return f"{mantissa.lstrip('+')} \\times 10^{{{int(exponent)}}}"
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def clean_answer(answer: str) -> str:
    """Strip what is presentation, not content: ``$...$``, ``\\(...\\)``, bold markers, a trailing period.

    Also removes thousands separators from a plain number whose first group has no leading zero
    (``1\\,000``, ``1{,}000``, ``1 000`` -> ``1000``; ``0,500`` stays), which Math-Verify would otherwise
    read as a product or a list, and writes out a number in E notation (``1e-05`` -> ``0.00001``).
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
    return _expand_e_notation(s)


# --- hedges -----------------------------------------------------------------------------------

# Disjunctions and doubt: the answer names alternatives ("or", also inside \text{} and "(or 4)"; "maybe").
_HEDGE_RE = re.compile(
    r"\\(?:lor|vee)(?![A-Za-z])"
    r"|(?<![A-Za-z\\])(?:and/or|either|or|maybe|perhaps|possibly|probably)(?![A-Za-z])",
    re.IGNORECASE,
)
# A line break "\\" not followed by a letter: "\\left" is a doubly escaped "\left", not a line break.
_LINEBREAK_RE = re.compile(r"\\\\(?![A-Za-z])")
_HEDGE_SPLIT_RE = re.compile(_HEDGE_RE.pattern + "|" + _LINEBREAK_RE.pattern, re.IGNORECASE)
_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|textrm|textit|mbox|mathrm|operatorname)\s*\{([^{}]*)\}")


def _is_hedged(text: str) -> bool:
    """True when ``text`` names alternatives: a disjunction, or a LaTeX line break outside an environment."""
    return bool(_HEDGE_RE.search(text)) or ("\\begin" not in text and bool(_LINEBREAK_RE.search(text)))


def _strip_unbalanced(s: str) -> str:
    """Remove brackets left dangling at the ends by a split (``3 (`` -> ``3``, ``4)`` -> ``4``)."""
    while s:
        opens = s.count("(") + s.count("[")
        closes = s.count(")") + s.count("]")
        if s[-1] in "([" or (s[-1] in ")]" and closes > opens):
            s = s[:-1].rstrip(" ,;:")
        elif s[0] in ")]" or (s[0] in "([" and opens > closes):
            s = s[1:].lstrip(" ,;:")
        else:
            break
    return s


def _candidates(answer: str) -> list[str]:
    """The candidates an answer names: itself, or its alternatives when it hedges (see the module doc)."""
    if not _is_hedged(answer):
        return [answer]
    s = _TEXT_WRAP_RE.sub(r" \1 ", answer)
    out = []
    for piece in _HEDGE_SPLIT_RE.split(s):
        piece = clean_answer(_strip_unbalanced(piece.strip(" \t\n,;:?!")))
        if piece:
            out.append(piece)
    return out or [answer]


# --- answer statements written as sentences ---------------------------------------------------

_SENTENCE_END_RE = re.compile(r"[.!?](?=\s)")
_DOLLAR_SPAN_RE = re.compile(r"(?<!\\)\$[^$]*(?<!\\)\$")
_TEXT_GROUP_RE = re.compile(r"\\(?:text|textbf|textrm|textit|mbox|mathrm)\s*\{[^{}]*\}")
_PROSE_WORD_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")
_CONNECTORS = frozenset({"and", "or", "either"})
_COPULA_RE = re.compile(r"(?<![A-Za-z\\])(?:is|are|was|were|be|equals)(?:\s+equal\s+to)?(?![A-Za-z])", re.I)
_CONTENT_RE = re.compile(r"[0-9\\$]")
_NUMBER_RE = re.compile(r"(?<![A-Za-z0-9.])-?\d+(?:[.,]\d+)*(?:/\d+)?")
# A sentence that takes back or adds to the one before: "34. Or 35.", "34? Maybe 35."
_HEDGE_START_RE = re.compile(
    r"\W*(?:or|either|maybe|perhaps|possibly|probably|alternatively|otherwise)(?![A-Za-z])", re.I
)
_NEGATION_RE = re.compile(
    r"(?<![A-Za-z])(?:not|no|never|neither|nor|cannot|isn't|aren't|can't)(?![A-Za-z])", re.I
)
_QUOTES = "\"'“”‘’`"


def _blank(m: re.Match[str]) -> str:
    return " " * len(m.group())


def _is_prose(s: str) -> bool:
    """True when ``s`` has words outside math: a run of two or more letters that is not a LaTeX command,
    not in ``$...$`` or ``\\text{}``, and not a connective (``and``, ``or``)."""
    outside = _TEXT_GROUP_RE.sub(_blank, _DOLLAR_SPAN_RE.sub(_blank, s))
    return any(w.lower() not in _CONNECTORS for w in _PROSE_WORD_RE.findall(outside))


def _statement_answer(line: str) -> str:
    """The answer in an ``Answer:`` statement (see the module doc).

    Its first sentence (not when the next one starts with a hedge: ``34. Or 35.``); when that is prose
    (and does not negate), the part after the last copula (``The largest $n$ is 34.`` -> ``34``); when
    prose is still left, the one number or ``$...$`` math it contains (``Jane started 3 hours ago`` ->
    ``3``); with several, the text stays as it is and will not match a single answer.
    """
    s = line.replace("\\(", "$").replace("\\)", "$").strip().strip("*_").strip()
    end = _SENTENCE_END_RE.search(_DOLLAR_SPAN_RE.sub(_blank, s))
    if end is not None and not _HEDGE_START_RE.match(s, end.end()):  # "34. Or 35." names two answers
        s = s[: end.start()]
    if not _is_prose(s):
        return s
    if _NEGATION_RE.search(s):
        return s  # "5 is not the answer": no reduction, the sentence itself will not match
    copula = None
    for copula in _COPULA_RE.finditer(_DOLLAR_SPAN_RE.sub(_blank, s)):  # noqa: B007 - the last one
        pass
    if copula is not None:
        right, left = s[copula.end() :], s[: copula.start()]
        if _CONTENT_RE.search(right):
            s = right
        elif _CONTENT_RE.search(left):
            s = left
    s = s.replace('\\"', '"').strip().strip(_QUOTES).strip()
    if _is_prose(s) and not _is_hedged(s):
        maths = {m.group()[1:-1].strip() for m in _DOLLAR_SPAN_RE.finditer(s)}
        numbers = set(_NUMBER_RE.findall(_DOLLAR_SPAN_RE.sub(_blank, s)))
        if len(maths | numbers) == 1:
            return (maths | numbers).pop()
    return re.sub(r"(?<!\\)\$", " ", s).strip()


def _parts_of(spans: Sequence[_Span]) -> list[str]:
    out: list[str] = []
    for span in spans:
        out.extend(_candidates(clean_answer(span.content)))
    return out


def _distinct(parts: Sequence[str]) -> tuple[str, ...]:
    """Candidates without repeats (up to spacing and sizing commands), first occurrence first."""
    seen: set[str] = set()
    out = []
    for p in parts:
        key = _canon(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return tuple(out)


def _answer(parts: Sequence[str], source: str, position: int) -> ExtractedAnswer | None:
    distinct = _distinct([p for p in parts if p])
    if not distinct:
        return None
    return ExtractedAnswer(", ".join(distinct), source, position, distinct)


def extract_answer(response: str) -> ExtractedAnswer | None:
    """Find the final answer of a response: its boxes or its last answer statement (see the module doc).

    Returns None when there is neither (the caller may then use the Math-Verify fallback). The answer's
    candidates are cleaned with :func:`clean_answer`; a hedge (``3 or 4``) or several different boxes
    give several candidates in :attr:`ExtractedAnswer.parts`.
    """
    boxes = _all_boxed(response)
    statement = _last_statement(response)
    think_end = response.rfind(_THINK_END)
    if think_end >= 0:
        after = think_end + len(_THINK_END)
        late_boxes = [b for b in boxes if b.start >= after]
        late_statement = statement if statement is not None and statement.start >= after else None
        if late_boxes or late_statement is not None:
            boxes, statement = late_boxes, late_statement
    if statement is not None and not any(b.start >= statement.end for b in boxes):
        inside = [b for b in boxes if b.start >= statement.start]
        if inside:
            return _answer(_parts_of(inside), "boxed", inside[0].start)
        text = clean_answer(_statement_answer(statement.content))
        found = _answer(_candidates(text), "answer_line", statement.start) if text else None
        if found is not None:
            return found
        # An empty statement ("Answer:") says nothing: the boxes before it are the answer.
    elif statement is not None:
        boxes = [b for b in boxes if b.start >= statement.end]
    if not boxes:
        return None
    return _answer(_parts_of(boxes), "boxed", boxes[0].start)


# ----------------------------------------------------------------------------------------------
# Fast paths (no SymPy)
# ----------------------------------------------------------------------------------------------

_CANON_DROP_RE = re.compile(r"\\left|\\right|\\displaystyle|\\[,;!: ]")
_CANON_SPACE_RE = re.compile(r" ?([^A-Za-z0-9 ]) ?")
_INT_RE = re.compile(r"[+-]?\d+")
_MC_GOLD_RE = re.compile(r"\(?([A-J])\)?")
_MC_TEXT_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_MC_PREFIX = r"(?:(?:[Oo]ption|[Cc]hoice)\s*)?"
# The whole answer is one letter: "B", "b", "(B)", "B)", "Option B".
_MC_BARE_RE = re.compile(_MC_PREFIX + r"\(?([A-Ja-j])\)?")
# A labelled choice and its content: "C) 12", "(c) 12", "C. 12", "C: 12".
_MC_LABELLED_RE = re.compile(_MC_PREFIX + r"(?:\(([A-Ja-j])\)|([A-Ja-j])\)|([A-J])[.:])\s*(.+)", re.DOTALL)
# What the content of a labelled choice must not contain: another choice or a connective.
_MC_OTHER_RE = re.compile(r"(?<![A-Za-z\\])[A-J](?![A-Za-z])|(?<![A-Za-z])(?:and|or)(?![A-Za-z])")


def _canon(s: str) -> str:
    """Spacing and sizing removed: spaces survive only between letters or digits ("1 2" is not "12")."""
    s = " ".join(_CANON_DROP_RE.sub(" ", s).split())
    s = _CANON_SPACE_RE.sub(r"\1", s)
    return s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def _multiple_choice_letter(answer: str) -> str | None:
    """The choice an answer names, read strictly (see the module doc); None when it names none or several."""
    s = _MC_TEXT_RE.sub(r"\1", answer).strip().rstrip(".").strip()
    m = _MC_BARE_RE.fullmatch(s)
    if m:
        return m.group(1).upper()
    m = _MC_LABELLED_RE.fullmatch(s)
    if m and not _MC_OTHER_RE.search(m.group(4)):
        return (m.group(1) or m.group(2) or m.group(3)).upper()
    return None


_ASSIGNMENT_RE = re.compile(r"[A-Za-z]\s*=\s*")
_DECIMAL_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_FRACTION_RE = re.compile(r"([+-]?)(?:\\[dt]?frac\{\s*([+-]?\d+)\s*\}\{\s*(\d+)\s*\}|(\d+)\s*/\s*(\d+))")


def _rational(s: str, *, assignment: bool = False) -> fractions.Fraction | None:
    """An integer, decimal or fraction of integers (``\\frac{3}{4}``, ``3/4``) as an exact number, else None.

    With ``assignment``, one variable may be assigned (``x = 0.75``), which Math-Verify accepts for a
    number. Used only to say "correct" when two numbers are exactly equal (no rounding involved, so
    Math-Verify would say the same); everything else goes to Math-Verify.
    """
    s = s.strip()
    if assignment:
        m = _ASSIGNMENT_RE.match(s)
        if m:
            s = s[m.end() :]
    if len(s) > 100:
        return None
    if _DECIMAL_RE.fullmatch(s):
        return fractions.Fraction(s)
    m = _FRACTION_RE.fullmatch(s)
    if m:
        sign, num, den = m.group(1), m.group(2) or m.group(4), m.group(3) or m.group(5)
        if int(den) != 0:
            value = fractions.Fraction(int(num), int(den))
            return -value if sign == "-" else value
    return None


def _fast_verdict(parts: Sequence[str], gold: str) -> tuple[RewardStatus, str] | None:
    """Decide without SymPy when that is certain; None means "ask Math-Verify"."""
    answer = ", ".join(parts)
    if _canon(answer) == _canon(gold):
        return RewardStatus.CORRECT, "identical"
    if len(answer) > MAX_ANSWER_CHARS:
        return RewardStatus.WRONG, f"answer longer than {MAX_ANSWER_CHARS} characters"
    zero_group = next((p for p in parts if _ZERO_GROUP_RE.fullmatch(p)), None)
    if zero_group is not None:
        return RewardStatus.WRONG, f"{zero_group[:40]!r}: a leading zero group is not a thousands separator"
    mc = _MC_GOLD_RE.fullmatch(gold.strip())
    if mc:
        letters = {_multiple_choice_letter(p) for p in parts}
        if len(letters) > 1:
            return RewardStatus.WRONG, f"several choices {answer[:40]!r}, expected {mc.group(1)}"
        (letter,) = letters
        if letter == mc.group(1):
            return RewardStatus.CORRECT, f"choice {letter}"
        return RewardStatus.WRONG, f"choice {letter or answer[:20]!r}, expected {mc.group(1)}"
    if all(_INT_RE.fullmatch(p) for p in parts) and _INT_RE.fullmatch(gold) and len(gold) <= MAX_ANSWER_CHARS:
        values = {int(p) for p in parts}
        if len(values) > 1:
            return RewardStatus.WRONG, f"several different answers {answer[:40]!r} for one integer"
        return (RewardStatus.CORRECT if values == {int(gold)} else RewardStatus.WRONG), "integer"
    if len(parts) == 1:
        value, target = _rational(parts[0], assignment=True), _rational(gold)
        if value is not None and value == target:
            return RewardStatus.CORRECT, "equal numbers"
    return None


# ----------------------------------------------------------------------------------------------
# Worker side (runs in a child process; Math-Verify timeouts disabled, the parent enforces deadlines)
# ----------------------------------------------------------------------------------------------


def _boxed(s: str) -> str:
    return s if "\\boxed" in s else "\\boxed{" + s + "}"


def _fallback_hedged(text: str, pred: list[Any]) -> bool:
    """True when the fallback's single value comes from a sentence that names alternatives.

    Math-Verify takes the last expression of ``3 or maybe 5``; when it joined the alternatives into a
    set itself (``$5$ or $6$``), the set is compared as it is.
    """
    import sympy

    if isinstance(pred[0], sympy.FiniteSet):
        return False
    found = pred[-1] if isinstance(pred[-1], str) else ""
    at = text.rfind(found) if found else -1
    if at < 0:
        at = max(0, len(text.rstrip()) - 1)
    start = max(text.rfind("\n", 0, at), text.rfind(". ", 0, at)) + 1
    ends = [i for i in (text.find("\n", at + len(found)), text.find(". ", at + len(found))) if i >= 0]
    return _is_hedged(text[start : min(ends) if ends else len(text)])


def _check_answer(parts: tuple[str, ...] | None, text: str, gold_parsed: list[Any]) -> tuple[str, str]:
    """Parse the candidate answer and compare it with the parsed gold; returns ``(status value, detail)``."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    boxed_first = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    if parts is None:
        pred = parse(text, [LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None)
        if not pred:
            return RewardStatus.NO_ANSWER.value, "no \\boxed{}, no 'Answer:' line, no expression at the end"
        if _fallback_hedged(text, pred):
            return (
                RewardStatus.WRONG.value,
                f"hedged: {pred[-1]!s:.60} comes from a sentence naming alternatives",
            )
    elif len(parts) == 1:
        pred = parse(_boxed(parts[0]), boxed_first, parsing_timeout=None)
        if not pred:
            return RewardStatus.WRONG.value, f"answer {parts[0][:80]!r} could not be parsed"
    else:
        parsed = []
        for part in parts:
            one = parse(_boxed(part), boxed_first, parsing_timeout=None)
            if not one:
                return RewardStatus.WRONG.value, f"answer {part[:80]!r} could not be parsed"
            parsed.append((part, one))
        distinct: list[tuple[str, list[Any]]] = []
        for part, one in parsed:
            if len(parsed) <= MAX_DEDUP_PARTS and any(
                verify(other, one, timeout_seconds=None) and verify(one, other, timeout_seconds=None)
                for _, other in distinct
            ):
                continue
            distinct.append((part, one))
        if len(distinct) == 1:
            pred = distinct[0][1]
        else:
            joined = ", ".join(part for part, _ in distinct)
            pred = parse(_boxed(joined), boxed_first, parsing_timeout=None)
            if not pred:
                return RewardStatus.WRONG.value, f"answers {joined[:80]!r} could not be parsed as a list"
            import sympy

            if not isinstance(pred[0], sympy.FiniteSet) or len(pred[0]) < 2:
                # Math-Verify kept one of several different candidates ("4?, 5" -> 5): never a choice.
                return RewardStatus.WRONG.value, f"{len(distinct)} different answers {joined[:60]!r}"
    ok = verify(gold_parsed, pred, timeout_seconds=None)
    shown = str(pred[0])[:80]
    return (RewardStatus.CORRECT if ok else RewardStatus.WRONG).value, f"parsed {shown!r}"


@functools.lru_cache(maxsize=GOLD_CACHE_SIZE)
def _parse_gold(gold: str) -> tuple[Any, ...]:
    """The gold parsed by Math-Verify (as a box), cached per worker: the samples of one prompt share it."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    boxed_first = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return tuple(parse(_boxed(gold), boxed_first, parsing_timeout=None))


def _verify_task(parts: tuple[str, ...] | str | None, text: str, gold: str) -> tuple[str, str]:
    """One Math-Verify check; returns ``(status value, detail)``. ``parts=None`` means use the fallback.

    A failure on the gold is an ``error`` (the data's fault); a failure on the answer is ``wrong`` (the
    candidate's). Missing modules propagate and become ``error`` in the worker loop.
    """
    if isinstance(parts, str):
        parts = (parts,)
    try:
        gold_parsed = list(_parse_gold(gold))
    except ImportError:
        raise
    except Exception as exc:  # noqa: BLE001 - the gold's fault: reported as an error
        return (
            RewardStatus.ERROR.value,
            f"ground truth {str(gold)[:80]!r} raised {type(exc).__name__}: {exc}"[:300],
        )
    if not gold_parsed:
        return RewardStatus.ERROR.value, f"ground truth {gold[:80]!r} could not be parsed by Math-Verify"
    try:
        return _check_answer(parts, text, gold_parsed)
    except ImportError:
        raise
    except Exception as exc:  # noqa: BLE001 - the answer's fault (SymPy recursion, overflow, ...): wrong
        return RewardStatus.WRONG.value, f"Math-Verify failed on the answer: {type(exc).__name__}: {exc}"[
            :300
        ]


def _worker_main() -> None:
    """Entry point of a verifier worker process: ``python -c ... <socket fd> <memory_mb>``.

    Sends ``"ready"`` once Math-Verify is imported, then loops: receive ``(parts, text, gold)``, send
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
    import sympy  # noqa: F401

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
        except Exception as exc:  # noqa: BLE001 - the machinery's fault: reported to the parent as an error
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
    payload: Task
    deadline: float = math.inf


class VerifierPool:
    """Persistent Math-Verify worker processes with a deadline per task, enforced from outside.

    Safe to call from any thread (calls are serialized by a lock; one call scores a whole batch in
    parallel). A worker whose task passes its deadline is killed and a fresh one started; a worker
    that dies is replaced and its task reported as ``error``; one that dies while starting is restarted
    (a broken install instead raises, see :meth:`_started_worker_died`). Workers are plain subprocesses
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
        self._ever_ready = False  # a worker has started here once: the install works
        self._start_failures = 0  # workers that died while starting since the last one started

    @property
    def all_ready(self) -> bool:
        """Every worker is started and has reported ready (each check then pays no start-up)."""
        with self._lock:
            return len(self._workers) == self.num_workers and all(w.ready for w in self._workers)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers.remove(worker)
        self._workers.append(_Worker(self.memory_mb))
        self.replaced += 1

    def run(self, tasks: Sequence[Task], *, timeout_s: float | None = None) -> list[tuple[RewardStatus, str]]:
        """Check ``(answer candidates or None, response tail, gold)`` tasks in parallel; results in input
        order. A task that passes its deadline gets status ``timeout``, a task whose worker died ``error``."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        results: list[tuple[RewardStatus, str] | None] = [None] * len(tasks)
        with self._lock:
            if os.getpid() != self._pid:
                raise RuntimeError("VerifierPool was created in another process; create a new one after fork")
            while len(self._workers) < self.num_workers:
                self._workers.append(_Worker(self.memory_mb))
            pending = collections.deque(_Task(i, t) for i, t in enumerate(tasks))
            busy: dict[_Worker, _Task] = {}
            try:
                self._run_loop(pending, busy, results, timeout)
            except BaseException:
                # Workers still holding a task would answer it into the next call: stop them.
                for worker in busy:
                    worker.kill()
                    self._workers.remove(worker)
                raise
        assert all(r is not None for r in results), "every task gets a result"
        return results  # type: ignore[return-value]

    def _run_loop(
        self,
        pending: collections.deque[_Task],
        busy: dict[_Worker, _Task],
        results: list[tuple[RewardStatus, str] | None],
        timeout: float,
    ) -> None:
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
                    if not worker.ready:
                        self._started_worker_died(worker, exc)
                        continue
                    task = busy.pop(worker)
                    results[task.index] = (RewardStatus.ERROR, f"verifier worker died ({exc!r})")
                    self._replace(worker)
                    continue
                if message == "ready":
                    worker.ready = True
                    self._ever_ready = True
                    self._start_failures = 0
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

    def _started_worker_died(self, worker: _Worker, exc: BaseException) -> None:
        """A worker died before saying "ready". Before any worker of this pool started, or three times in a
        row, that is a broken install: raise. Otherwise (killed from outside while starting, e.g. by
        the OOM killer) start another one."""
        if not self._ever_ready or self._start_failures >= MAX_START_FAILURES:
            worker.kill()
            self._workers.remove(worker)
            raise RuntimeError(
                f"a Math-Verify worker exited with code {worker.proc.returncode} while starting; run "
                f"`{sys.executable} -c 'import math_verify'` to see why"
            ) from exc
        self._start_failures += 1
        self._replace(worker)

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
    """The gold answer as LaTeX text. Numbers are written out in full: ``1e16`` is ``10000000000000000``
    (``str(1e16)`` is ``1e+16``, which Math-Verify reads with Euler's e)."""
    if isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, numbers.Real)):
        raise ValueError(
            f"math ground_truth must be a string (or a number), got {type(ground_truth).__name__}: "
            f"{ground_truth!r:.80}; store the gold answer as a LaTeX string"
        )
    if isinstance(ground_truth, numbers.Integral):  # int, numpy integers
        text = str(int(ground_truth))
    elif isinstance(ground_truth, numbers.Real):  # float, numpy floats (whose repr is "np.float64(...)")
        value = float(ground_truth)
        if not math.isfinite(value):
            raise ValueError(f"math ground_truth is not a finite number: {ground_truth!r}")
        text = repr(value)
    else:
        text = str(ground_truth)
    gold = clean_answer(text)
    if not gold:
        raise ValueError("math ground_truth is empty; every math row needs a gold answer")
    return gold


def _to_result(status: RewardStatus, detail: str, correct_score: float, wrong_score: float) -> RewardResult:
    """Correct -> ``correct_score``; wrong, no answer and timeout (the answer's fault) -> ``wrong_score``;
    error (the machinery's or the data's fault) -> NaN."""
    if status is RewardStatus.CORRECT:
        return RewardResult(correct_score, status, detail)
    if status in (RewardStatus.WRONG, RewardStatus.NO_ANSWER, RewardStatus.TIMEOUT):
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
        wrong_score: score of a wrong or missing answer and of a timeout, one value or one per response.
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
    todo: list[tuple[int, Task]] = []
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
        verdict = _fast_verdict(found.parts, gold)
        if verdict is not None:
            out[i] = _to_result(*verdict, correct_score, wrong[i])
        else:
            todo.append((i, (found.parts, "", gold)))
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
    """-1 for DAPO-style data (docs/algorithm.md#math), 0 otherwise."""
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
    """The math :data:`~flowrl.rewards.base.RewardFn`: 1 correct; -1 (DAPO data) or 0 otherwise (a timeout
    included)."""
    return score(response, ground_truth_of(example), wrong_score=wrong_score_for(example.get("data_source")))
