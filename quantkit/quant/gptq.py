"""GPTQ: second-order (OBS) rounding of one weight matrix with error feedback, onto any `Grid`.

Algorithm (Frantar et al. 2022; docs/algorithms.md §2.1), with the conventions of the reference implementations:

    H = 2/n Σ x xᵀ over the n calibration tokens (fp32)         -- `GPTQ.add_batch`, `GPTQ.hessian`
    dead columns (H_ii == 0): H_ii = 1, W[:, i] = 0
    damp · mean(diag H) added to the diagonal (damp 0.01 here as in the paper; quantkit's runs default to 0.1;
        ×10 on Cholesky failure, up to 1×mean; fp64 fallback)
    U = upper Cholesky factor of H⁻¹
    for each block of 128 columns (lazy batch updates), for each column i in the block:
        q_i = grid.fake_quant(w_i);  e_i = (w_i − q_i) / U_ii;  w_j −= e_i U_ij for the later columns j
    act-order: columns processed by descending H_ii; with static groups the parameters come from the original
    contiguous groups (trivial g_idx), otherwise from the permuted, error-updated groups (g_idx stored).
    group-aware (GPTQModel's act_group_aware, from Gafni et al. 2025, "GAR"): the groups processed by descending
    largest H_ii, each group's columns by descending H_ii; each group's parameters are fitted when it starts, on its
    error-updated weights, and the groups stay contiguous (trivial g_idx).

Differences from GPTQModel 7.6 (same result up to fp32 rounding order unless noted):
- Computation runs on Wᵀ (columns contiguous) and each 128-column block is split into sub-blocks of 16 columns:
  rank-1 updates stay inside the sub-block, a matmul updates the rest of the block. Same arithmetic, less memory
  traffic than per-column updates over the whole block.
- U is computed as J·L⁻¹·J with L = chol(J H J) (J reverses the order): one Cholesky and one triangular inverse
  instead of Cholesky, cholesky_inverse and a second Cholesky. Same factor (uniqueness of Cholesky).
- The Hessian is accumulated as a raw sum over tokens (n = tokens, like GPTQModel; IST-DASLab counts sequences;
  the normalisation does not change the result), computing only the lower block triangle for large inputs.
- Scales are rounded to the scheme's storage dtype when fitted, so error feedback uses the stored values.
- Damping retries multiply by 10 (GPTQModel adds 0.0015 steps and then floors the diagonal).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from quantkit.errors import CalibrationError, QuantkitError
from quantkit.quant.grid import Grid, make_grid
from quantkit.quant.scheme import Scheme
from quantkit.tensors import GGMLTensor, QuantTensor, all_finite, check_finite

SUB_BLOCK = 16
_SMALL_OP_ELEMENTS = 1 << 15  # rows per column below which per-column ops run single-threaded on CPU
_SYM_BLOCK = 1024  # Hessian accumulation computes only lower-triangle blocks of this size (inputs >= 2 blocks)
_BF16_BAND = 2 * _SYM_BLOCK  # rows per bf16 matmul of the lower triangle (a multiple of _SYM_BLOCK)


def _add_gram_bf16(out: torch.Tensor, x: torch.Tensor) -> None:
    """out (fp32, [n, n]) += xᵀx for bf16 inputs x [tokens, n] (a bf16 calibration forward): bf16 matmuls (exact
    products summed in fp32 inside the kernel: AMX / AVX512-BF16 / tensor cores) over row bands of _BF16_BAND
    columns of the lower triangle (what hessian() mirrors), each rounded once to bf16 before the fp32 sum: a
    relative error of at most 2⁻⁹ per batch term, averaging out over the batches. xᵀ is made contiguous once: the
    bf16 kernels are several times slower on a transposed view."""
    n = x.shape[1]
    xt = x.t().contiguous()
    if n < 2 * _SYM_BLOCK:
        out.add_(xt @ x)
        return
    for i in range(0, n, _BF16_BAND):
        end = min(i + _BF16_BAND, n)
        out[i:end, :end].add_(xt[i:end] @ x[:, :end])


class HessianError(QuantkitError):
    """The Hessian is unusable (non-finite, or not positive definite even after maximal damping)."""


@dataclass
class GPTQInfo:
    loss: float  # tr((W−Q) H (W−Q)ᵀ) with the damped Hessian (= Σ of squared scaled errors)
    damp: float  # fraction of mean(diag H) added to the diagonal
    damp_retries: int
    fp64: bool
    dead_columns: int
    seconds: float
    n_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)

class GPTQ:
    """Collects the Hessian of one linear's input and quantizes weights against it.

    `GPTQ(in_features)`; `add_batch(x [..., in])` for each calibration batch; then
    `quantize(weight, grid_or_scheme, ...)`. One GPTQ object may quantize several weights that share the input
    (q/k/v, gate/up); the inverse-Hessian factor is cached between calls with the same settings.
    """

    def __init__(self, in_features: int, name: str = "linear", device: torch.device | str | None = None):
        self.in_features = in_features
        self.name = name
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=self.device)
        self.n_tokens = 0
        self._finalized = False
        self._factor_cache: dict[tuple, tuple] = {}

    # ---- Hessian ----

    def add_batch(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise CalibrationError(f"{self.name}: calibration input has {x.shape[-1]} features, "
                                   f"expected {self.in_features}")
        x = x.reshape(-1, self.in_features).to(self.device)
        if x.dtype != torch.bfloat16:
            x = x.float()
        if x.shape[0] == 0:
            return
        if self._finalized:  # more data after hessian(): go back to the raw sum
            self._sum.mul_(self.n_tokens / 2.0)
            self._finalized = False
            self._factor_cache.clear()
        n = self.in_features
        if x.dtype == torch.bfloat16:
            _add_gram_bf16(self._sum, x)
        elif n < 2 * _SYM_BLOCK:
            self._sum.addmm_(x.t(), x)
        else:  # only blocks on or below the diagonal; mirrored in hessian()
            for i in range(0, n, _SYM_BLOCK):
                xi = x[:, i:i + _SYM_BLOCK]
                for j in range(0, i + 1, _SYM_BLOCK):
                    self._sum[i:i + _SYM_BLOCK, j:j + _SYM_BLOCK].addmm_(xi.t(), x[:, j:j + _SYM_BLOCK])
        self.n_tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = 2/n Σ x xᵀ (the internal buffer, finalized in place; do not modify)."""
        if self._sum is None:
            raise CalibrationError(f"{self.name}: the Hessian was released after the last weight that used it")
        if self.n_tokens == 0:
            raise CalibrationError(f"{self.name}: no calibration tokens were seen (add_batch was never called "
                                   "with data); cannot run GPTQ")
        if not self._finalized:
            n = self.in_features
            if n >= 2 * _SYM_BLOCK:
                for i in range(0, n, _SYM_BLOCK):
                    for j in range(0, i, _SYM_BLOCK):
                        self._sum[j:j + _SYM_BLOCK, i:i + _SYM_BLOCK] = (
                            self._sum[i:i + _SYM_BLOCK, j:j + _SYM_BLOCK].t())
            self._sum.mul_(2.0 / self.n_tokens)
            self._finalized = True
            if not all_finite(self._sum):
                raise HessianError(f"{self.name}: the Hessian contains NaN or Inf (non-finite calibration "
                                   "activations reached this layer)")
        return self._sum

    def release(self) -> None:
        """Free the Hessian and the cached factors; any later use raises CalibrationError."""
        self._sum = None
        self._factor_cache.clear()

    def input_mean_square(self) -> torch.Tensor:
        """Mean x² of each input feature over the calibration tokens (an imatrix entry): diag(H) / 2."""
        return self.hessian().diagonal() / 2

    def set_hessian(self, H: torch.Tensor, n_tokens: int = 1) -> None:
        """Use a given Hessian (tests, benchmarks, or one shared by several linears)."""
        if H.shape != (self.in_features, self.in_features):
            raise CalibrationError(f"{self.name}: Hessian shape {list(H.shape)} != {[self.in_features] * 2}")
        self._sum = H.to(self.device, torch.float32).clone()
        self.n_tokens = n_tokens
        self._finalized = True
        self._factor_cache.clear()

    # ---- quantization ----

    def quantize(self, weight: torch.Tensor, grid: Grid | Scheme, damp: float = 0.01, block_size: int = 128,
                 act_order: bool | None = None, static_groups: bool = True, group_aware: bool = False,
                 max_damp: float = 1.0, name: str | None = None, last: bool = False,
                 refine_sweeps: int = 0) -> tuple[QuantTensor | GGMLTensor, GPTQInfo]:
        """GPTQ-quantize `weight` [out, in]. `act_order=None` takes the Scheme's act_order (False for a Grid).
        `group_aware` (without act-order): groups by descending largest H_ii, each group's columns by descending
        H_ii; groups stay contiguous, so the output needs no g_idx. `last`: no other weight will be quantized with
        this Hessian, which is freed once its factor is computed (at 7B's down_proj, 0.8 GB less while the weight
        is solved); the object then answers nothing else. `refine_sweeps`: sweeps of coordinate descent on the codes
        afterwards (`refine_codes`; not with act-order's permuted groups)."""
        t0 = time.perf_counter()
        name = name or self.name
        if weight.dim() != 2 or weight.shape[1] != self.in_features:
            raise QuantkitError(f"{name}: weight shape {list(weight.shape)} does not match the Hessian's "
                                f"{self.in_features} input features")
        if act_order is None:
            act_order = grid.act_order if isinstance(grid, Scheme) else False
        if isinstance(grid, Scheme):
            grid.check_shape(name, tuple(weight.shape))
        check_finite(name, weight)
        grid = make_grid(grid, self.in_features)
        gs = grid.group_size
        if self.in_features % gs:
            raise QuantkitError(f"{name}: group size {gs} does not divide the input dimension {self.in_features}")

        H = self.hessian()
        n = self.in_features
        diag = H.diagonal()
        dead = diag == 0
        n_dead = int(dead.sum())
        W = weight.to(self.device, torch.float32)  # read only: the solver works on its own transposed copy
        if n_dead:
            W = W.clone()
            W[:, dead] = 0

        diag_live = torch.where(dead, torch.ones_like(diag), diag)  # dead columns count as H_ii = 1 (reference)
        group_aware = group_aware and not act_order and gs < n
        if act_order:
            perm = torch.argsort(diag_live, descending=True)
        elif group_aware:
            perm, group_of = group_aware_order(diag_live, gs)
        else:
            perm = None
        key = (act_order, gs if group_aware else None, float(damp), float(max_damp))  # the order's own factor
        if key not in self._factor_cache:
            self._factor_cache.clear()  # the previous factor goes first: at 7B's down_proj it is 0.8 GB
            self._factor_cache[key] = self._inverse_factor(H, dead, perm, damp, max_damp, name)
        U, damp_used, retries, used64 = self._factor_cache[key]

        importance_full = diag.clone()
        importance_full[dead] = 0
        if last and not refine_sweeps:
            del H, diag, diag_live
            self.release()
        n_groups = n // gs
        static = static_groups and act_order
        params_list: list[Any] = [None] * n_groups
        if static:  # parameters of the original contiguous groups, fitted before any update
            for g in range(n_groups):
                c = g * gs
                params_list[g] = grid.fit(W[:, c:c + gs], importance_full[c:c + gs])

        # [in, out] in processing order, gathered in one copy (at 7B's down_proj each copy is 0.23 GB)
        Wt = W.t()[perm] if perm is not None else W.t().clone(memory_format=torch.contiguous_format)
        del W
        imp = importance_full[perm] if perm is not None else importance_full
        orig_col = perm.tolist() if perm is not None else None
        Qt = torch.empty_like(Wt)
        loss = 0.0
        current = None  # (params, group index) for non-static groups
        threads = torch.get_num_threads()
        single_thread = Wt.device.type == "cpu" and threads > 1 and Wt.shape[1] <= _SMALL_OP_ELEMENTS

        try:
            for b1 in range(0, n, block_size):
                b2 = min(b1 + block_size, n)
                # the block as it was before its own updates (only needed when a group starts inside the block)
                Wb0 = Wt[b1:b2].clone() if not static and gs % block_size and gs < n else Wt[b1:b2]
                Eb = torch.empty((b2 - b1, Wt.shape[1]), dtype=Wt.dtype, device=Wt.device)
                if single_thread:  # in-block ops are too small to gain from threads; thread spinning costs a lot
                    torch.set_num_threads(1)
                for s1 in range(b1, b2, SUB_BLOCK):
                    s2 = min(s1 + SUB_BLOCK, b2)
                    Us = U[s1:s2, s1:s2]
                    for i in range(s1, s2):
                        if static:
                            c = orig_col[i] if orig_col is not None else i
                            params, offset = params_list[c // gs], c % gs
                        else:
                            if i % gs == 0:
                                # the reference fits on W as of the block start (in-block updates not yet applied)
                                g = i // gs
                                src = Wb0[i - b1:i - b1 + gs]
                                if i + gs > b2:
                                    src = torch.cat([src, Wt[b2:i + gs]])
                                cols, imp_g = src.t(), imp[i:i + gs]
                                if group_aware:  # fit in the group's own column order; stored by original group
                                    back = torch.argsort(perm[i:i + gs])
                                    cols, imp_g, g = cols[:, back], imp_g[back], group_of[g]
                                current = grid.fit(cols, imp_g)
                                params_list[g] = current
                            params, offset = current, (orig_col[i] % gs if group_aware else i % gs)
                        w = Wt[i]
                        q = grid.fake_quant(w.unsqueeze(1), params, offset).squeeze(1)
                        Qt[i] = q
                        e = Eb[i - b1]
                        torch.sub(w, q, out=e)
                        e.div_(U[i, i])
                        if i + 1 < s2:
                            Wt[i + 1:s2].addr_(Us[i - s1, i + 1 - s1:], e, alpha=-1.0)
                    if s2 < b2:
                        Wt[s2:b2].addmm_(U[s1:s2, s2:b2].t(), Eb[s1 - b1:s2 - b1], alpha=-1.0)
                if single_thread:
                    torch.set_num_threads(threads)
                loss += float(torch.linalg.vector_norm(Eb)) ** 2
                if b2 < n:
                    Wt[b2:].addmm_(U[b1:b2, b2:].t(), Eb, alpha=-1.0)

        finally:
            torch.set_num_threads(threads)
        if perm is not None:
            inv = torch.argsort(perm)
            Q = Qt.t()[:, inv]
            del Qt
            g_idx = None if static or group_aware else (inv // gs).to(torch.int32)
        else:
            Q = Qt.t()
            g_idx = None
        moved = 0
        if refine_sweeps and g_idx is None:
            # dead columns as GPTQ saw them (H_ii 1, W 0), damped as its factor was
            damped = H + torch.diag(diag_live - diag + damp_used * float(diag_live.mean()))
            target = weight.to(self.device, torch.float32).masked_fill(dead, 0.0)
            Q, moved = refine_codes(target, Q, damped, grid, params_list, refine_sweeps, block_size)
            del damped, target
        if last and refine_sweeps:
            del H
            self.release()
        tensor = grid.encode(Q.contiguous(), params_list, g_idx)
        seconds = time.perf_counter() - t0
        info = GPTQInfo(loss=float(loss), damp=damp_used, damp_retries=retries, fp64=used64, dead_columns=n_dead,
                        seconds=seconds, n_tokens=self.n_tokens,
                        extra={"act_order": act_order, "static_groups": static, "group_aware": group_aware,
                               "block_size": block_size, **({"refine_sweeps": refine_sweeps, "refine_moved": moved}
                                                            if refine_sweeps else {})})
        if hasattr(tensor, "error"):
            tensor.error.update({"gptq_loss": info.loss, "damp": damp_used, "seconds": round(seconds, 3)})
        return tensor, info

    def _inverse_factor(self, H: torch.Tensor, dead: torch.Tensor, perm: torch.Tensor | None, damp: float,
                        max_damp: float, name: str):
        """Upper Cholesky factor U of (H_damped)⁻¹ in processing order, with automatic damping increase."""
        Hp = H  # copied only when it must change: at 7B's down_proj every n×n copy is 0.8 GB
        if bool(dead.any()):
            Hp = H.clone()
            idx = dead.nonzero().squeeze(1)
            Hp[idx, idx] = 1.0
        mean_diag = float(Hp.diagonal().mean())  # the same in any order
        if not math.isfinite(mean_diag) or mean_diag <= 0:
            raise HessianError(f"{name}: the Hessian diagonal mean is {mean_diag}; calibration inputs are degenerate")
        d = damp
        retries = 0
        while True:
            for dtype in (torch.float32, torch.float64):
                U = _upper_inverse_factor(Hp, d * mean_diag, dtype, perm)
                if U is not None:
                    if dtype == torch.float64:
                        warnings.warn(f"{name}: Cholesky failed in fp32 at damp {d:g}; used fp64", stacklevel=3)
                    return U.to(torch.float32), d, retries, dtype == torch.float64
            if d * 10 > max_damp * (1 + 1e-9):
                raise HessianError(f"{name}: the Hessian is not positive definite even with damp {d:g} × mean "
                                   "diagonal (fp64); the calibration inputs are degenerate")
            nxt = d * 10 if d > 0 else 1e-4  # a zero damp cannot grow by multiplication
            warnings.warn(f"{name}: Hessian not positive definite with damp {d:g}; retrying with {nxt:g}",
                          stacklevel=3)
            d = nxt
            retries += 1


def refine_codes(weight: torch.Tensor, q: torch.Tensor, H: torch.Tensor, grid: Grid, params_list: list[Any],
                 sweeps: int, block_size: int = 128) -> tuple[torch.Tensor, int]:
    """Coordinate descent on GPTQ's result: each weight may move to the grid value one code below or above (the
    group's parameters fixed) when that lowers tr((W−Q) H (W−Q)ᵀ); column by column, `sweeps` times or until none
    moves. GPTQ decides each column once, against the columns after it still unrounded; here every column is
    decided again against all the others as rounded. H: the damped Hessian in column order, `params_list` per
    contiguous group. Returns (Q, moves).

    With Δ = W − Q and G = H Δᵀ, moving q[r, j] by d changes the loss by d (d H_jj − 2 G[j, r]). Lazy like GPTQ:
    inside a block of columns, G[j] is corrected for the block's earlier moves, and one product applies the block's
    moves to G afterwards."""
    qt = q.t().contiguous()  # [in, out]: one column of W per row
    G = H @ (weight - q).t()
    threads = torch.get_num_threads()
    if qt.device.type == "cpu" and qt.shape[1] <= _SMALL_OP_ELEMENTS:
        torch.set_num_threads(1)  # the per-column ops are too small to gain from threads (as in GPTQ.quantize)
    try:
        moves = _descend(qt, G, H, grid, params_list, sweeps, block_size)
    finally:
        torch.set_num_threads(threads)
    return qt.t(), moves


def _descend(qt, G, H, grid, params_list, sweeps, block_size) -> int:
    """`refine_codes`' sweeps, in place on qt [in, out] and G; the number of moves."""
    gs, n, moves = grid.group_size, qt.shape[0], 0
    diag = H.diagonal()
    inf = torch.tensor(float("inf"), device=qt.device)
    for _ in range(sweeps):
        moved = 0
        for b1 in range(0, n, block_size):
            b2 = min(b1 + block_size, n)
            D = torch.zeros((b2 - b1, qt.shape[1]), dtype=qt.dtype, device=qt.device)
            # the block's neighbour values, a group's part at a time (a move changes no other weight's neighbours)
            downs, ups, c1 = [], [], b1
            while c1 < b2:
                c2 = min(b2, (c1 // gs + 1) * gs)
                down, up = grid.neighbours(qt[c1:c2].t(), params_list[c1 // gs], c1 % gs)
                downs.append(down.t())
                ups.append(up.t())
                c1 = c2
            downs, ups = torch.cat(downs), torch.cat(ups)
            for j in range(b1, b2):
                g = G[j] - H[j, b1:j] @ D[:j - b1] if j > b1 else G[j]
                down, up = downs[j - b1], ups[j - b1]
                d_down, d_up = down - qt[j], up - qt[j]
                cost_down = torch.where(torch.isnan(d_down), inf, d_down * (d_down * diag[j] - 2 * g))
                cost_up = torch.where(torch.isnan(d_up), inf, d_up * (d_up * diag[j] - 2 * g))
                go_down = cost_down <= cost_up
                take = torch.minimum(cost_down, cost_up) < 0
                if bool(take.any()):
                    new = torch.where(take, torch.where(go_down, down, up), qt[j])
                    D[j - b1] = new - qt[j]
                    qt[j] = new
                    moved += int(take.sum())
            G.sub_(H[:, b1:b2] @ D)
        moves += moved
        if not moved:
            break
    return moves


def group_aware_order(diag: torch.Tensor, group_size: int) -> tuple[torch.Tensor, list[int]]:
    """Group-aware processing order (GAR): groups by descending largest diagonal entry, inside each group its
    columns by descending diagonal. Returns (perm, group_of): perm[i] is the column processed i-th, group_of[k]
    the original group processed k-th."""
    d = diag.view(-1, group_size)
    local = torch.argsort(d, dim=1, descending=True, stable=True)
    group_of = torch.argsort(d.amax(dim=1), descending=True, stable=True)
    perm = (group_of.unsqueeze(1) * group_size + local[group_of]).flatten()
    return perm, group_of.tolist()


def _upper_inverse_factor(H: torch.Tensor, damp_abs: float, dtype: torch.dtype,
                          perm: torch.Tensor | None = None) -> torch.Tensor | None:
    """U upper-triangular with UᵀU = (P H Pᵀ + damp·I)⁻¹ (P: the processing order `perm`, None = as is), or None
    when that matrix is not positive definite.

    With J the order reversal and L = chol(J P H Pᵀ J): (P H Pᵀ)⁻¹ = J L⁻ᵀ L⁻¹ J, so U = J L⁻¹ J.
    On the CPU the factorization, the triangular inverse and the reversal all happen in one n×n buffer beside H
    (at 7B's down_proj each is 0.8 GB), with the values of the out-of-place operations.
    """
    if perm is None:
        M = torch.flip(H.to(dtype), (0, 1))  # a copy (one: flipping both axes at once)
    else:  # reorder and reverse in one gather: one n×n copy, not three
        rev = perm.flip(0)
        M = H.to(dtype)[rev[:, None], rev[None, :]]
    M.diagonal().add_(damp_abs)
    if M.device.type == "cpu":
        # M is symmetric: its transpose is the same matrix, laid out column-major, which LAPACK factors in place
        M = M.mT
        L, info = torch.linalg.cholesky_ex(M, out=(M, torch.empty((), dtype=torch.int32)))
    else:
        L, info = torch.linalg.cholesky_ex(M)
    del M
    if int(info) != 0 or not bool(torch.isfinite(L.diagonal()).all()):
        return None
    Linv = _lower_triangular_inverse(L)
    del L
    if Linv is None or not all_finite(Linv):
        return None
    return flip_both_axes_(Linv)


def flip_both_axes_(x: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """`torch.flip(x, (0, 1))` in x's own storage, for x row- or column-major contiguous (flipping both axes of such
    a matrix reverses its storage), swapping `chunk` elements at a time; any other layout gets torch.flip."""
    if x.dim() != 2 or not (x.is_contiguous() or x.mT.is_contiguous()):
        return torch.flip(x, (0, 1))
    flat = (x if x.is_contiguous() else x.mT).view(-1)
    n = flat.numel()
    for i in range(0, n // 2, chunk):
        j = min(i + chunk, n // 2)
        low = flat[i:j].clone()
        flat[i:j] = flat[n - j:n - i].flip(0)
        flat[n - j:n - i] = low.flip(0)
    return x


def _lower_triangular_inverse(L: torch.Tensor) -> torch.Tensor | None:
    if L.device.type == "cpu":
        try:
            from scipy.linalg import lapack
        except ImportError:  # pragma: no cover - scipy is normally present
            lapack = None
        if lapack is not None:
            fn = lapack.strtri if L.dtype == torch.float32 else lapack.dtrtri
            # in place when L is Fortran-contiguous to LAPACK (its transpose is C-contiguous): no second n×n buffer
            inv, info = fn(L.numpy(), lower=1, overwrite_c=1)
            return torch.from_numpy(inv) if info == 0 else None
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    return torch.linalg.solve_triangular(L, eye, upper=False)


def proxy_loss(weight: torch.Tensor, weight_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W−Q) H (W−Q)ᵀ), in fp64."""
    d = (weight.double() - weight_hat.double())
    return float(((d @ H.double()) * d).sum())


