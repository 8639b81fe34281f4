"""Coordinate descent on the codes after GPTQ (`quant/gptq.refine_codes`): the lazy, blocked implementation against
a plain one that recomputes the whole loss for every candidate move, and the refined result on every grid."""

from __future__ import annotations

import pytest
import torch

from quantkit.gguf.grids import ggml_grid, gptq_round
from quantkit.quant.grid import IntGrid
from quantkit.quant.gptq import GPTQ, proxy_loss, refine_codes
from quantkit.quant.scheme import Scheme, get_preset


def problem(out_f: int, in_f: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8 * in_f, in_f, generator=g) @ (0.3 * torch.randn(in_f, in_f, generator=g) + torch.eye(in_f))
    return 0.05 * torch.randn(out_f, in_f, generator=g), x


def plain_descent(w, q, H, grid, params_list, sweeps):
    """Weight by weight in column order, each move taken when the whole loss, recomputed, goes down."""
    q = q.clone()
    gs = grid.group_size
    loss = lambda m: float(((w - m) @ H * (w - m)).sum())  # noqa: E731
    moves = 0
    for _ in range(sweeps):
        moved = 0
        for j in range(q.shape[1]):
            down, up = grid.neighbours(q[:, j:j + 1], params_list[j // gs], j % gs)
            for r in range(q.shape[0]):
                best, choice = loss(q), None
                for v in (float(down[r, 0]), float(up[r, 0])):
                    if v != v:  # NaN: no neighbour
                        continue
                    trial = q.clone()
                    trial[r, j] = v
                    if loss(trial) < best:
                        best, choice = loss(trial), v
                if choice is not None:
                    q[r, j] = choice
                    moved += 1
        moves += moved
        if not moved:
            break
    return q, moves


def test_lazy_blocked_descent_equals_the_plain_one():
    w, x = problem(5, 64)
    H = (x.T @ x / x.shape[0]).double()
    H += 0.01 * H.diagonal().mean() * torch.eye(64, dtype=H.dtype)
    grid = IntGrid(Scheme(bits=3, group_size=32, symmetric=False, scale_dtype="float32"), 64)
    params = [grid.fit(w[:, c:c + 32]) for c in range(0, 64, 32)]
    params = [type(p)(p.scale.double(), p.zero.double()) for p in params]
    q = torch.cat([grid.fake_quant(w[:, c:c + 32].double(), params[c // 32]) for c in range(0, 64, 32)], dim=1)
    ours, moves = refine_codes(w.double(), q, H, grid, params, sweeps=3, block_size=16)  # blocks inside groups
    theirs, their_moves = plain_descent(w.double(), q, H, grid, params, sweeps=3)
    assert moves == their_moves > 0
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("target", ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_XS", "Q4_0", "w4a16-g128", "w3a16-g128"])
def test_refined_gptq_lowers_its_loss_and_stays_on_the_grid(target):
    w, x = problem(64, 256, seed=1)
    gptq = GPTQ(256)
    gptq.add_batch(x)
    H = gptq.hessian().clone()
    grid = get_preset(target) if target.startswith("w") else target
    options = dict(damp=0.1, block_size=128, group_aware=True)
    plain, _ = gptq_round(gptq, w, grid, "w", **options)
    refined, info = gptq_round(gptq, w, grid, "w", refine_sweeps=2, **options)
    assert info.extra["refine_sweeps"] == 2 and info.extra["refine_moved"] > 0
    assert proxy_loss(w, refined.dequantize(), H) < 0.95 * proxy_loss(w, plain.dequantize(), H)
    if not target.startswith("w"):
        assert refined.error["off_grid_weights"] == 0  # every moved value is one of its block's own values
    else:
        assert torch.equal(refined.scales, plain.scales) and torch.equal(refined.zeros, plain.zeros)


@pytest.mark.parametrize("target", ["Q4_K", "Q6_K", "IQ4_XS", "Q4_1"])
def test_neighbours_are_the_next_codes_of_the_block(target):
    grid = ggml_grid(target)
    w = 0.05 * torch.randn(16, grid.group_size, generator=torch.Generator().manual_seed(2))
    params = grid.fit(w)
    q = grid.fake_quant(w, params)
    down, up = grid.neighbours(q, params)
    has_down, has_up = ~torch.isnan(down), ~torch.isnan(up)
    assert bool(has_down.any()) and bool(has_up.any())
    # the codes below and above: on either side of the value (which side is which follows the scale's sign)
    both = has_down & has_up
    assert bool(((down[both] - q[both]) * (up[both] - q[both]) < 0).all())
    assert bool((down[has_down] != q[has_down]).all()) and bool((up[has_up] != q[has_up]).all())
    assert torch.equal(grid.fake_quant(torch.where(has_down, down, q), params), torch.where(has_down, down, q))
    assert torch.equal(grid.fake_quant(torch.where(has_up, up, q), params), torch.where(has_up, up, q))
    # nothing lies between a value and its neighbours: a point between rounds to one of the two
    between = grid.fake_quant(torch.where(has_up, 0.6 * q + 0.4 * up, q), params)
    assert bool(((between == q) | (between == torch.where(has_up, up, q))).all())
