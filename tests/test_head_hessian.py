"""lm_head's KL-weighted row-cluster Hessians (`quant/head_hessian.py`): the collected Hessians against their
definition, one cluster against plain GPTQ, the rows put back in order for ggml and integer tensors, and the KL
divergence they save on contexts they did not see."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantkit.gguf.grids import gptq_round
from quantkit.quant.gptq import GPTQ
from quantkit.quant.head_hessian import HeadHessians, row_clusters
from quantkit.quant.scheme import get_preset
from quantkit.tensors import GGMLTensor, stack_rows

VOCAB, HIDDEN, TOPICS = 512, 256, 8


def topical_head(seed: int = 0):
    """A head whose tokens each belong to one of TOPICS topics, and a sampler of contexts: a context is about one
    topic, its hidden state that topic's direction plus noise that is wide in an eighth of the dimensions, others
    for each topic (so the contexts where a token is probable have another second moment than all contexts)."""
    g = torch.Generator().manual_seed(seed)
    topics = torch.nn.functional.normalize(torch.randn(TOPICS, HIDDEN, generator=g), dim=1)
    spreads = torch.where(torch.rand(TOPICS, HIDDEN, generator=g) < 1 / 8, 1.0, 0.05)
    topic_of = torch.arange(VOCAB) % TOPICS
    weight = 3 * topics[topic_of] + 0.5 * torch.randn(VOCAB, HIDDEN, generator=g)

    def contexts(n: int, sample_seed: int) -> torch.Tensor:
        gs = torch.Generator().manual_seed(sample_seed)
        k = torch.randint(0, TOPICS, (n,), generator=gs)
        return 2 * topics[k] + spreads[k] * torch.randn(n, HIDDEN, generator=gs)

    return weight, contexts


def head_kld(weight: torch.Tensor, stored: torch.Tensor, h: torch.Tensor) -> float:
    logp, logq = torch.log_softmax(h @ weight.T, -1), torch.log_softmax(h @ stored.T, -1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


@pytest.fixture(scope="module")
def head():
    weight, contexts = topical_head()
    return weight, contexts(6000, 1), contexts(6000, 2)


def test_cluster_hessians_are_the_probability_weighted_second_moments(head):
    weight, h, _ = head
    hh = HeadHessians(weight, clusters=4, shrink=0.0)
    for part in h.split(1000):  # batches, and chunks inside add_batch, add up to the whole
        hh.add_batch(part)
    p = torch.softmax(h.double() @ weight.double().T, -1)
    for c in range(hh.clusters):
        w = p[:, hh.labels == c].sum(1)
        expected = 2 * (h.double() * w[:, None]).T @ h.double() / w.sum()
        assert torch.allclose(hh.hessian(c).double(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    shrunk = HeadHessians(weight, clusters=4, shrink=0.5)
    shrunk.add_batch(h)
    own, shared = hh.hessian(0), hh.shared.hessian()
    assert torch.allclose(shrunk.hessian(0), own + 0.5 * own.trace() / shared.trace() * shared, atol=1e-5)


def test_one_cluster_is_gptq_with_the_shared_hessian(head):
    weight, h, _ = head
    hh, plain = HeadHessians(weight, clusters=1), GPTQ(HIDDEN)
    hh.add_batch(h)
    plain.add_batch(h)
    options = dict(damp=0.1, block_size=128, group_aware=True)
    a, _ = gptq_round(hh, weight, "Q4_K", "lm_head", **options)
    b, _ = gptq_round(plain, weight, "Q4_K", "lm_head", **options)
    assert np.array_equal(a.data, b.data)


@pytest.mark.parametrize("target", ["Q4_K", "IQ4_XS", "w4a16-g128"])
def test_each_cluster_is_gptq_on_its_own_hessian_rows_in_place(head, target):
    weight, h, _ = head
    hh = HeadHessians(weight, clusters=6)
    hh.add_batch(h)
    grid = get_preset(target) if target.startswith("w") else target
    options = dict(damp=0.1, block_size=128, group_aware=True)
    whole, info = gptq_round(hh, weight, grid, "lm_head", **options)
    assert info.extra["clusters"] == 6 and whole.shape == tuple(weight.shape)
    for c in range(hh.clusters):
        rows = (hh.labels == c).nonzero().squeeze(1)
        own = GPTQ(HIDDEN)
        own.set_hessian(hh.hessian(c), hh.n_tokens)
        alone, _ = gptq_round(own, weight[rows], grid, "lm_head", **options)
        assert torch.equal(whole.dequantize()[rows], alone.dequantize())


def test_kl_weighted_rounding_beats_the_shared_hessian_on_unseen_contexts(head):
    weight, h, unseen = head
    results = {}
    for clusters in (1, 16):
        hh = HeadHessians(weight, clusters=clusters)
        hh.add_batch(h)
        stored, _ = gptq_round(hh, weight, "Q3_K", "lm_head", damp=0.1, block_size=128, group_aware=True)
        results[clusters] = head_kld(weight, stored.dequantize(), unseen)
    assert results[16] < 0.8 * results[1], results  # 0.73 measured


def test_row_clusters_follow_the_rows_directions(head):
    weight, _, _ = head
    labels = row_clusters(weight, TOPICS)
    assert torch.equal(labels, row_clusters(weight, TOPICS))  # deterministic
    topic_of = torch.arange(VOCAB) % TOPICS
    purity = sum(int(torch.bincount(topic_of[labels == c], minlength=TOPICS).max()) for c in labels.unique())
    assert purity >= 0.95 * VOCAB
    assert int(row_clusters(weight, 1).max()) == 0


def test_stack_rows_needs_every_row_once():
    part = GGMLTensor("Q8_0", (2, 32), np.zeros((2, 34), dtype=np.uint8))
    with pytest.raises(ValueError, match="once"):
        stack_rows([(torch.tensor([0, 1]), part), (torch.tensor([1, 2]), part)], 4)
    with pytest.raises(ValueError, match="types"):
        stack_rows([(torch.tensor([0, 1]), part),
                    (torch.tensor([2, 3]), GGMLTensor("Q4_0", (2, 32), np.zeros((2, 18), dtype=np.uint8)))], 4)
