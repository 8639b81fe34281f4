"""Perplexity conventions and KLD statistics, checked against independent computations."""

import json
import math

import pytest
import torch

from quantkit.errors import EvalError
from quantkit.eval.compare import compare_models
from quantkit.eval.kld import KLDAccumulator, format_report
from quantkit.eval.perplexity import evaluate_perplexity, iter_windows
from quantkit.model.checkpoint import open_checkpoint
from quantkit.model.reference import Transformer
from quantkit.testing import make_random_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = make_random_checkpoint(tmp_path_factory.mktemp("eval") / "m", seed=11, vocab=1000, tokenizer=False)
    ours = Transformer.from_checkpoint(open_checkpoint(path), torch.float32)
    hf = transformers.MistralForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return ours, hf


def stream(n, vocab=1000, seed=0):
    ids = torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))
    ids[0] = 1
    return ids


def hf_ppl(hf, ids, convention, ctx):
    """exp(mean NLL) with transformers' own loss, windows cut here independently of quantkit."""
    total, count = 0.0, 0
    for i in range(len(ids) // ctx):
        window = ids[i * ctx:(i + 1) * ctx].clone()
        labels = window.clone()
        if convention == "llamacpp":
            window[0] = 1
            labels[0] = 1
            labels[: ctx // 2 + 1] = -100  # score positions ctx/2 .. ctx-2, i.e. labels ctx/2+1 .. ctx-1
        n = int((labels[1:] != -100).sum())
        with torch.no_grad():
            loss = hf(window[None], labels=labels[None]).loss.item()
        total += loss * n
        count += n
    return math.exp(total / count), count


@pytest.mark.parametrize("convention, ctx", [("gptq", 32), ("gptq", 50), ("llamacpp", 32)])
def test_ppl_equals_transformers_exp_mean_nll(small, convention, ctx):
    ours, hf = small
    ids = stream(205)
    result = evaluate_perplexity(ours, ids, convention, ctx, progress=False)
    expected, count = hf_ppl(hf, ids, convention, ctx)
    assert result.n_windows == 205 // ctx
    assert result.n_tokens == count
    assert result.n_tokens == result.n_windows * ((ctx - 1) if convention == "gptq" else (ctx - ctx // 2 - 1))
    assert result.ppl == pytest.approx(expected, rel=1e-4)
    assert result.ppl_stderr > 0 and result.convention == convention and result.ctx == ctx


def test_windows_follow_the_conventions():
    ids = torch.arange(10, 60)
    gptq = list(iter_windows(ids, "gptq", 16))
    assert len(gptq) == 3 and gptq[1].tokens[0, 0].item() == 26 and gptq[1].first == 0
    assert torch.equal(gptq[0].targets, ids[1:16])
    lc = list(iter_windows(ids, "llamacpp", 16, bos_id=1))
    assert len(lc) == 3 and all(w.tokens[0, 0].item() == 1 for w in lc)  # first token replaced by BOS
    assert lc[1].first == 8 and torch.equal(lc[1].targets, ids[16 + 9:32])
    assert len(list(iter_windows(ids, "gptq", 16, max_windows=2))) == 2
    spread = list(iter_windows(torch.arange(1000), "gptq", 10, max_windows=4, spread=True))
    assert [w.index for w in spread] == [0, 25, 50, 75] and spread[1].tokens[0, 0].item() == 250


def test_uniform_logits_give_vocab_perplexity():
    ids = stream(300)
    result = evaluate_perplexity(lambda t: torch.zeros(1, t.shape[1], 1000), ids, "llamacpp", 64, progress=False)
    assert result.ppl == pytest.approx(1000.0, rel=1e-6)
    assert result.ppl_stderr == pytest.approx(0.0, abs=1e-6)


def test_too_short_and_unknown_convention():
    with pytest.raises(EvalError, match="too short: 100 tokens.*needs at least 128"):
        evaluate_perplexity(lambda t: t, torch.arange(100), "llamacpp", 64, progress=False)
    with pytest.raises(EvalError, match="unknown perplexity convention 'wiki'"):
        evaluate_perplexity(lambda t: t, torch.arange(100), "wiki", 64, progress=False)


def test_kld_matches_direct_formula_and_streams():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(40, 50, generator=gen) * 3
    test = ref + 0.3 * torch.randn(40, 50, generator=gen)
    targets = torch.randint(0, 50, (40,), generator=gen)
    one = KLDAccumulator()
    one.update(ref, test, targets)
    split = KLDAccumulator()
    split.update(ref[:13], test[:13], targets[:13])
    split.update(ref[13:], test[13:], targets[13:])
    a, b = one.result(), split.result()
    for key in ("kld", "delta_p"):
        assert a[key]["percentiles"] == pytest.approx(b[key]["percentiles"])
        assert {k: v for k, v in a[key].items() if k != "percentiles"} == pytest.approx(
            {k: v for k, v in b[key].items() if k != "percentiles"})

    p, q = torch.softmax(ref.double(), -1), torch.softmax(test.double(), -1)
    kld = (p * (p.log() - q.log())).sum(-1)
    assert a["kld"]["mean"] == pytest.approx(kld.mean().item(), rel=1e-5)
    assert a["kld"]["max"] == pytest.approx(kld.max().item(), rel=1e-5)
    assert a["kld"]["median"] == pytest.approx(kld.median().item(), rel=1e-2)
    assert a["same_top"]["fraction"] == pytest.approx((p.argmax(-1) == q.argmax(-1)).double().mean().item())
    dp = q.gather(-1, targets[:, None])[:, 0] - p.gather(-1, targets[:, None])[:, 0]
    assert a["delta_p"]["mean"] == pytest.approx(dp.mean().item(), rel=1e-5)
    assert a["delta_p"]["rms"] == pytest.approx(dp.pow(2).mean().sqrt().item(), rel=1e-5)
    nll_p, nll_q = -p.gather(-1, targets[:, None]).log().mean(), -q.gather(-1, targets[:, None]).log().mean()
    assert a["ppl"]["ppl_base"] == pytest.approx(nll_p.exp().item(), rel=1e-5)
    assert a["ppl"]["ln_ratio"] == pytest.approx((nll_q - nll_p).item(), rel=1e-4)


def test_identical_models_compare_to_zero(small):
    ours, _ = small
    ids = stream(256)
    result = compare_models(ours, ours, ids, "llamacpp", 64, progress=False)
    assert result["kld"]["mean"] == pytest.approx(0.0, abs=1e-7)
    assert result["same_top"]["fraction"] == 1.0
    assert result["ppl_ref"]["ppl"] == result["ppl_test"]["ppl"]
    assert result["n_windows"] == 4 and result["n_tokens"] == 4 * 31
    report = format_report(result)
    assert "====== KL divergence statistics ======" in report and "Same top p: 100.000" in report


def test_perturbed_model_has_small_positive_kld(small):
    ours, _ = small
    noise = torch.randn(1, 64, 1000, generator=torch.Generator().manual_seed(1))
    result = compare_models(ours, lambda t: ours(t) + 0.05 * noise[:, : t.shape[1]], stream(256), "gptq", 64,
                            progress=False)
    assert 0 < result["kld"]["mean"] < 0.01
    assert result["ppl_test"]["n_tokens"] == 4 * 63


def test_markdown_report_from_eval_document(tmp_path, small):
    from quantkit.eval.report import markdown_report, write_report

    ours, _ = small
    cmp = compare_models(ours, ours, stream(256), "llamacpp", 64, progress=False)
    out = {"model": {"source": "m", "format": "hf", "device": "cpu", "dtype": "float32"},
           "text": {"path": "t.txt", "documents": 1, "tokens": 256, "sha256": "ab" * 32}, "tokenizer": "tok",
           "convention": "llamacpp", "ctx": 64, "bos": "replaces each chunk's first token", "max_windows": None,
           "ppl": cmp["ppl_test"], "ref": {"source": "m", "ppl": cmp["ppl_ref"]},
           "compare": {k: v for k, v in cmp.items() if k not in ("ppl_ref", "ppl_test")}}
    md = markdown_report(out)
    assert "## KL divergence" in md and "Same top token: 100.000" in md and "| 4 / 124 |" in md
    write_report(out, tmp_path / "rep")
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["ctx"] == 64
