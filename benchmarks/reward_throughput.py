"""Reward throughput: math responses per second and sandboxed programs per second.

    .venv/bin/python benchmarks/reward_throughput.py --json outputs/reward_throughput.json

Math: synthetic responses of realistic length (about 1,500 characters of reasoning, then the answer) with
a mix of answers: the gold verbatim in ``\\boxed{}`` (decided without SymPy), an equivalent form
(fraction vs decimal, radicals, ``x = ...``, an ``Answer:`` line), and wrong answers, all scored through
:func:`flowrl.rewards.math.score_many` (Math-Verify in the worker pool).

With ``--repeats N`` N such batches are scored (the first drawn with seed 0 as before, the others with
other seeds, so no parsed gold is reused from an earlier batch) and the median rate is reported with
every run's rate and the load average, because other jobs share the machine; the CPU time the caller
and the worker processes spend per response (``cpu_ms_per_response``, from ``/proc``) depends much less
on that load. A worker caches parsed golds, so golds repeated within a batch (about 2.3 responses per
gold here; a training batch has a group of samples per prompt) are parsed once.

Code: APPS-style stdin/stdout problems with ``--tests`` tests each and a mix of correct, wrong and
crashing programs, run through :func:`flowrl.rewards.code.run_many` in the bubblewrap sandbox with
``--workers`` concurrent sandboxes. Programs that time out are not in the mix: each would cost its full
time limit, which is a property of the limit, not of the harness.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

from flowrl.rewards import code as code_rewards
from flowrl.rewards import math as math_rewards

FILLER = (
    "We proceed step by step. First we rewrite the expression, then collect like terms and simplify. "
    "Checking the boundary cases confirms the result. "
) * 12  # about 1,500 characters of "reasoning"


def worker_cpu_seconds(pool: math_rewards.VerifierPool) -> float:
    """CPU time (user + system) used so far by the pool's worker processes, from ``/proc``."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for worker in pool._workers:
        try:
            fields = Path(f"/proc/{worker.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / ticks


def math_cases(n: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """``n`` (response, gold) pairs; the mix is documented in the module docstring."""
    responses, golds = [], []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(2, 9)
        kind = i % 6
        if kind == 0:  # verbatim integer
            gold, answer = str(a), f"\\boxed{{{a}}}"
        elif kind == 1:  # fraction vs decimal
            gold, answer = f"\\frac{{{a}}}{{4}}", f"\\boxed{{{a / 4}}}"
        elif kind == 2:  # radical in another form
            gold, answer = f"{b}\\sqrt{{2}}", f"\\boxed{{\\sqrt{{{2 * b * b}}}}}"
        elif kind == 3:  # DAPO answer line with an equation
            gold, answer = str(a), f"Answer: x = {a}"
        elif kind == 4:  # wrong fraction
            gold, answer = f"\\frac{{{a}}}{{{b}}}", f"\\boxed{{\\frac{{{a + 1}}}{{{b}}}}}"
        else:  # wrong interval
            gold, answer = f"[{a}, {a + b})", f"\\boxed{{({a}, {a + b})}}"
        responses.append(FILLER + "\n" + answer)
        golds.append(gold)
    return responses, golds


def code_cases(n: int, num_tests: int, rng: random.Random) -> tuple[list[str], list[dict]]:
    """``n`` programs for "print the sum of the numbers on the line": correct, wrong or crashing."""
    correct = "import sys\nnums = list(map(int, sys.stdin.read().split()))\nprint(sum(nums))\n"
    wrong = "import sys\nnums = list(map(int, sys.stdin.read().split()))\nprint(sum(nums) + 1)\n"
    crash = "import sys\nnums = list(map(int, sys.stdin.read().split()))\nprint(nums[10**9])\n"
    programs, specs = [], []
    for i in range(n):
        inputs, outputs = [], []
        for _ in range(num_tests):
            nums = [rng.randint(-1000, 1000) for _ in range(rng.randint(1, 200))]
            inputs.append(" ".join(map(str, nums)) + "\n")
            outputs.append(f"{sum(nums)}\n")
        programs.append((correct, correct, wrong, crash)[i % 4])
        specs.append({"inputs": inputs, "outputs": outputs})
    return programs, specs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--math-responses", type=int, default=1200)
    parser.add_argument("--programs", type=int, default=80)
    parser.add_argument("--tests", type=int, default=10, help="tests per program")
    parser.add_argument(
        "--workers", type=int, default=2, help="math worker processes and concurrent sandboxes"
    )
    parser.add_argument("--repeats", type=int, default=3, help="times the math batch is scored (median)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    rng = random.Random(0)

    start = time.perf_counter()
    math_rewards.get_pool(args.workers).run([("1", "", "1")] * args.workers)  # start the workers
    math_startup = time.perf_counter() - start
    responses, golds = math_cases(args.math_responses, rng)
    load_start = os.getloadavg()[0]
    pool = math_rewards.get_pool(args.workers)
    runs, cpu = [], []
    for repeat in range(max(1, args.repeats)):
        if repeat:  # new responses and golds: a worker's cache of parsed golds must not carry over
            responses, golds = math_cases(args.math_responses, random.Random(1000 + repeat))
        cpu_start = time.process_time() + worker_cpu_seconds(pool)
        start = time.perf_counter()
        results = math_rewards.score_many(responses, golds, num_workers=args.workers)
        runs.append(time.perf_counter() - start)
        cpu.append(time.process_time() + worker_cpu_seconds(pool) - cpu_start)
    math_s = statistics.median(runs)
    cpu_ms = 1000 * statistics.median(cpu) / len(responses)
    load_end = os.getloadavg()[0]
    math_counts = {
        s: sum(r.status.value == s for r in results) for s in sorted({r.status.value for r in results})
    }

    mode = code_rewards.check_sandbox()
    programs, specs = code_cases(args.programs, args.tests, rng)
    start = time.perf_counter()
    outcomes = code_rewards.run_many(programs, specs, num_workers=args.workers)
    code_s = time.perf_counter() - start
    code_counts = {
        s: sum(o.status.value == s for o in outcomes) for s in sorted({o.status.value for o in outcomes})
    }

    report = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "math": {
            "responses": len(responses),
            "workers": args.workers,
            "seconds": round(math_s, 3),
            "responses_per_s": round(len(responses) / math_s, 1),
            "responses_per_s_runs": [round(len(responses) / t, 1) for t in runs],
            "load_average_1min": [round(load_start, 2), round(load_end, 2)],
            "cpu_ms_per_response": round(cpu_ms, 3),
            "pool_startup_s": round(math_startup, 3),
            "statuses": math_counts,
        },
        "code": {
            "programs": len(programs),
            "tests_per_program": args.tests,
            "workers": args.workers,
            "sandbox": mode,
            "seconds": round(code_s, 3),
            "programs_per_s": round(len(programs) / code_s, 2),
            "statuses": code_counts,
        },
    }
    print(
        f"math: {report['math']['responses_per_s']} responses/s ({len(responses)} in {math_s:.2f} s, "
        f"{args.workers} workers, median of {len(runs)}: {report['math']['responses_per_s_runs']}; "
        f"load {load_start:.2f} -> {load_end:.2f}; {cpu_ms:.2f} CPU ms per response, caller and workers) "
        f"{math_counts}"
    )
    print(
        f"code: {report['code']['programs_per_s']} programs/s ({len(programs)} x {args.tests} tests in "
        f"{code_s:.2f} s, {args.workers} sandboxes, {mode}) {code_counts}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
