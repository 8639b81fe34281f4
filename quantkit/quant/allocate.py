"""Choosing one storage option per tensor under a byte budget: a multiple-choice knapsack.

    allocate({tensor: [Option(label, nbytes, cost), ...]}, budget_bytes) -> Allocation

`cost` is what the choice adds to the objective (e.g. the measured KL divergence of the model with only that
tensor quantized that way); costs are assumed additive over tensors. The greedy starts from every tensor's
smallest option and spends the budget on upgrades along each tensor's lower convex hull of (bytes, cost), best
cost saved per byte first — optimal for the relaxed problem up to the last upgrade — then spends what is left on
the single upgrade (hull or not) that saves the most cost and still fits, until none fits.

The greedy's loss is at most one upgrade, which is small when every tensor is a small part of the budget but not
when a few are large (a small model's embedding and output matrices hold most of its bytes, and an upgrade of one
that no longer fits leaves its bytes to upgrades worth far less). So the `exact` tensors with the widest byte range
are chosen by enumeration: every combination of their options, the greedy for the rest in what remains, the best
total kept (the plain greedy's answer is one of the candidates: never worse than it).
Deterministic: ties go to the earlier tensor, then the smaller option, then the plain greedy.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

from quantkit.errors import SchemeError


@dataclass(frozen=True)
class Option:
    label: str  # e.g. a ggml type name
    nbytes: int
    cost: float


@dataclass
class Allocation:
    choice: dict[str, Option]  # tensor -> chosen option
    budget_bytes: int

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.choice.values())

    @property
    def cost(self) -> float:
        return sum(o.cost for o in self.choice.values())

    def labels(self) -> dict[str, str]:
        return {name: o.label for name, o in self.choice.items()}


def lower_hull(options: list[Option]) -> list[Option]:
    """The options on the lower convex hull of (bytes, cost), by increasing bytes and decreasing cost (dominated
    options — no cheaper in cost than a smaller one — are dropped)."""
    pts: list[Option] = []
    for o in sorted(options, key=lambda o: (o.nbytes, o.cost)):
        if pts and o.cost >= pts[-1].cost:
            continue  # dominated: as large or larger, no better
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # keep b only if it lies strictly below the segment a -> o
            if (b.cost - a.cost) * (o.nbytes - a.nbytes) < (o.cost - a.cost) * (b.nbytes - a.nbytes):
                break
            pts.pop()
        pts.append(o)
    return pts


def allocate(options: dict[str, list[Option]], budget_bytes: int, exact: int = 2) -> Allocation:
    """The option of every tensor with the least total cost whose bytes fit `budget_bytes` (see the module text;
    `exact`: how many of the widest tensors are enumerated). SchemeError when even the smallest options do not fit,
    or a tensor has none."""
    for name, opts in options.items():
        if not opts:
            raise SchemeError(f"{name}: no storage option to choose from")
    smallest = {name: min(o.nbytes for o in opts) for name, opts in options.items()}
    if sum(smallest.values()) > budget_bytes:
        raise SchemeError(f"budget of {budget_bytes:,} bytes is below the smallest choice of every tensor "
                          f"({sum(smallest.values()):,} bytes)")
    hulls = {name: lower_hull(opts) for name, opts in options.items()}
    best = _greedy(options, budget_bytes, hulls)
    wide = sorted(options, key=lambda n: -(max(o.nbytes for o in options[n]) - smallest[n]))[:exact]
    rest = {name: opts for name, opts in options.items() if name not in wide}
    rest_hulls = {name: hulls[name] for name in rest}
    rest_smallest = sum(smallest[name] for name in rest)
    for combo in itertools.product(*(sorted(options[n], key=lambda o: (o.nbytes, o.cost)) for n in wide)):
        left = budget_bytes - sum(o.nbytes for o in combo)
        if left < rest_smallest:
            continue
        picked = dict(zip(wide, combo))
        if rest:
            picked.update(_greedy(rest, left, rest_hulls).choice)
        if sum(o.cost for o in picked.values()) < best.cost:
            best = Allocation({name: picked[name] for name in options}, budget_bytes)
    return best


def _greedy(options: dict[str, list[Option]], budget_bytes: int,
            hulls: dict[str, list[Option]] | None = None) -> Allocation:
    """The hull greedy and the final single upgrades (the module text); the smallest options must fit. `hulls`:
    each tensor's `lower_hull`, when the caller has them."""
    hulls = hulls or {name: lower_hull(opts) for name, opts in options.items()}
    choice = {name: hull[0] for name, hull in hulls.items()}
    smallest = sum(o.nbytes for o in choice.values())
    order = {name: i for i, name in enumerate(options)}
    step = {name: 0 for name in options}
    heap: list[tuple[float, int, str]] = []

    def push(name: str) -> None:
        hull, k = hulls[name], step[name]
        if k + 1 < len(hull):
            cur, nxt = hull[k], hull[k + 1]
            heapq.heappush(heap, (-(cur.cost - nxt.cost) / max(nxt.nbytes - cur.nbytes, 1), order[name], name))

    for name in options:
        push(name)
    left = budget_bytes - smallest
    while heap:
        _, _, name = heapq.heappop(heap)
        cur, nxt = hulls[name][step[name]], hulls[name][step[name] + 1]
        if nxt.nbytes - cur.nbytes > left:
            continue  # this tensor's next upgrade does not fit; smaller upgrades of others may
        left -= nxt.nbytes - cur.nbytes
        step[name] += 1
        choice[name] = nxt
        push(name)
    while True:  # spend the rest on the best single upgrade that fits (any option, hull or not)
        best = None
        for name, opts in options.items():
            cur = choice[name]
            for o in opts:
                gain = cur.cost - o.cost
                if gain > 0 and o.nbytes - cur.nbytes <= left and (best is None or gain > best[0]):
                    best = (gain, name, o)
        if best is None:
            break
        _, name, o = best
        left -= o.nbytes - choice[name].nbytes
        choice[name] = o
    return Allocation(choice, budget_bytes)
