"""Prompt templates: how a problem becomes the chat messages in a row's ``prompt``.

``dapo``   the DAPO template (arXiv 2503.14476; the prompt of every row of DAPO-Math-17k, which FlowRL
           trains on): asks for a last line ``Answer: $Answer``; the math reward reads that line.
``boxed``  asks for the final answer in ``\\boxed{}`` (the prompt recommended for Qwen2.5-Math and
           DeepSeek-R1 evaluation; Math-Verify reads the last ``\\boxed{}``). Used for math evaluation.
``code``   the problem, how the program is run (stdin/stdout or the function to write, with the
           starter code), and a request for the solution in one ```python block (the code reward
           takes the last fenced block, docs/algorithm.md#code).
``raw``    the problem text as published, nothing added.

Every template gives a single user message; the chat template of the model is applied later.
"""

from __future__ import annotations

from flowrl.data.converters import DAPO_PREFIX, DAPO_SUFFIX, Problem

TEMPLATES: dict[str, str] = {
    "dapo": "math: the DAPO prompt asking for a final line 'Answer: $Answer'",
    "boxed": "math: reason step by step and put the final answer within \\boxed{}",
    "code": "code: the problem, how it is run, and the solution in one ```python block",
    "raw": "the problem text as published",
}

# Which templates make sense for which ability.
TEMPLATES_FOR_ABILITY: dict[str, tuple[str, ...]] = {
    "math": ("dapo", "boxed", "raw"),
    "code": ("code", "raw"),
}

BOXED_SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."

CODE_BLOCK_REQUEST = "Write your final solution in one ```python code block at the end of your response."


def check_template(template: str, ability: str) -> None:
    """Raise ``ValueError`` naming the allowed templates when ``template`` does not fit ``ability``."""
    allowed = TEMPLATES_FOR_ABILITY.get(ability, tuple(TEMPLATES))
    if template not in allowed:
        raise ValueError(
            f"template {template!r} does not apply to {ability} problems; "
            f"use --template with one of {list(allowed)}"
        )


def _code_prompt(problem: Problem) -> str:
    if problem.test_format == "test_code":  # HumanEval: the problem is the function to complete
        return (
            "Complete the following Python function.\n\n"
            f"```python\n{problem.text.rstrip()}\n```\n\n"
            "Write the complete function, signature included. " + CODE_BLOCK_REQUEST
        )
    parts = [problem.text.rstrip()]
    if problem.test_format == "function" and problem.starter_code.strip():
        parts.append(
            "Use the following starter code; your solution is called as the function "
            f"`{problem.fn_name}` with the test arguments, and its return value is checked.\n\n"
            f"```python\n{problem.starter_code.rstrip()}\n```"
        )
    elif problem.test_format == "function":
        parts.append(
            f"Implement a Python function `{problem.fn_name}`; it is called with the test arguments and "
            "its return value is checked."
        )
    else:
        parts.append(
            "Write a Python 3 program that reads the input from standard input and prints the answer to "
            "standard output."
        )
    parts.append(CODE_BLOCK_REQUEST)
    return "\n\n".join(parts)


def render_prompt(template: str, problem: Problem) -> list[dict[str, str]]:
    """The chat messages for ``problem`` under ``template``.

    Args:
        template: one of :data:`TEMPLATES`.
        problem: a converted problem (see :class:`flowrl.data.converters.Problem`).

    Returns:
        ``[{"role": "user", "content": ...}]``.
    """
    if template == "dapo":
        content = DAPO_PREFIX + problem.text + DAPO_SUFFIX
    elif template == "boxed":
        content = problem.text + BOXED_SUFFIX
    elif template == "code":
        content = _code_prompt(problem)
    elif template == "raw":
        content = problem.text
    else:
        raise ValueError(f"unknown template {template!r}; choose one of {list(TEMPLATES)}")
    return [{"role": "user", "content": content}]
