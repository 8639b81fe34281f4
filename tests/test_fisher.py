"""The embedding's Fisher matrix (`quant/fisher.py`): the sampled estimate against the exact expectation computed
from the full Jacobian on a tiny model, and its use as the embedding's GPTQ Hessian."""

from __future__ import annotations

import pytest
import torch

from quantkit.model.checkpoint import open_checkpoint
from quantkit.model.reference import Transformer
from quantkit.quant.fisher import embedding_fisher
from quantkit.testing import make_random_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_random_checkpoint(tmp_path_factory.mktemp("fisher") / "m", layout="hf-single", hidden=32, layers=2,
                                  heads=4, kv_heads=2, intermediate=64, vocab=48, tokenizer=False, seed=3)
    return Transformer.from_checkpoint(open_checkpoint(path), torch.float32)


def exact_fisher(model, tokens: torch.Tensor) -> torch.Tensor:
    """(1/N) Σ_s Σ_t J_tsᵀ (diag p_t − p_t p_tᵀ) J_ts with J_ts = ∂logits_t / ∂h0_s: what the sampled outer
    products of the scores converge to (the cross terms of different positions have mean zero)."""
    seqlen = tokens.shape[1]
    positions = torch.arange(seqlen)
    rope, mask = model.rope(positions, torch.float32), model.mask(positions, seqlen)
    total = torch.zeros(model.config.hidden_size, model.config.hidden_size, dtype=torch.float64)
    for row in tokens:
        h0 = model.embed(row[None]).detach()

        def logits(h):
            for layer in model.model.layers:
                h = layer(h, positions, rope, mask)
            return model.head(h)[0]

        J = torch.autograd.functional.jacobian(logits, h0)[:, :, 0].double()  # [t, vocab, s, hidden]
        p = torch.softmax(logits(h0).double(), dim=-1)
        for t in range(seqlen):
            C = torch.diag(p[t]) - torch.outer(p[t], p[t])
            for s in range(t + 1):  # causal: later positions do not move earlier outputs
                total += J[t, :, s].T @ C @ J[t, :, s]
    return (total / tokens.numel()).float().detach()


def test_sampled_fisher_converges_to_the_exact_one(tiny):
    tokens = torch.randint(0, 48, (2, 6), generator=torch.Generator().manual_seed(0))
    exact = exact_fisher(tiny, tokens)
    few = embedding_fisher(tiny, tokens, draws=8, seed=1)
    many = embedding_fisher(tiny, tokens, draws=3000, seed=1)
    err = lambda f: float((f - exact).norm() / exact.norm())  # noqa: E731
    assert err(many) < 0.05 < err(few)  # sampling noise shrinks as 1/sqrt(draws)
    assert torch.allclose(many, many.T, atol=1e-6)
    assert float(torch.linalg.eigvalsh(many.double()).min()) > -1e-6  # a sum of outer products
    assert torch.equal(embedding_fisher(tiny, tokens, draws=8, seed=1), few)  # deterministic for a seed
