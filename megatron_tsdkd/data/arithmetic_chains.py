"""Multi-step arithmetic chains with exact answers: the reasoning task of the CPU demo.

A problem such as ``Compute 7+5-3+8.`` has the worked solution ``7+5=12. 12-3=9. 9+8=17. The answer is 17.``:
one equation per step, each reusing the previous result, then a final answer that ``eval.answers`` can read.
Small enough for a tiny model to learn on CPU in minutes, yet every step depends on the one before, so a model
that skips the rationale fails. Operands are 1..9 and the running total never goes below 0, so every number in
the rationale is a non-negative integer.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

PROMPT_PREFIX = "Compute "


@dataclass(frozen=True)
class ChainProblem:
    start: int
    steps: tuple[tuple[str, int], ...]          # (operator "+" or "-", operand)

    @property
    def prompt(self) -> str:
        return PROMPT_PREFIX + str(self.start) + "".join(f"{op}{value}" for op, value in self.steps) + "."

    @property
    def answer(self) -> int:
        return self.running_totals()[-1]

    def running_totals(self) -> list[int]:
        totals = [self.start]
        for op, value in self.steps:
            totals.append(totals[-1] + value if op == "+" else totals[-1] - value)
        return totals

    @property
    def solution(self) -> str:
        """The worked rationale: one equation per step, then ``The answer is N.``."""
        totals = self.running_totals()
        lines = [f"{totals[i]}{op}{value}={totals[i + 1]}." for i, (op, value) in enumerate(self.steps)]
        return " ".join(lines + [f"The answer is {totals[-1]}."])


def sample_problem(rng: random.Random, min_steps: int, max_steps: int, max_operand: int = 9) -> ChainProblem:
    """One chain with ``min_steps..max_steps`` operations; a subtraction that would go below 0 becomes an addition."""
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    total = rng.randint(1, max_operand)
    start, steps = total, []
    for _ in range(rng.randint(min_steps, max_steps)):
        value = rng.randint(1, max_operand)
        op = rng.choice("+-")
        if op == "-" and value > total:
            op = "+"
        total = total + value if op == "+" else total - value
        steps.append((op, value))
    return ChainProblem(start, tuple(steps))


def make_problems(seed: int, count: int, min_steps: int = 2, max_steps: int = 4,
                  exclude: frozenset[str] | set[str] = frozenset()) -> list[ChainProblem]:
    """``count`` distinct problems from ``seed``, none of whose prompts is in ``exclude`` (keeps eval held out)."""
    rng = random.Random(seed)
    seen: set[str] = set(exclude)
    problems: list[ChainProblem] = []
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise ValueError(f"could not draw {count} distinct problems with {min_steps}..{max_steps} steps")
        problem = sample_problem(rng, min_steps, max_steps)
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            problems.append(problem)
    return problems
