"""The report card (`quantkit report`, `quantkit.report`): table, JSON, plots and reusable reference logits."""

import json
import struct

import pytest
import torch

import quantkit
from cli_helpers import exit_code
from quantkit.errors import EvalError
from quantkit.eval import plots
from quantkit.eval.reference_logits import ReferenceLogits, coarse_kld, head_of
from quantkit.testing import NANO_PATH

TEXT = "calib/prose.txt"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    q8 = quantkit.convert(NANO_PATH, d / "nano-Q8_0.gguf", format="gguf", gguf_type="Q8_0")
    w4 = quantkit.quantize(NANO_PATH, d / "nano-w4", preset="w4a16-g128", formats="gptq").paths["gptq"]
    return d, [q8, w4]


@pytest.fixture(scope="module")
def card(outputs):
    d, paths = outputs
    return quantkit.report(paths, TEXT, d / "card", ref=NANO_PATH, max_windows=2)


# ---- the coarse KLD ----

def _full_kld(ref_logits, test_logits):
    lp, lq = torch.log_softmax(ref_logits.double(), -1), torch.log_softmax(test_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _reference(ref_logits, mass):
    targets = torch.zeros(ref_logits.shape[0], dtype=torch.long)
    return ReferenceLogits(*head_of(ref_logits, targets, mass), torch.zeros(1, 1, 1), {})


def test_coarse_kld_is_a_lower_bound_that_closes_as_mass_grows():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(40, 500, generator=g) * 3
    test = ref + torch.randn(40, 500, generator=g) * 0.3
    full = _full_kld(ref, test)
    previous = torch.zeros(40, dtype=torch.float64)
    for mass in (0.5, 0.9, 0.99, 0.999999):
        kld = coarse_kld(_reference(ref, mass), 0, test)
        assert bool((kld <= full + 1e-6).all())  # float32 reference log-probs
        assert float(kld.sum()) >= float(previous.sum()) - 1e-6
        previous = kld
    assert torch.allclose(coarse_kld(_reference(ref, 1.0), 0, test), full, atol=1e-6)


def test_head_keeps_the_fewest_tokens_holding_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.97, 0.01, 0.01, 0.01]]))
    ids, logp, counts, target, rest = head_of(logits, torch.tensor([2, 0]), 0.9)
    assert counts.tolist() == [3, 1]
    assert ids.tolist() == [0, 1, 2, 0]
    assert torch.allclose(target, torch.log(torch.tensor([0.15, 0.97])))
    assert torch.allclose(rest.exp(), torch.tensor([0.05, 0.03], dtype=torch.float64))


def test_reference_logits_roundtrip_and_corrupt_files(tmp_path):
    ref = _reference(torch.randn(6, 50), 0.9)
    ref.meta = {"tokens_sha256": "x", "convention": "llamacpp"}
    ref.save(tmp_path / "r.safetensors")
    back = ReferenceLogits.load(tmp_path / "r.safetensors")
    assert torch.equal(back.ids, ref.ids) and torch.equal(back.counts, ref.counts)
    assert back.meta == ref.meta
    with pytest.raises(EvalError):
        ReferenceLogits.load(tmp_path / "nope.safetensors")
    (tmp_path / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}      ")
    with pytest.raises(EvalError, match="not a quantkit reference-logits file"):
        ReferenceLogits.load(tmp_path / "model.safetensors")


# ---- the report ----

def test_report_json_schema_and_numbers(card, outputs):
    d, paths = outputs
    data = json.loads((d / "card" / "report.json").read_text())
    assert data == json.loads(json.dumps(card.to_dict()))
    assert {"reference", "text", "convention", "ctx", "n_windows", "n_tokens", "reference_mass", "definitions",
            "outputs", "figures"} <= set(data)
    assert data["convention"] == "llamacpp" and data["ctx"] == 512 and data["n_windows"] == 2
    rows = {r["name"]: r for r in data["outputs"]}
    assert list(rows) == ["nano-Q8_0.gguf", "nano-w4"]
    from quantkit.model.config import ModelConfig

    params = ModelConfig.from_file(NANO_PATH / "config.json").num_parameters()
    for r in rows.values():
        keys = {"format", "bytes", "bpw", "ppl", "ppl_stderr", "delta_ppl", "kld", "same_top_pct", "layer_error"}
        assert keys <= set(r)
        assert r["bpw"] == pytest.approx(r["tensor_bytes"] * 8 / params) and r["tensor_bytes"] < r["bytes"]
        assert r["delta_ppl"] == pytest.approx(r["ppl"] - data["reference"]["ppl"])
        assert len(r["layer_error"]) == 6 and all(e > 0 for e in r["layer_error"])
        assert 0 <= r["kld"]["median"] <= r["kld"]["p99"] <= r["kld"]["max"]
    q8, w4 = rows["nano-Q8_0.gguf"], rows["nano-w4"]
    assert q8["format"] == "gguf" and w4["format"] == "gptq"
    assert q8["kld"]["mean"] < 0.002 < w4["kld"]["mean"] < 0.2  # 8-bit is far closer than 4-bit RTN
    assert q8["same_top_pct"] > w4["same_top_pct"] > 70
    assert max(q8["layer_error"]) < min(w4["layer_error"])


def test_report_markdown_embeds_every_figure(card, outputs):
    d, _ = outputs
    md = (d / "card" / "report.md").read_text()
    for name in card.data["figures"].values():
        png = d / "card" / name
        assert f"]({name})" in md
        blob = png.read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", blob[16:24])
        assert width >= 600 and height >= 400
    assert "| nano-Q8_0.gguf | gguf |" in md and "| nano-w4 | gptq |" in md


def test_figures_show_what_they_claim(card):
    rows = card.rows
    fig = plots.kld_vs_bpw(rows)
    ax = fig.axes[0]
    points = ax.collections[0].get_offsets()
    assert [float(p[0]) for p in points] == pytest.approx([r["bpw"] for r in rows])
    assert [float(p[1]) for p in points] == pytest.approx([r["kld"]["mean"] for r in rows])
    assert [t.get_text() for t in ax.texts] == [r["name"] for r in rows]
    assert ax.get_yscale() == "log" and "bits per weight" in ax.get_xlabel()
    fig = plots.layer_error(rows)
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == [r["name"] for r in rows]
    for line, r in zip(lines, rows):
        assert list(line.get_ydata()) == pytest.approx(r["layer_error"])
    per_token = {r["name"]: torch.tensor([0.1, 0.01, 1.0]) for r in rows}
    fig = plots.kld_distribution(rows, per_token)
    line = fig.axes[0].get_lines()[0]
    assert list(line.get_xdata()) == pytest.approx([0.01, 0.1, 1.0]) and line.get_ydata()[-1] == 1.0


def test_saved_reference_logits_give_the_same_numbers(card, outputs):
    d, paths = outputs
    again = quantkit.report(paths[:1], TEXT, d / "card2", ref_logits=d / "card" / "reference-logits.safetensors",
                            max_windows=2)
    first, second = card.rows[0], again.rows[0]
    assert second["kld"] == pytest.approx(first["kld"]) and second["ppl"] == pytest.approx(first["ppl"])
    assert second["layer_error"] == pytest.approx(first["layer_error"], rel=1e-2)  # probe saved as float16
    assert again.data["reference"]["ppl"] == pytest.approx(card.data["reference"]["ppl"])
    with pytest.raises(EvalError, match="another text or setting .n_windows"):
        quantkit.report(paths[:1], TEXT, d / "card3", ref_logits=d / "card" / "reference-logits.safetensors",
                        max_windows=1)


def test_report_cli(outputs, capsys):
    d, paths = outputs
    code = exit_code(*["report", str(paths[0]), "--ref-logits", str(d / "card" / "reference-logits.safetensors"),
                 "--text", TEXT, "--max-windows", "2", "-o", str(d / "cli"), "--json", "--no-progress"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["outputs"][0]["name"] == "nano-Q8_0.gguf"
    assert exit_code(*["report", str(paths[0]), "--text", TEXT, "-o", str(d / "cli2")]) == 1
    assert "error: give the reference" in capsys.readouterr().err


def test_the_model_card_states_the_evaluation_texts_perplexity():
    """The README's first run prints the reference perplexity on evaltext/prose.txt: the model card must say it."""
    import re

    card = (NANO_PATH / "README.md").read_text()
    stated = float(re.search(r"evaltext/prose.txt.*\n(?:.*\n){4}\s+value: ([0-9.]+)", card).group(1))
    measured = quantkit.evaluate(NANO_PATH, "evaltext/prose.txt")
    assert measured.data["convention"] == "llamacpp" and measured.data["ctx"] == 512
    assert measured.data["ppl"]["n_windows"] == 47
    assert measured.ppl == pytest.approx(stated, abs=0.05)
