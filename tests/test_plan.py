"""The plan: per-tensor targets, sizes and BPW, overrides, memory estimate, bad input, `quantkit plan` CLI."""

import json

import pytest

from quantkit.cli import main as cli_main
from quantkit.errors import SchemeError
from quantkit.model.config import ModelConfig
from quantkit.quant.plan import build_plan, estimate_memory, ggml_nbytes, scheme_nbytes
from quantkit.quant.scheme import Scheme, get_preset
from quantkit.testing import make_random_checkpoint

NANO = ModelConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=32000)


def test_scheme_bytes_by_hand():
    # 256 x 768 at int4 g128 symmetric: codes 98304 B, scales 256*6*2, GPTQ also packs zeros (4 bit) and g_idx
    s = get_preset("w4a16-g128")
    assert scheme_nbytes(s, (256, 768), "compressed-tensors") == 256 * 768 // 2 + 256 * 6 * 2
    assert scheme_nbytes(s, (256, 768), "gptq") == 256 * 768 // 2 + 256 * 6 * 2 + 256 * 6 // 2 + 768 * 4
    asym = get_preset("w4a16-g128-asym")
    assert scheme_nbytes(asym, (256, 768), "awq") == 256 * 768 // 2 + 256 * 6 * 2 + 256 * 6 // 2
    w8 = get_preset("w8a16")  # per channel: one scale per row
    assert scheme_nbytes(w8, (1024, 4096), "compressed-tensors") == 1024 * 4096 + 1024 * 2
    assert ggml_nbytes("Q4_K", (4096, 4096)) == 4096 * 16 * 144
    assert ggml_nbytes("Q8_0", (32, 64)) == 32 * 2 * 34


def test_plan_numbers_for_nano_w4a16_g128():
    plan = build_plan(NANO, preset="w4a16-g128", formats=["dump"])
    entries = {e.name: e for e in plan.entries}
    assert len(entries) == 3 + 9 * 6
    q = entries["model.layers.0.self_attn.q_proj.weight"]
    assert q.target == get_preset("w4a16-g128") and q.bytes_in == 256 * 256 * 2
    assert q.bytes_out == 256 * 256 // 2 + 256 * 2 * 2
    assert q.bpw == pytest.approx(4 + 16 / 128)
    assert entries["lm_head.weight"].target is None and entries["lm_head.weight"].bpw == 16
    assert entries["model.layers.3.input_layernorm.weight"].target is None
    assert plan.bytes_in == 2 * NANO.num_parameters()
    assert plan.bytes_out == sum(e.bytes_out for e in plan.entries)
    assert plan.bpw == pytest.approx(8 * plan.bytes_out / NANO.num_parameters())
    d = plan.to_dict()
    assert d["quantized_tensors"] == 42 and d["quantized_bpw"] == pytest.approx(4.125)
    assert "peak_ram_bytes" in d["memory"] and "peak_vram_bytes" not in d["memory"]


def test_plan_overrides_skip_and_fused_groups():
    plan = build_plan(NANO, preset="w4a16-g128", formats=["dump"],
                      overrides=["re:.*down_proj=w8a16", r"-:model\.layers\.0\..*", "model.layers.2.self_attn.k_proj=w4a16-g32"])
    t = plan.targets()
    assert t["model.layers.1.mlp.down_proj.weight"] == get_preset("w8a16")
    assert all(t[f"model.layers.0.{m}.weight"] is None for m in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"))
    # k_proj follows its fused group's leader (q_proj) so q/k/v share one scheme
    assert t["model.layers.2.self_attn.k_proj.weight"] == t["model.layers.2.self_attn.q_proj.weight"] == get_preset("w4a16-g128")


def test_plan_gguf_types_come_from_the_mix():
    from quantkit.gguf.mixes import tensor_types

    plan = build_plan(NANO, formats=["gguf"], gguf_type="Q4_K_M")
    assert plan.targets() == tensor_types(NANO, "Q4_K_M")
    assert plan.bytes_out == sum(ggml_nbytes(e.target, e.shape) for e in plan.entries)
    lm = next(e for e in plan.entries if e.name == "lm_head.weight")
    assert lm.target == "Q6_K" and lm.bytes_out == ggml_nbytes("Q6_K", (32000, 256))
    over = build_plan(NANO, formats=["gguf"], gguf_type="Q4_K_M", overrides=["re:.*ffn_up.*=Q8_0"])
    assert over.targets()["model.layers.4.mlp.up_proj.weight"] == "Q8_0"


def test_plan_bad_input():
    with pytest.raises(SchemeError, match="unknown preset 'w5a16'"):
        build_plan(NANO, preset="w5a16", formats=["dump"])
    small = ModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=1000)
    with pytest.raises(SchemeError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight: group_size 128 does not divide "
                                          r"the input dimension 64"):
        build_plan(small, preset="w4a16-g128", formats=["dump"])
    with pytest.raises(SchemeError, match="needs --type"):
        build_plan(NANO, formats=["gguf"])
    with pytest.raises(SchemeError, match="same run"):
        build_plan(NANO, formats=["gguf", "dump"], gguf_type="Q4_K_M")
    with pytest.raises(SchemeError, match="unknown method"):
        build_plan(NANO, method="hqq", formats=["dump"])


def test_memory_estimate_independent_of_depth():
    def peak(layers, samples=128):
        cfg = ModelConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=32000)
        plan = build_plan(cfg, preset="w4a16-g128", formats=["dump"], method="gptq", n_samples=samples, seqlen=512,
                          max_shard_bytes=1 << 30)
        return plan.memory["peak_ram_bytes"]

    assert peak(8) == peak(32)  # one layer at a time
    assert peak(32, samples=256) > peak(32, samples=128)  # activations scale with the calibration set
    # a Mistral-7B GPTQ run at 128 x 512 needs less than the BF16 model's 13.5 GiB
    assert peak(32) < 12 * 1024**3


def test_plan_cli_human_and_json(tmp_path, capsys):
    src = make_random_checkpoint(tmp_path / "m", layers=2, hidden=64, intermediate=128)
    cli_main(["plan", str(src), "--preset", "w4a16-g32", "--format", "dump", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert d["quantized_tensors"] == 14 and d["tensors"] == 21
    cli_main(["plan", str(src), "--preset", "w4a16-g32", "--format", "dump"])
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj.weight" in out and "quant size" in out and "estimated peak RAM" in out
    with pytest.raises(SystemExit) as e:
        cli_main(["plan", str(src), "--preset", "w4a16-g128", "--format", "dump"])
    assert e.value.code == 1
    assert "does not divide the input dimension 64" in capsys.readouterr().err
