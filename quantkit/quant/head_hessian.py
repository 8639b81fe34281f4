"""The Hessians GPTQ rounds lm_head against: the KL divergence's, one per cluster of output rows.

lm_head's rounding error ΔW moves the logits of a context h by δ = ΔW h, and

    KL(p || p') ≈ ½ Σ_i p_i δ_i² − ½ (Σ_i p_i δ_i)²

The first term separates by row: row i's error Δw_i costs ½ Δw_i H_i Δw_iᵀ with H_i = Σ_t p_{t,i} h_t h_tᵀ, the
second moment of the contexts weighted by the probability the model gives token i in each. GPTQ's usual Hessian
Σ_t h_t h_tᵀ weighs every context alike for every row, so it spends a row's precision on contexts where its token is
never predicted. (The second term says that a shift common to all logits costs nothing; it couples the rows and is
left out.)

A Hessian per row would take vocab × hidden² memory. The rows are grouped instead into `clusters` groups by the
direction of their weight (spherical k-means: rows whose logits rise together are probable in the same contexts),
and group c's Hessian is Σ_t (Σ_{i∈c} p_{t,i}) h_t h_tᵀ over its mass, plus `shrink` times the shared Hessian scaled
to the same trace (a group probable in few contexts would otherwise fit those few). Collecting it costs `clusters`
times the shared Hessian's products. On mistral-nano (Q5_K lm_head, 64 × 512 calibration tokens of one book, KL on
another) 64 groups lower the head's KL divergence by about a tenth against the shared Hessian.

`HeadHessians` answers what `gguf.grids.gptq_round` asks of a `GPTQ` object (`quantize`, `input_mean_square`), so
the pipeline and the sensitivity measurement round lm_head through it unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from quantkit.errors import CalibrationError
from quantkit.quant.gptq import GPTQ, GPTQInfo
from quantkit.tensors import GGMLTensor, QuantTensor, stack_rows

CLUSTERS = 64
SHRINK = 0.1
_TOKENS_PER_CHUNK = 2048  # contexts whose [tokens, vocab] probabilities are held at once


def row_clusters(weight: torch.Tensor, clusters: int, iterations: int = 10, seed: int = 0) -> torch.Tensor:
    """Cluster index [rows] (int64) of each row of `weight` [rows, cols]: spherical k-means on the rows' directions
    from `clusters` distinct rows drawn with `seed`; deterministic. Clusters left empty keep no rows."""
    rows = weight.shape[0]
    k = max(1, min(int(clusters), rows))
    if k == 1:
        return torch.zeros(rows, dtype=torch.int64, device=weight.device)
    unit = torch.nn.functional.normalize(weight.float(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    centres = unit[torch.randperm(rows, generator=generator)[:k].to(weight.device)].clone()
    for _ in range(iterations):
        labels = (unit @ centres.T).argmax(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, labels, unit)
        filled = sums.norm(dim=1) > 0
        centres[filled] = torch.nn.functional.normalize(sums[filled], dim=1)
    return (unit @ centres.T).argmax(dim=1)


class HeadHessians:
    """The KL-weighted Hessians of lm_head's row clusters (module docstring). `HeadHessians(weight)`;
    `add_batch(h)` with the final norm's outputs of each calibration batch; then `quantize(weight, grid, ...)` as
    `GPTQ.quantize`. `clusters=1` is GPTQ with the shared Hessian."""

    def __init__(self, weight: torch.Tensor, clusters: int = CLUSTERS, shrink: float = SHRINK,
                 name: str = "lm_head", device: torch.device | str | None = None):
        self.name = name
        self.device = torch.device(device) if device is not None else weight.device
        self.in_features = n = weight.shape[1]
        self.shared = GPTQ(n, name=name, device=self.device)
        self.shrink = shrink
        # one cluster is the shared Hessian: neither the weight (for the probabilities) nor per-cluster sums
        self.weight = weight.to(self.device, torch.float32) if clusters > 1 else None
        self.labels = row_clusters(weight if self.weight is None else self.weight, clusters)
        self.clusters = int(self.labels.max()) + 1
        self._sums = torch.zeros(self.clusters, n, n, device=self.device) if self.clusters > 1 else None
        self._mass = torch.zeros(self.clusters, dtype=torch.float64, device=self.device)

    @property
    def n_tokens(self) -> int:
        return self.shared.n_tokens

    def add_batch(self, h: torch.Tensor) -> None:
        """h [..., hidden]: the contexts (final norm's outputs) of one calibration batch."""
        self.shared.add_batch(h)
        if self.clusters == 1:
            return
        h = h.reshape(-1, self.in_features).to(self.device, torch.float32)
        for x in h.split(_TOKENS_PER_CHUNK):
            p = torch.softmax(x @ self.weight.T, dim=-1)
            mass = torch.zeros(x.shape[0], self.clusters, device=self.device).index_add_(1, self.labels, p)
            del p
            self._mass += mass.sum(dim=0, dtype=torch.float64)
            for c in range(self.clusters):
                self._sums[c].addmm_((x * mass[:, c:c + 1]).T, x)

    def hessian(self, cluster: int) -> torch.Tensor:
        """Cluster `cluster`'s Hessian, on the scale of `GPTQ.hessian` (2/n Σ h hᵀ)."""
        shared = self.shared.hessian()
        mass = float(self._mass[cluster])
        if self.clusters == 1 or mass <= 0:
            return shared
        own = self._sums[cluster] * (2.0 / mass)
        return own + self.shrink * float(own.trace() / shared.trace()) * shared

    def input_mean_square(self) -> torch.Tensor:
        return self.shared.input_mean_square()

    def quantize(self, weight: torch.Tensor, grid: Any, name: str | None = None, last: bool = False,
                 **options: Any) -> tuple[QuantTensor | GGMLTensor, GPTQInfo]:
        """GPTQ of each cluster's rows of `weight` against its Hessian (options of `GPTQ.quantize`), the rows put
        back in order. `last`: the Hessians are not needed again."""
        name = name or self.name
        if self.clusters == 1:
            return self.shared.quantize(weight, grid, name=name, last=last, **options)
        if weight.shape[0] != self.labels.shape[0]:
            raise CalibrationError(f"{name}: {weight.shape[0]} rows, but the Hessians were collected for "
                                   f"{self.labels.shape[0]}")
        parts, infos = [], []
        for c in range(self.clusters):
            rows = (self.labels == c).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            gptq = GPTQ(self.in_features, name=f"{name}[cluster {c}]", device=self.device)
            gptq.set_hessian(self.hessian(c), self.n_tokens)
            tensor, info = gptq.quantize(weight[rows.to(weight.device)], grid, name=name, **options)
            parts.append((rows.cpu(), tensor))
            infos.append(info)
        if last:
            self._sums = None
            self.shared.release()
        info = GPTQInfo(loss=sum(i.loss for i in infos), damp=max(i.damp for i in infos),
                        damp_retries=sum(i.damp_retries for i in infos), fp64=any(i.fp64 for i in infos),
                        dead_columns=max(i.dead_columns for i in infos), seconds=sum(i.seconds for i in infos),
                        n_tokens=self.n_tokens, extra={**infos[0].extra, "clusters": self.clusters})
        tensor = stack_rows(parts, weight.shape[0])
        tensor.error.update({"gptq_loss": info.loss, "damp": info.damp, "clusters": self.clusters})
        return tensor, info
