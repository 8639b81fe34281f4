"""Write -> read gives back identical codes, scales, zeros (and g_idx) for every format x scheme it holds;
bad input gives clear errors; an interrupted write leaves nothing behind."""

import json
import os

import pytest
import torch

from quantkit.errors import FormatError, OutputExistsError, SchemeError
from quantkit.formats.base import WriteOptions, get_format, read_checkpoint
from quantkit.pipeline.export import export_rtn
from quantkit.model.checkpoint import open_checkpoint
from quantkit.quant.scheme import PRESETS, Scheme
from quantkit.tensors import QuantTensor
from quantkit.testing import make_random_checkpoint

HOLDS = {
    "gptq": [Scheme(4, 32, True), Scheme(4, 64, False), Scheme(8, -1, True), Scheme(8, 128, False),
             Scheme(2, 64, False), Scheme(3, 32, False)],
    "awq": [Scheme(4, 32, False), Scheme(4, 128, True)],
    "compressed-tensors": [Scheme(4, 128, True), Scheme(4, 32, False), Scheme(8, -1, True), Scheme(8, 64, False),
                           Scheme(3, 32, False), Scheme(2, 64, True), Scheme(4, 64, True, scale_dtype="bfloat16")],
}
CASES = [(fmt, s) for fmt, schemes in HOLDS.items() for s in schemes]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("src") / "m", hidden=128, heads=4, kv_heads=2,
                                  intermediate=256, layers=2, vocab=1024, tokenizer=True)


def permuted_g_idx(qt: QuantTensor, seed: int) -> QuantTensor:
    """Give a QuantTensor an act-order style (non-monotonic) g_idx, keeping everything else."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(qt.in_features, generator=g)
    qt.g_idx = (torch.arange(qt.in_features) // qt.group_size)[perm].to(torch.int32)
    return qt


def written_tensors(source, fmt, scheme, tmp_path, transform=None, **opts):
    kept = {}

    def keep(name, t):
        t = transform(name, t) if transform and isinstance(t, QuantTensor) else t
        kept[name] = t
        return t

    out = export_rtn(source, {fmt: tmp_path / fmt}, scheme, WriteOptions(**opts), transform=keep)[fmt]
    return out, kept


def assert_same(qt_in, qt_out, name):
    assert isinstance(qt_out, QuantTensor), name
    assert torch.equal(qt_in.codes, qt_out.codes), name
    assert torch.equal(qt_in.zeros.to(torch.int32), qt_out.zeros.to(torch.int32)), name
    assert qt_in.scales.dtype == qt_out.scales.dtype and torch.equal(qt_in.scales, qt_out.scales), name
    assert torch.equal(qt_in.group_index(), qt_out.group_index()), name
    assert (qt_in.bits, qt_in.group_size) == (qt_out.bits, qt_out.group_size), name
    assert torch.equal(qt_in.dequantize(), qt_out.dequantize()), name


@pytest.mark.parametrize("fmt,scheme", CASES, ids=[f"{f}-{s.describe().replace(' ', '_')}" for f, s in CASES])
def test_round_trip_identical(source, tmp_path, fmt, scheme):
    out, kept = written_tensors(source, fmt, scheme, tmp_path)
    ckpt = read_checkpoint(out)
    assert ckpt.format == fmt
    src = open_checkpoint(source)
    assert set(ckpt.names) == set(src.tensor_names())
    for name, t in kept.items():
        got = ckpt.get(name)
        if isinstance(t, QuantTensor):
            assert_same(t, got, name)
            assert got.symmetric == t.symmetric or fmt == "awq"
        else:
            assert got.dtype == src.get_tensor(name).dtype and torch.equal(got, t), name
    files = set(os.listdir(out))
    assert {"config.json", "quantkit.json", "README.md", "tokenizer.model", "generation_config.json"} <= files
    card = (out / "README.md").read_text()
    assert "base_model: " in card and "base_model_relation: quantized" in card
    prov = json.loads((out / "quantkit.json").read_text())
    assert prov["method"] == "rtn" and prov["source"]["sha256"] and prov["layers"]
    assert "model.layers.0.self_attn.q_proj" in prov["layers"]


@pytest.mark.parametrize("fmt,ckfmt", [("gptq", "gptq"), ("gptq", "gptq_v2")])
def test_gptq_act_order_round_trip(source, tmp_path, fmt, ckfmt):
    scheme = Scheme(4, 32, True, act_order=True)
    out, kept = written_tensors(source, fmt, scheme, tmp_path, transform=lambda n, t: permuted_g_idx(t, len(n)),
                                extra={"checkpoint_format": ckfmt})
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is True and qc["checkpoint_format"] == ckfmt
    assert json.loads((out / "quantize_config.json").read_text()) == qc
    ckpt = read_checkpoint(out)
    for name, t in kept.items():
        if isinstance(t, QuantTensor):
            assert ckpt.get(name).has_act_order
            assert_same(t, ckpt.get(name), name)


def test_gptq_v1_symmetric_zero_words_on_disk(source, tmp_path):
    from safetensors import safe_open

    out, _ = written_tensors(source, "gptq", Scheme(4, 128, True), tmp_path)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        qz = f.get_tensor("model.layers.0.self_attn.q_proj.qzeros")
        gi = f.get_tensor("model.layers.0.self_attn.q_proj.g_idx")
        assert f.get_tensor("model.layers.0.self_attn.q_proj.scales").dtype == torch.float16
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16  # source dtype kept
    assert torch.all(qz == 0x77777777)
    assert torch.equal(gi.long(), torch.arange(128) // 128)


def test_asymmetric_gptq_defaults_to_v2(source, tmp_path):
    out, _ = written_tensors(source, "gptq", Scheme(4, 32, False), tmp_path)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq_v2"


def test_sharding_with_index(source, tmp_path):
    out, kept = written_tensors(source, "compressed-tensors", Scheme(4, 32, True), tmp_path, max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).exists() for s in shards)
    ckpt = read_checkpoint(out)
    assert_same(kept["model.layers.1.mlp.down_proj.weight"], ckpt.get("model.layers.1.mlp.down_proj.weight"), "down")


def test_mixed_schemes_and_unquantized_linear(source, tmp_path):
    from quantkit.quant.scheme import parse_override

    overrides = [parse_override("re:.*down_proj=w8a16"), parse_override("-:model\\.layers\\.1\\.self_attn\\.o_proj")]
    for fmt in ("gptq", "compressed-tensors"):
        outs = export_rtn(source, {fmt: tmp_path / fmt}, Scheme(4, 32, True), overrides=overrides)
        ckpt = read_checkpoint(outs[fmt])
        assert ckpt.get("model.layers.0.mlp.down_proj.weight").bits == 8
        assert ckpt.get("model.layers.0.mlp.up_proj.weight").bits == 4
        o = ckpt.get("model.layers.1.self_attn.o_proj.weight")
        assert isinstance(o, torch.Tensor) and o.dtype == torch.bfloat16


# ---- bad input ----

def test_scheme_refusals_name_the_nearest_scheme():
    with pytest.raises(SchemeError, match="nearest scheme it holds: w4a16"):
        get_format("awq").check_scheme(PRESETS["w3a16-g128"])
    with pytest.raises(SchemeError, match="symmetric"):
        get_format("gptq").check_scheme(PRESETS["w4a16-g128-asym"], checkpoint_format="gptq")
    with pytest.raises(SchemeError, match="float16"):
        get_format("gptq").check_scheme(Scheme(4, 128, True, scale_dtype="bfloat16"))
    get_format("gptq").check_scheme(PRESETS["w4a16-g128-asym"])  # v2 holds it


def test_writer_refuses_scheme_before_writing(source, tmp_path):
    with pytest.raises(SchemeError, match="4-bit"):
        export_rtn(source, {"awq": tmp_path / "a"}, Scheme(3, 32, False))
    with pytest.raises(SchemeError):
        export_rtn(source, {"gptq": tmp_path / "g"}, Scheme(4, 32, False),
                   WriteOptions(extra={"checkpoint_format": "gptq"}))
    assert os.listdir(tmp_path) == []


def test_act_order_refused_by_awq_and_compressed_tensors(source, tmp_path):
    for fmt in ("awq", "compressed-tensors"):
        with pytest.raises(SchemeError, match="gptq"):
            written_tensors(source, fmt, Scheme(4, 32, True), tmp_path, transform=lambda n, t: permuted_g_idx(t, 1))
    assert os.listdir(tmp_path) == []


def test_output_exists_refused_unless_force(source, tmp_path):
    (tmp_path / "gptq").mkdir()
    (tmp_path / "gptq" / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="--force"):
        written_tensors(source, "gptq", Scheme(4, 32, True), tmp_path)
    assert (tmp_path / "gptq" / "keep.txt").exists()
    with pytest.raises(OutputExistsError, match="not written by quantkit"):  # --force replaces only our own outputs
        written_tensors(source, "gptq", Scheme(4, 32, True), tmp_path, force=True)
    assert (tmp_path / "gptq" / "keep.txt").exists()
    (tmp_path / "gptq" / "keep.txt").unlink()
    (tmp_path / "gptq").rmdir()
    written_tensors(source, "gptq", Scheme(4, 32, True), tmp_path)
    out, _ = written_tensors(source, "gptq", Scheme(4, 32, True), tmp_path, force=True)
    assert (out / "config.json").exists() and (out / "quantkit.json").exists()


def test_interrupted_write_leaves_no_output(source, tmp_path):
    calls = []

    def boom(name, t):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return t

    for fmt in ("gptq", "awq", "compressed-tensors"):
        with pytest.raises(KeyboardInterrupt):
            written_tensors(source, fmt, Scheme(4, 32, True), tmp_path, transform=boom)
        calls.clear()
    assert os.listdir(tmp_path) == []  # no output, no temporary sibling


def test_missing_tensor_at_finish_leaves_no_output(source, tmp_path):
    fmt = get_format("gptq")
    ckpt = open_checkpoint(source)
    w = fmt.open_writer(tmp_path / "out", source, ckpt.config, {}, WriteOptions())
    w.add("model.embed_tokens.weight", ckpt.get_tensor("model.embed_tokens.weight"))
    with pytest.raises(FormatError, match="never written"):
        w.finish()
    assert os.listdir(tmp_path) == []


@pytest.fixture
def gptq_out(source, tmp_path):
    return written_tensors(source, "gptq", Scheme(4, 32, True), tmp_path)[0]


def test_corrupt_truncated_shard(gptq_out):
    f = gptq_out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="truncated"):
        read_checkpoint(gptq_out)


def test_corrupt_header(gptq_out):
    f = gptq_out / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"0" * 100)
    with pytest.raises(FormatError, match="model.safetensors"):
        read_checkpoint(gptq_out)


def test_wrong_shape_tensor_named(gptq_out):
    from safetensors.torch import load_file, save_file

    f = gptq_out / "model.safetensors"
    state = load_file(str(f))
    state["model.layers.0.mlp.up_proj.qzeros"] = state["model.layers.0.mlp.up_proj.qzeros"][:1]
    save_file(state, str(f))
    ckpt = read_checkpoint(gptq_out)
    with pytest.raises(FormatError, match="up_proj.qzeros"):
        ckpt.get("model.layers.0.mlp.up_proj.weight")


def test_missing_tensor_and_bad_config(gptq_out):
    from safetensors.torch import load_file, save_file

    f = gptq_out / "model.safetensors"
    state = load_file(str(f))
    del state["model.norm.weight"]
    save_file(state, str(f))
    with pytest.raises(FormatError, match="model.norm.weight"):
        read_checkpoint(gptq_out)
    cfg = json.loads((gptq_out / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = "marlin"
    (gptq_out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="marlin"):
        read_checkpoint(gptq_out)


def test_one_quantization_many_formats(source, tmp_path):
    """The same QuantTensors go to every format; all read back to identical tensors."""
    outs = {"gptq": tmp_path / "g", "awq": tmp_path / "a", "compressed-tensors": tmp_path / "c"}
    kept = {}

    def keep(name, t):
        kept[name] = t
        return t

    export_rtn(source, outs, Scheme(4, 32, False), transform=keep)
    readers = {fmt: read_checkpoint(p) for fmt, p in outs.items()}
    for name, t in kept.items():
        if isinstance(t, QuantTensor):
            for fmt, ck in readers.items():
                assert_same(t, ck.get(name), f"{fmt}:{name}")


def test_one_format_failing_aborts_all(source, tmp_path):
    """A tensor one format cannot hold (act-order into AWQ) leaves none of the outputs behind."""
    outs = {"gptq": tmp_path / "g", "awq": tmp_path / "a"}
    with pytest.raises(SchemeError):
        export_rtn(source, outs, Scheme(4, 32, True),
                   transform=lambda n, t: permuted_g_idx(t, 3) if isinstance(t, QuantTensor) else t)
    assert os.listdir(tmp_path) == []


def test_symmetric_v2_zeros_labelled_v1_are_recognised(source, tmp_path):
    """Some writers store true zeros (8) under checkpoint_format 'gptq'; for sym: true that is unambiguous."""
    out, kept = written_tensors(source, "gptq", Scheme(4, 32, True), tmp_path, extra={"checkpoint_format": "gptq_v2"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = cfg["quantization_config"]["format"] = "gptq"
    (out / "config.json").write_text(json.dumps(cfg))
    ckpt = read_checkpoint(out)
    name = "model.layers.0.mlp.up_proj.weight"
    assert_same(kept[name], ckpt.get(name), name)


def test_spilled_shard_writes_save_files_bytes(tmp_path):
    """Output shards are built from a spill file, never held in memory; the bytes equal safetensors' save_file
    (tensor layout by dtype then name, header, padding) for every dtype quantkit writes, empty and 0-d included."""
    from safetensors.torch import save_file

    from quantkit.formats.hf_dir import SAFETENSORS_DTYPES, SpilledShard

    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for i, dtype in enumerate(SAFETENSORS_DTYPES):
        base = torch.randn(3 + i, 5, generator=gen) * 50
        tensors[f"layer.{i}.{str(dtype)[6:]}"] = base > 0 if dtype == torch.bool else base.to(dtype)
    tensors["b.empty"] = torch.zeros(0, 4, dtype=torch.float16)
    tensors["a.scalar"] = torch.tensor(3.5)
    tensors["z.view"] = torch.arange(24, dtype=torch.int32).reshape(4, 6).t()  # not contiguous
    shard = SpilledShard(tmp_path / ".spill")
    for name, t in tensors.items():
        shard.add(name, t)
    shard.write(tmp_path / "ours.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "ref.safetensors"),
              metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert not shard and (tmp_path / ".spill").stat().st_size == 0  # the spill restarts for the next shard
    shard.close()
    assert not (tmp_path / ".spill").exists()
