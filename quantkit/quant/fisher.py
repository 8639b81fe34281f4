"""The Hessian GPTQ rounds the embedding matrix against: the Fisher information of the model's output distribution
with respect to the embedding's output.

The embedding is a lookup, so it has no input whose second moment could weigh its errors as a linear's has. What
its rounding error costs is the change of the output distribution: a row's error e moves the residual stream h₀ at
every position of that token, and KL(p || p') ≈ ½ eᵀ F e with

    F = E_t E_{y ~ p_t} [g gᵀ],   g = ∂ log p_t(y) / ∂h₀

(the expected outer product of the score, which equals the KL divergence's Hessian at the full-precision model).
It is estimated with `draws` labels sampled from the model's own distribution at every position, one backward pass
per draw; g is the gradient of the sum over all positions, so each h₀ collects its effect on every later output
(the cross terms of different positions have mean zero). Averaged over the calibration tokens, F is one [hidden,
hidden] matrix for all rows: `GPTQ.set_hessian(F)` then rounds each row with error feedback along the directions
the model is sensitive to. On mistral-nano F is far from diagonal (off-diagonal 76% of its norm), which is why its
diagonal alone, as an importance vector, gains little.

F is a sample second moment of [hidden] vectors: from too few of them it is rank-deficient, and GPTQ then fits the
calibration positions' directions instead of the model's (2 × 48 tokens, 1.5 samples per dimension, rounded a random
model's embedding worse than the data-free encoding; 16 and more samples per dimension beat it). `enough_samples`
says whether the tokens give at least MIN_SAMPLES_PER_DIM scores per dimension.
"""

from __future__ import annotations

import torch

from quantkit.model.arch import EMBEDDING
from quantkit.quant.gptq import GPTQ

DRAWS = 4  # labels sampled per position
MIN_SAMPLES_PER_DIM = 8  # scores (tokens × draws) per hidden dimension for F to be used


def enough_samples(n_tokens: int, hidden: int, draws: int = DRAWS) -> bool:
    return n_tokens * draws >= MIN_SAMPLES_PER_DIM * hidden


def embedding_fisher(model, tokens: torch.Tensor, draws: int = DRAWS, seed: int = 0, batch: int = 4) -> torch.Tensor:
    """F [hidden, hidden] (float32, mean over the tokens and draws) of `model` (a `model.reference.Transformer`,
    its weights in float32) on `tokens` [n, seqlen]; deterministic for a given seed."""
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    seqlen = tokens.shape[1]
    positions = torch.arange(seqlen)
    rope, mask = model.rope(positions, torch.float32), model.mask(positions, seqlen)
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(hidden, hidden, dtype=torch.float64)
    with torch.enable_grad():
        for start in range(0, tokens.shape[0], batch):
            h0 = model.embed(tokens[start:start + batch]).detach().requires_grad_(True)
            h = h0
            for layer in model.model.layers:
                h = layer(h, positions, rope, mask)
            logp = torch.log_softmax(model.head(h).float(), dim=-1).reshape(-1, vocab)
            probs = logp.detach().exp()
            for d in range(draws):
                labels = torch.multinomial(probs, 1, generator=generator)
                (g,) = torch.autograd.grad(logp.gather(1, labels).sum(), h0, retain_graph=d + 1 < draws)
                g = g.reshape(-1, hidden).double()
                total.addmm_(g.T, g)
    return (total / (tokens.numel() * draws)).float()


def embedding_gptq(fisher: torch.Tensor, device: torch.device | str | None = None) -> GPTQ:
    """A GPTQ object for the embedding's rows whose Hessian is `fisher`."""
    gptq = GPTQ(fisher.shape[0], name=EMBEDDING, device=device)
    gptq.set_hessian(fisher)
    return gptq
