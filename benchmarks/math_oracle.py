"""The math reward against an external oracle and against hedging, in one command.

    .venv/bin/python benchmarks/math_oracle.py [--json outputs/bench/math_oracle.json]

1. **Oracle**: every verdict stated by the tests of huggingface/Math-Verify (the fixture
   ``tests/rewards/fixtures/math_verify_cases.jsonl``: gold, prediction, expected 0/1, and where each case
   came from) is scored through :func:`flowrl.rewards.math.score_many` with the prediction as the model's
   response. Prints the agreement and, for each disagreement, the rule or non-default Math-Verify option
   that explains it (recorded per case in the fixture; ``tests/rewards/test_math_verify_oracle.py`` checks
   every explanation against Math-Verify itself).
2. **Hedging** (``tests/rewards/fixtures/math_hedges.json``): per answer type, how many hedged responses
   score not correct (for every gold the group names), and how many plain right answers score correct.

Exits with status 1 when agreement is under 95%, a disagreement is unexplained, or a hedge scores correct.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _common import environment, finish

from flowrl.rewards import math as math_rewards
from flowrl.rewards.base import RewardStatus

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "rewards" / "fixtures"
MIN_AGREEMENT = 0.95


def oracle() -> dict[str, Any]:
    cases = [json.loads(line) for line in (FIXTURES / "math_verify_cases.jsonl").read_text().splitlines()]
    start = time.perf_counter()
    results = math_rewards.score_many([c["pred"] for c in cases], [c["gold"] for c in cases])
    seconds = time.perf_counter() - start
    disagreements = []
    for case, result in zip(cases, results, strict=True):
        ours = int(result.status is RewardStatus.CORRECT)
        if ours != case["expected"]:
            note = case["disagreement"] or {"rule": "UNEXPLAINED", "why": result.detail}
            disagreements.append(
                {
                    "id": case["id"],
                    "source": f"{case['source']} ({case['test']})",
                    "expected": case["expected"],
                    "flowrl": ours,
                    "status": result.status.value,
                    **note,
                }
            )
    agree = len(cases) - len(disagreements)
    return {
        "cases": len(cases),
        "commit": cases[0]["commit"],
        "agree": agree,
        "agreement": round(agree / len(cases), 4),
        "seconds": round(seconds, 2),
        "disagreements": disagreements,
        "by_rule": dict(Counter(d["rule"] for d in disagreements)),
    }


def hedging() -> dict[str, Any]:
    groups = json.loads((FIXTURES / "math_hedges.json").read_text())["groups"]
    rows = []
    for group in groups:
        hedges, right = group["hedges"], group["right"]
        scored = 0
        leaks = []
        for gold in group["golds"]:
            for hedge, r in zip(hedges, math_rewards.score_many(hedges, [gold] * len(hedges)), strict=True):
                scored += 1
                if r.status is RewardStatus.CORRECT:
                    leaks.append({"gold": gold, "response": hedge})
        kept = math_rewards.score_many(right, [group["golds"][0]] * len(right))
        rows.append(
            {
                "type": group["type"],
                "gold": group["golds"][0],
                "hedges": scored,
                "hedges_not_correct": scored - len(leaks),
                "leaks": leaks,
                "right": len(right),
                "right_correct": sum(r.status is RewardStatus.CORRECT for r in kept),
            }
        )
    return {"groups": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    env = environment()
    math_rewards.get_pool().run([(("1",), "", "1")])  # start the workers outside the timings

    o = oracle()
    print(
        f"Math-Verify oracle (huggingface/Math-Verify@{o['commit'][:7]} tests/, {o['cases']} cases): "
        f"agreement {o['agree']}/{o['cases']} = {100 * o['agreement']:.1f}% ({o['seconds']} s)"
    )
    print(f"disagreements by reason: {o['by_rule']}")
    for d in o["disagreements"]:
        print(f"  {d['id']} {d['source']}: expected {d['expected']}, FlowRL {d['flowrl']} ({d['status']})")
        print(f"      [{d['rule']}] {d['why']}")

    h = hedging()
    total = sum(g["hedges"] for g in h["groups"])
    rejected = sum(g["hedges_not_correct"] for g in h["groups"])
    right = sum(g["right"] for g in h["groups"])
    kept = sum(g["right_correct"] for g in h["groups"])
    print(
        f"\nhedging: {rejected}/{total} hedged responses not correct; "
        f"{kept}/{right} plain right answers correct"
    )
    print(f"  {'type':16} {'gold':14} {'hedges not correct':>19} {'right correct':>14}")
    for g in h["groups"]:
        print(
            f"  {g['type']:16} {g['gold']:14} {g['hedges_not_correct']:>11}/{g['hedges']:<7} "
            f"{g['right_correct']:>8}/{g['right']:<5}"
        )
        for leak in g["leaks"]:
            print(f"      LEAK: {leak['response']!r} scored correct for gold {leak['gold']!r}")

    finish(env, {"oracle": o, "hedging": h}, args.json)
    unexplained = [d for d in o["disagreements"] if d["rule"] == "UNEXPLAINED"]
    if o["agreement"] < MIN_AGREEMENT or unexplained or rejected < total or kept < right:
        sys.exit(1)


if __name__ == "__main__":
    main()
