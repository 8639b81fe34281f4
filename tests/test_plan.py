"""The plan: per-tensor targets, sizes and BPW, overrides, memory estimate, bad input, `quantkit plan` CLI."""

import json

import pytest

from quantkit.cli import main as cli_main
from quantkit.errors import SchemeError
from quantkit.model.config import ModelConfig
from quantkit.formats.base import get_format
from quantkit.gguf.mixes import tensor_nbytes
from quantkit.pipeline.plan import build_plan
from quantkit.quant.scheme import get_preset
from quantkit.testing import make_random_checkpoint

NANO = ModelConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=32000)


def test_scheme_bytes_by_hand():
    # 256 x 768 at int4 g128 symmetric: codes 98304 B, scales 256*6*2, GPTQ also packs zeros (4 bit) and g_idx
    s = get_preset("w4a16-g128")
    ct, gptq, awq = (get_format(f) for f in ("compressed-tensors", "gptq", "awq"))
    assert ct.stored_nbytes(s, (256, 768), 2) == 256 * 768 // 2 + 256 * 6 * 2 + 16  # + weight_shape
    assert gptq.stored_nbytes(s, (256, 768), 2) == 256 * 768 // 2 + 256 * 6 * 2 + 256 * 6 // 2 + 768 * 4
    asym = get_preset("w4a16-g128-asym")
    assert awq.stored_nbytes(asym, (256, 768), 2) == 256 * 768 // 2 + 256 * 6 * 2 + 256 * 6 // 2
    w8 = get_preset("w8a16")  # per channel: one scale per row
    assert ct.stored_nbytes(w8, (1024, 4096), 2) == 1024 * 4096 + 1024 * 2 + 16
    assert ct.stored_nbytes(None, (1024, 4096), 2) == 1024 * 4096 * 2
    assert get_format("gguf").stored_nbytes("Q4_K", (4096, 4096), 2) == 4096 * 16 * 144
    assert tensor_nbytes((32, 64), "Q8_0") == 32 * 2 * 34


def test_plan_numbers_for_nano_w4a16_g128():
    plan = build_plan(NANO, preset="w4a16-g128", formats=["compressed-tensors"])
    ct = "compressed-tensors"
    entries = {e.name: e for e in plan.entries}
    assert len(entries) == 3 + 9 * 6
    q = entries["model.layers.0.self_attn.q_proj.weight"]
    assert q.target == get_preset("w4a16-g128") and q.bytes_in == 256 * 256 * 2
    assert q.bytes_out[ct] == 256 * 256 // 2 + 256 * 2 * 2 + 16
    assert q.bpw(ct) == pytest.approx(4 + 16 / 128 + 128 / (256 * 256))
    assert entries["lm_head.weight"].target is None and entries["lm_head.weight"].bpw(ct) == 16
    assert entries["model.layers.3.input_layernorm.weight"].target is None
    assert plan.bytes_in == 2 * NANO.num_parameters()
    assert plan.bytes_out(ct) == sum(e.bytes_out[ct] for e in plan.entries)
    assert plan.bpw(ct) == pytest.approx(8 * plan.bytes_out(ct) / NANO.num_parameters())
    d = plan.to_dict()
    assert d["quantized_tensors"] == 42 and d["outputs"][0]["quantized_bpw"] == pytest.approx(4.125, abs=0.01)
    assert "peak_ram_bytes" in d["memory"] and "peak_vram_bytes" not in d["memory"]


def test_multi_format_plan_sizes_each_format_as_written(tmp_path):
    """Each format of a multi-format run reports its own size, equal to the tensor bytes it then writes."""
    from safetensors import safe_open

    from quantkit.model.checkpoint import open_checkpoint

    src = make_random_checkpoint(tmp_path / "src")
    ckpt = open_checkpoint(src)
    out = tmp_path / "out"
    assert cli_main_rc(["quantize", str(src), "--preset", "w4a16-g32", "--format", "gptq,compressed-tensors,dump",
                        "-o", str(out), "--no-progress"]) == 0
    plan = build_plan(ckpt.config, preset="w4a16-g32", formats=["gptq", "compressed-tensors", "dump"],
                      checkpoint=ckpt)
    assert plan.bytes_out("gptq") != plan.bytes_out("compressed-tensors")
    for fmt in ("gptq", "compressed-tensors", "dump"):
        written = 0
        for f in (out / fmt).glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                written += sum(_nbytes(st.get_slice(k)) for k in st.keys())
        assert written == plan.bytes_out(fmt), fmt


def _nbytes(sl) -> int:
    n = {"I32": 4, "F16": 2, "BF16": 2, "F32": 4, "U8": 1, "I8": 1, "I64": 8}[sl.get_dtype()]
    for d in sl.get_shape():
        n *= d
    return n


def cli_main_rc(args) -> int:
    try:
        cli_main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_plan_overrides_skip_and_fused_groups():
    plan = build_plan(NANO, preset="w4a16-g128", formats=["dump"],
                      overrides=["re:.*down_proj=w8a16", r"-:model\.layers\.0\..*",
                                 "model.layers.2.self_attn.k_proj=w4a16-g32"])
    t = plan.targets()
    assert t["model.layers.1.mlp.down_proj.weight"] == get_preset("w8a16")
    assert all(t[f"model.layers.0.{m}.weight"] is None for m in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"))
    # k_proj follows its fused group's leader (q_proj) so q/k/v share one scheme
    assert (t["model.layers.2.self_attn.k_proj.weight"] == t["model.layers.2.self_attn.q_proj.weight"]
            == get_preset("w4a16-g128"))


def test_plan_gguf_types_come_from_the_mix():
    from quantkit.gguf.mixes import tensor_types

    plan = build_plan(NANO, formats=["gguf"], gguf_type="Q4_K_M")
    assert plan.targets() == tensor_types(NANO, "Q4_K_M")
    assert plan.bytes_out("gguf") == sum(tensor_nbytes(e.shape, e.target) for e in plan.entries)
    lm = next(e for e in plan.entries if e.name == "lm_head.weight")
    assert lm.target == "Q6_K" and lm.bytes_out["gguf"] == tensor_nbytes((32000, 256), "Q6_K")
    over = build_plan(NANO, formats=["gguf"], gguf_type="Q4_K_M", overrides=["re:.*ffn_up.*=Q8_0"])
    assert over.targets()["model.layers.4.mlp.up_proj.weight"] == "Q8_0"


def test_plan_bad_input():
    with pytest.raises(SchemeError, match="unknown preset 'w5a16'"):
        build_plan(NANO, preset="w5a16", formats=["dump"])
    small = ModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=1000)
    with pytest.raises(SchemeError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight: group_size 128 does not "
                                          r"divide the input dimension 64"):
        build_plan(small, preset="w4a16-g128", formats=["dump"])
    with pytest.raises(SchemeError, match="needs --type"):
        build_plan(NANO, formats=["gguf"])
    with pytest.raises(SchemeError, match="unknown method"):
        build_plan(NANO, method="hqq", formats=["dump"])


def test_memory_estimate_independent_of_depth():
    def peak(layers, samples=128):
        cfg = ModelConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=32000)
        plan = build_plan(cfg, preset="w4a16-g128", formats=["dump"], method="gptq", n_samples=samples, seqlen=512)
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


@pytest.mark.parametrize("args", [["--preset", "w4a16-g32", "--format", "gptq"], ["--type", "Q4_K_M"]],
                         ids=["rtn-gptq", "gguf-Q4_K_M"])
def test_plan_and_quantize_print_the_same_bpw(tmp_path, capsys, args):
    """One BPW definition (formats.sizes.bits_per_weight: tensor bytes x 8 / all parameters): the BPW `plan`
    prints is the BPW `quantize` prints for the file it writes, and the planned bytes are the stored tensor bytes."""
    src = make_random_checkpoint(tmp_path / "src", layers=2, hidden=256, intermediate=512, heads=4, kv_heads=2)
    cli_main(["plan", str(src), *args, "--json"])
    plan = json.loads(capsys.readouterr().out)["outputs"][0]
    out = tmp_path / ("m.gguf" if "--type" in args else "out")
    cli_main(["quantize", str(src), *args, "-o", str(out), "--json", "--no-progress"])
    result = json.loads(capsys.readouterr().out)["outputs"][0]
    assert result["tensor_bytes"] == plan["bytes"] == result["planned_bytes"]
    assert result["bpw"] == plan["bpw"] == result["planned_bpw"] and 4 < plan["bpw"] < 16
    assert result["bytes"] > result["tensor_bytes"]  # the file adds headers (and, for GGUF, the vocabulary)
    cli_main(["plan", str(src), *args])
    plan_text = capsys.readouterr().out.splitlines()
    cli_main(["quantize", str(src), *args, "-o", str(tmp_path / "again"), "--force", "--no-progress"])
    quant_text = capsys.readouterr().out.splitlines()
    planned = next(line for line in plan_text if line.startswith("quant size"))
    written = next(line for line in quant_text if line.startswith("quant size"))
    assert planned.split("[")[0] == written.split("[")[0], (planned, written)  # same MiB, BPW and percentage


def test_the_plan_says_what_stays_in_float_and_why():
    cfg = ModelConfig.from_file("models/mistral-nano/config.json")
    gptq = build_plan(cfg, preset="w4a16-g128", formats=["gptq"]).kept_in_float()
    assert gptq[0].startswith("13 norm weights (1-D")
    assert gptq[1].startswith("embed_tokens.weight, lm_head.weight (78% of the parameters): in gptq only")
    assert len(gptq) == 2
    assert build_plan(cfg, formats=["gguf"], gguf_type="Q4_K_M", preset=None).kept_in_float() == [gptq[0]]
    kept = build_plan(cfg, preset="w4a16-g128", formats=["gptq"], overrides=[r"-:.*layers\.0\..*"]).kept_in_float()
    assert kept[-1] == "7 linear weights: kept by --override"


def test_integer_formats_and_gguf_in_one_plan():
    """--format gptq,gguf --type Q4_K_M: each tensor has its integer scheme and its GGUF type; each output's size is
    its own; an override with a ggml type goes to the GGUF file, one with a preset to the integer format."""
    plan = build_plan(NANO, preset="w4a16-g128", formats=["gptq", "gguf"], gguf_type="Q4_K_M", method="gptq",
                      overrides=["re:.*down_proj.*=w8a16", "re:.*o_proj.*=Q8_0"])
    alone_int = build_plan(NANO, preset="w4a16-g128", formats=["gptq"], method="gptq",
                           overrides=["re:.*down_proj.*=w8a16"])
    alone_gguf = build_plan(NANO, formats=["gguf"], gguf_type="Q4_K_M", method="gptq", overrides=["re:.*o_proj.*=Q8_0"])
    assert plan.mixed and not alone_int.mixed
    assert plan.targets() == alone_int.targets()
    assert plan.targets("gguf") == alone_gguf.targets()
    assert plan.bytes_out("gptq") == alone_int.bytes_out("gptq")
    assert plan.bytes_out("gguf") == alone_gguf.bytes_out("gguf")
    assert plan.preset == "w4a16-g128" and plan.gguf_type == "Q4_K_M"
    o_proj = next(e for e in plan.entries if e.name.endswith("layers.0.self_attn.o_proj.weight"))
    assert o_proj.label() == "int4 g128 sym | Q8_0"
    assert "method gptq, w4a16-g128 + Q4_K_M, format gptq,gguf" in plan.render()
