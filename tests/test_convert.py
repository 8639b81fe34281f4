"""`quantkit convert`: HF <-> consolidated layouts, dtype and shard size, exact tensors, refusals."""

import json

import pytest
import torch

from quantkit.cli import main
from quantkit.formats.base import read_checkpoint
from quantkit.model.checkpoint import open_checkpoint
from quantkit.testing import make_random_checkpoint


def run(*args):
    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code


def run_ok(capsys, *args):
    try:
        main(list(args))
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    return capsys.readouterr()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("c") / "src", hidden=64, heads=4, kv_heads=2,
                                  intermediate=128, layers=2, vocab=512)


def tensors(path, dtype=None):
    ck = open_checkpoint(path)
    return {n: ck.get_tensor(n) for n in ck.tensor_names()}


def test_hf_to_consolidated_and_back_is_exact(source, tmp_path, capsys):
    cons, back = tmp_path / "cons", tmp_path / "back"
    out = run_ok(capsys, "convert", str(source), "-o", str(cons), "--format", "consolidated")
    assert out.out.strip() == str(cons)
    assert (cons / "params.json").exists() and (cons / "consolidated.safetensors").exists()
    assert not (cons / "config.json").exists() and (cons / "tokenizer.model").exists()
    assert read_checkpoint(cons).format == "consolidated"
    from safetensors import safe_open
    with safe_open(str(cons / "consolidated.safetensors"), "pt") as f:
        assert "layers.0.attention.wq.weight" in f.keys()
    run_ok(capsys, "convert", str(cons), "-o", str(back), "--format", "hf")
    a, b = tensors(source), tensors(back)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert read_checkpoint(back).format == "hf"


def test_dtype_and_shards(source, tmp_path, capsys):
    out = tmp_path / "f32"
    run_ok(capsys, "convert", str(source), "-o", str(out), "--format", "hf", "--dtype", "f32", "--shard-size", "100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    a, b = tensors(source), tensors(out)
    assert all(b[n].dtype == torch.float32 and torch.equal(a[n].float(), b[n]) for n in a)


def test_transformers_loads_converted(source, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    run_ok(capsys, "convert", str(source), "-o", str(out), "--format", "hf", "--dtype", "f32", "--shard-size", "200KB")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    from quantkit.model.reference import Transformer
    ref = Transformer.from_checkpoint(open_checkpoint(source))
    ids = torch.tensor([[1, 5, 9, 100, 200, 300]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids), atol=1e-4, rtol=1e-4)


def test_refusals(source, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert run("convert", str(source), "-o", str(out), "--format", "hf") == 4
    assert "--force" in capsys.readouterr().err
    run_ok(capsys, "convert", str(source), "-o", str(out), "--format", "hf", "--force")
    assert (out / "config.json").exists()
    assert run("convert", str(tmp_path / "nope"), "-o", str(tmp_path / "x"), "--format", "hf") == 1
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
