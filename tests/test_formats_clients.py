"""Real clients: transformers loads quantkit's GPTQ / AWQ / compressed-tensors outputs of mistral-nano on CPU and
computes the logits quantkit's dequantized model computes; quantkit reads GPTQModel-written checkpoints and
computes the logits GPTQModel computes."""

from pathlib import Path

import pytest
import torch

from quantkit.formats.base import read_checkpoint
from quantkit.formats.clients import gptqmodel_logits_fn, missing_client, transformers_logits_fn
from quantkit.formats.dequantized import dequantized_model
from quantkit.formats.export import export_rtn
from quantkit.quant.scheme import PRESETS

pytestmark = pytest.mark.compat
FIXTURES = Path(__file__).parent / "fixtures"
PROMPT = torch.tensor([[1, 415, 2936, 9060, 285, 1142, 28705, 13, 1014, 349, 264, 1369, 302, 272, 1526]])


def rel_err(test, ref):
    return float((test - ref).abs().max() / ref.abs().max())


def need(fmt):
    reason = missing_client(fmt)
    if reason:
        pytest.skip(reason)


@pytest.mark.slow
@pytest.mark.parametrize("fmt,preset", [("gptq", "w4a16-g128"), ("gptq", "w4a16-g128-asym"),
                                        ("awq", "w4a16-g128-asym"), ("compressed-tensors", "w4a16-g128-asym"),
                                        ("compressed-tensors", "w8a16")])
def test_transformers_loads_nano_and_matches_quantkit(nano_path, tmp_path, fmt, preset):
    need(fmt)
    out = export_rtn(nano_path, {fmt: tmp_path / fmt}, PRESETS[preset])[fmt]
    with torch.no_grad():
        ours = dequantized_model(out)(PROMPT)
    client = transformers_logits_fn(out)(PROMPT)
    assert client.shape == ours.shape
    assert rel_err(client, ours) <= 1e-3


@pytest.mark.parametrize("name", ["gptqmodel-sym-g32", "gptqmodel-asym-actorder-g32"])
def test_quantkit_reads_gptqmodel_checkpoint(name):
    """GPTQModel 7.6 wrote these (scripts/make_gptqmodel_fixture.py): v1 zeros, sym and asym, act-order g_idx."""
    path = FIXTURES / name
    ckpt = read_checkpoint(path)
    assert ckpt.format == "gptq"
    q = ckpt.get("model.layers.0.self_attn.q_proj.weight")
    assert q.bits == 4 and q.group_size == 32
    if "actorder" in name:
        assert q.has_act_order and not q.symmetric
    saved = torch.load(path / "reference_logits.pt")
    prompt = torch.tensor(saved["prompt_ids"])
    with torch.no_grad():
        ours = dequantized_model(ckpt)(prompt)
    # GPTQModel's own CPU forward (recorded when the fixture was made) rounds inside its kernel: ~2e-3
    assert rel_err(ours, saved["logits"]) <= 1e-2
    if missing_client("gptq") is None:
        # transformers loading the same GPTQModel checkpoint agrees to fp32 precision
        assert rel_err(ours, transformers_logits_fn(path)(prompt)) <= 1e-3


def test_gptqmodel_dequantizes_exactly_what_quantkit_reads():
    """Every linear: GPTQModel's own dequantize_weight() equals quantkit's QuantTensor.dequantize() bit for bit."""
    need("gptq")
    import os

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel

    for name in ("gptqmodel-sym-g32", "gptqmodel-asym-actorder-g32"):
        path = FIXTURES / name
        ckpt = read_checkpoint(path)
        model = GPTQModel.load(str(path), device="cpu", dtype=torch.float32).model
        checked = 0
        for mod_name, module in model.named_modules():
            if hasattr(module, "dequantize_weight") and mod_name + ".weight" in ckpt:
                theirs = module.dequantize_weight().T.float()
                assert torch.equal(theirs, ckpt.get(mod_name + ".weight").dequantize()), (name, mod_name)
                checked += 1
        assert checked == 14, (name, checked)
