"""The in-rationale progressive schedule c_i(t) (METHOD.md KPOD 4).

c_i(t) = number of leading rationale steps of question i given as input at stage t. The student learns the steps
after them, whose difficulty is H(t) = sum_i sum_{k >= c_i(t)} d_ik. Budget:

    D(t) = B (0.3 + 0.7 (t / T)^1.5),   B = sum_i sum_k d_ik,   T = epochs / 2;   c_i(0) = n_i - 1,  c_i(t >= T) = 0

At each stage 0 < t < T a set S of questions moves down one step (q_i = 1): the knapsack

    max_S  F(S) = -(dD - dH(S)) + beta_div sum_clusters sqrt(|C_c ∩ S|)   s.t.  dH(S) <= dD = D(t) - H(t-1)

solved by lazy density greedy (marginal F gain per unit difficulty) and the best feasible singleton, whichever has
the larger F. Budget left unused stays in dD of the next stage (the shortfall carries over, since dD is measured
against the H actually reached). At t >= T every c_i is 0: D(T) = B, the whole rationale.
"""
from __future__ import annotations

import heapq
import math
from typing import Sequence


def budget_fraction(t: int, T: float) -> float:
    return 0.3 + 0.7 * min(t / T, 1.0) ** 1.5


def _objective(selected: Sequence[int], costs, clusters, budget: float, beta: float) -> float:
    counts: dict[int, int] = {}
    for i in selected:
        counts[clusters[i]] = counts.get(clusters[i], 0) + 1
    return -(budget - sum(costs[i] for i in selected)) + beta * sum(math.sqrt(n) for n in counts.values())


def select(costs: dict[int, float], clusters: Sequence[int], budget: float, beta: float) -> list[int]:
    """The questions to advance: lazy greedy on (marginal F gain) / cost under the budget, or the best singleton."""
    counts: dict[int, int] = {}
    chosen, spent = [], 0.0

    def gain(i):
        n = counts.get(clusters[i], 0)
        return costs[i] + beta * (math.sqrt(n + 1) - math.sqrt(n))

    heap = [(-gain(i) / max(costs[i], 1e-12), i) for i in sorted(costs)]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        if spent + costs[i] > budget:
            continue
        fresh = -gain(i) / max(costs[i], 1e-12)
        if heap and fresh > heap[0][0]:          # stale: re-queue with its current density
            heapq.heappush(heap, (fresh, i))
            continue
        chosen.append(i)
        spent += costs[i]
        counts[clusters[i]] = counts.get(clusters[i], 0) + 1
    feasible = [i for i in costs if costs[i] <= budget]
    if feasible:
        single = max(feasible, key=lambda i: _objective([i], costs, clusters, budget, beta))
        if _objective([single], costs, clusters, budget, beta) > _objective(chosen, costs, clusters, budget, beta):
            return [single]
    return sorted(chosen)


def learned_difficulty(difficulties: Sequence[Sequence[float]], given: Sequence[int]) -> float:
    return sum(sum(d[c:]) for d, c in zip(difficulties, given))


def progressive_schedule(difficulties: Sequence[Sequence[float]], clusters: Sequence[int], epochs: int,
                         beta_div: float = 12.0, use_progression: bool = True) -> dict:
    """{"T", "budget": [D(t)], "learned": [H(t)], "given": [[c_i(t)] per stage t = 0..epochs-1]}."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    n = [len(d) for d in difficulties]
    T = epochs / 2
    total = sum(sum(d) for d in difficulties)
    given = [max(k - 1, 0) for k in n] if use_progression else [0] * len(n)
    stages, budgets, learned = [], [], []
    for t in range(epochs):
        budget = total * budget_fraction(t, T)
        if t >= T or not use_progression:
            given = [0] * len(n)
        elif t > 0:
            room = budget - learned_difficulty(difficulties, given)
            costs = {i: difficulties[i][given[i] - 1] for i in range(len(n)) if given[i] > 0}
            for i in select(costs, clusters, room, beta_div):
                given[i] -= 1
        stages.append(list(given))
        budgets.append(budget)
        learned.append(learned_difficulty(difficulties, given))
    return {"T": T, "total": total, "budget": budgets, "learned": learned, "given": stages}
