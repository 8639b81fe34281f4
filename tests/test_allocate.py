"""GGUF types by measurement under a size budget: the solver, the sensitivity measurement, and
`quantize --target-bpw` end to end (budget met, predicted KLD close to the written file's measured KLD)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from quantkit.errors import QuantkitError, SchemeError
from quantkit.quant.allocate import Option, _greedy, allocate, lower_hull
from quantkit.testing import make_random_checkpoint
from tests.cli_helpers import run_captured

# ------------------------------------------------------------------ the solver


def brute_force(options: dict[str, list[Option]], budget: int) -> float:
    best = float("inf")
    for combo in itertools.product(*options.values()):
        if sum(o.nbytes for o in combo) <= budget:
            best = min(best, sum(o.cost for o in combo))
    return best


def random_options(rng, n_tensors: int) -> dict[str, list[Option]]:
    out = {}
    for i in range(n_tensors):
        size = int(rng.integers(1, 20))
        bits = sorted(rng.choice(np.arange(2, 9), size=int(rng.integers(1, 5)), replace=False))
        scale = float(rng.random()) + 0.1
        out[f"t{i}"] = [Option(f"b{b}", size * b, scale * 2.0 ** -b * float(rng.uniform(0.7, 1.3))) for b in bits]
    return out


def test_lower_hull_drops_dominated_and_concave_points():
    opts = [Option("a", 10, 1.0), Option("b", 20, 0.9), Option("c", 30, 0.2), Option("d", 40, 0.5),
            Option("e", 50, 0.1)]
    assert [o.label for o in lower_hull(opts)] == ["a", "c", "e"]  # b above the segment a-c, d dominated by c


def test_allocation_fits_the_budget_and_is_near_the_exact_optimum():
    rng = np.random.default_rng(0)
    exact = 0
    for trial in range(60):
        options = random_options(rng, int(rng.integers(4, 9)))
        smallest = sum(min(o.nbytes for o in opts) for opts in options.values())
        largest = sum(max(o.nbytes for o in opts) for opts in options.values())
        budget = int(rng.integers(smallest, largest + 1))
        got = allocate(options, budget)
        assert got.nbytes <= budget
        opt = brute_force(options, budget)
        assert got.cost >= opt - 1e-12
        # never worse than the optimum by more than one tensor's largest step (the greedy's last-item gap)
        gap = max(max(o.cost for o in opts) - min(o.cost for o in opts) for opts in options.values())
        assert got.cost <= opt + gap + 1e-12
        exact += abs(got.cost - opt) < 1e-12
        assert got.cost <= _greedy(options, budget).cost  # the plain greedy is one of the candidates
    assert exact >= 58  # the plain greedy alone: 43 of these 60


def test_a_wide_tensor_whose_upgrade_stops_fitting_is_chosen_exactly():
    """The greedy upgrades the small tensor first (more cost saved per byte); the wide tensor's upgrade then no
    longer fits and its 100 bytes go unused. Enumerating the widest tensors finds the better choice."""
    options = {"small": [Option("lo", 10, 0.1), Option("hi", 20, 0.0)],
               "wide": [Option("lo", 100, 1.0), Option("hi", 200, 0.5)]}
    assert _greedy(options, 210).labels() == {"small": "hi", "wide": "lo"}  # cost 1.0
    got = allocate(options, 210)
    assert got.labels() == {"small": "lo", "wide": "hi"} and got.cost == pytest.approx(0.6)
    assert list(got.choice) == ["small", "wide"]  # in the caller's order


def test_allocation_extremes_and_errors():
    options = {"x": [Option("lo", 10, 1.0), Option("hi", 30, 0.1)], "y": [Option("lo", 5, 2.0), Option("hi", 9, 0.5)]}
    assert allocate(options, 15).labels() == {"x": "lo", "y": "lo"}
    assert allocate(options, 39).labels() == {"x": "hi", "y": "hi"}
    assert allocate(options, 19).labels() == {"x": "lo", "y": "hi"}  # 1.5/4 bytes beats 0.9/20
    with pytest.raises(SchemeError, match="below the smallest choice"):
        allocate(options, 14)
    with pytest.raises(SchemeError, match="no storage option"):
        allocate({"z": []}, 100)


# ------------------------------------------------------------------ measurement and end to end

SENS = ["--sensitivity-samples", "2", "--sensitivity-seqlen", "48"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Hidden 256 (every linear takes the 256-blocks), with enough decoder weight beside the two 32000-row
    matrices for the budget to be filled closely."""
    return make_random_checkpoint(tmp_path_factory.mktemp("alloc") / "m", layout="hf-single", hidden=256, layers=4,
                                  heads=4, kv_heads=2, intermediate=1024, seed=4)


def _quantize(capsys, src, out, cache, *extra):
    code, cap = run_captured(capsys, "quantize", src, "-o", out, "--sensitivity", cache, *SENS, "--json", *extra)
    return code, cap.out, cap.err


def test_target_bpw_meets_the_budget_and_predicts_the_measured_kld(small, tmp_path, capsys):
    cache = tmp_path / "sens.json"
    code, out, err = _quantize(capsys, small, tmp_path / "a.gguf", cache, "--target-bpw", "4.0")
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    a = res["allocation"]
    assert a["tensor_bytes"] <= a["budget_bytes"] and a["tensor_bytes"] >= 0.995 * a["budget_bytes"]
    assert abs(res["outputs"][0]["bpw"] - 4.0) <= 0.02
    assert len(set(a["targets"].values()) - {"F32"}) >= 2  # a real mix, not one type
    assert a["measured_pairs"] > 0
    assert abs(a["predicted_kld"] / a["measured_kld"] - 1) <= 0.25
    table = json.loads(cache.read_text())
    assert all(v >= 0 for row in table["kld"].values() for v in row.values())
    for row in table["kld"].values():  # more bits, less divergence
        assert row["Q8_0"] < row["Q4_K"] < row["Q2_K"]
    # measured as llama.cpp's CPU backend multiplies: every matrix but the (looked-up) embedding has the penalty of
    # its input rounded to Q8_K (k-quants) and to Q8_0 / Q8_1 (the legacy candidates)
    assert a["activation_rounding"] == "llama.cpp-cpu"
    matrices = set(table["kld"]) - {"model.embed_tokens.weight"}
    assert set(table["activation"]) == matrices
    assert all(set(row) == {"Q8_0", "Q8_1", "Q8_K"} and min(row.values()) > 0 for row in table["activation"].values())
    # a second budget reuses every measurement
    code, out, err = _quantize(capsys, small, tmp_path / "b.gguf", cache, "--target-bpw", "6.0")
    assert code == 0, err
    b = json.loads(out.strip().splitlines()[-1])["allocation"]
    assert b["measured_pairs"] == 0 and b["predicted_kld"] < a["predicted_kld"]
    # exact products: the same measurements without the penalties, predicting and measuring less
    code, out, err = _quantize(capsys, small, tmp_path / "c.gguf", cache, "--target-bpw", "4.0",
                               "--activation-rounding", "none")
    assert code == 0, err
    c = json.loads(out.strip().splitlines()[-1])["allocation"]
    assert c["measured_pairs"] == 0 and c["activation_rounding"] == "none"
    assert c["predicted_kld"] < a["predicted_kld"] and c["measured_kld"] < a["measured_kld"]
    assert abs(c["predicted_kld"] / c["measured_kld"] - 1) <= 0.25


def test_one_tensor_sensitivity_equals_the_kld_of_a_file_holding_only_that_change(small, tmp_path):
    """The measurement is exact for one tensor: a GGUF with that tensor in that type and every other tensor F32,
    read back by the runtime, has the same KLD on the same tokens."""
    from quantkit.calib import load_calibration
    from quantkit.eval.sensitivity import ggml_candidates, measure_sensitivity, model_kld
    from quantkit.gguf.convert import write_gguf
    from quantkit.gguf.mixes import tensor_types
    from quantkit.model.checkpoint import open_checkpoint
    from quantkit.model.tokenizer import load_tokenizer
    from quantkit.runtime.model import load_model

    ckpt = open_checkpoint(small)
    tokens = load_calibration("builtin", load_tokenizer(ckpt.tokenizer_path), 2, 48, 0).tokens
    name = "model.layers.1.mlp.down_proj.weight"
    table = measure_sensitivity(ckpt, tokens, ggml_candidates(["Q2_K"], {}), {name: [name]}, tmp_path / "s.json",
                                {"test": 1})
    types = tensor_types(ckpt.config, "F32") | {name: "Q2_K"}
    out = write_gguf(ckpt, tmp_path / "one.gguf", "F32", progress=False, types=types)
    measured = model_kld(ckpt, tokens, load_model(out))
    assert measured > 1e-4
    assert table.kld[name]["Q2_K"] == pytest.approx(measured, rel=1e-3)
    with pytest.raises(QuantkitError, match="another model, calibration or imatrix"):
        measure_sensitivity(ckpt, tokens, ggml_candidates(["Q2_K"], {}), {name: [name]}, tmp_path / "s.json",
                            {"test": 2})


def test_activation_penalty_equals_the_kld_of_that_input_rounded_as_llamacpp_cpu(small, tmp_path):
    """A tensor's activation penalty is the KLD of the full-precision model whose product with that tensor alone is
    computed as llama.cpp's CPU backend computes it (`GGMLNumericsLinear`: the input rounded to the vec_dot_type
    of a weight type that pairs with it); with the weight quantized too, the file multiplied that way measures
    about the sum of its two sensitivities."""
    import torch

    from quantkit.calib import load_calibration
    from quantkit.eval.sensitivity import ggml_candidates, measure_sensitivity, model_kld
    from quantkit.gguf.activations import GGMLNumericsLinear
    from quantkit.model.checkpoint import open_checkpoint
    from quantkit.model.reference import Transformer
    from quantkit.model.tokenizer import load_tokenizer

    ckpt = open_checkpoint(small)
    tokens = load_calibration("builtin", load_tokenizer(ckpt.tokenizer_path), 2, 48, 0).tokens
    names = ["model.layers.1.mlp.down_proj.weight", "lm_head.weight", "model.embed_tokens.weight"]
    table = measure_sensitivity(ckpt, tokens, ggml_candidates(["Q3_K"], {}), {n: [n] for n in names},
                                tmp_path / "s.json", {"test": 1}, activation_types=["Q8_K", "Q8_0", "F32"])
    assert "model.embed_tokens.weight" not in table.activation  # a lookup: nothing is multiplied
    for name in names[:2]:
        assert set(table.activation[name]) == {"Q8_K", "Q8_0"}  # F32 rounds nothing
        for vec_dot_type, weight_type in (("Q8_K", "Q3_K"), ("Q8_0", "Q5_0")):
            model = Transformer.from_checkpoint(ckpt, torch.float32)
            parent, _, child = name.removesuffix(".weight").rpartition(".")
            module = model.get_submodule(name.removesuffix(".weight"))
            setattr(model.get_submodule(parent) if parent else model, child,
                    GGMLNumericsLinear(module.weight.detach(), weight_type))
            measured = model_kld(ckpt, tokens, model)
            assert measured > 1e-7
            assert table.activation[name][vec_dot_type] == pytest.approx(measured, rel=1e-3), (name, vec_dot_type)
            if vec_dot_type == "Q8_K":  # the weight's rounding and its input's add up
                from quantkit.gguf.codec import encode

                weight = encode(module.weight.detach(), "Q3_K", name=name).dequantize(torch.float32)
                setattr(model.get_submodule(parent) if parent else model, child, GGMLNumericsLinear(weight, "Q3_K"))
                both = table.kld[name]["Q3_K"] + table.activation[name]["Q8_K"]
                assert model_kld(ckpt, tokens, model) == pytest.approx(both, rel=0.2), name
    again = measure_sensitivity(ckpt, tokens, ggml_candidates(["Q3_K"], {}), {n: [n] for n in names},
                                tmp_path / "s.json", {"test": 1}, activation_types=["Q8_K", "Q8_0"])
    assert again.activation == table.activation and again.measured == 0  # saved with the table
    saved = json.loads((tmp_path / "s.json").read_text())
    (tmp_path / "bad.json").write_text(json.dumps({**saved, "activation": {names[0]: "Q8_K"}}))
    with pytest.raises(QuantkitError, match="bad.json: field 'activation' must map tensor names"):
        measure_sensitivity(ckpt, tokens, ggml_candidates(["Q3_K"], {}), {n: [n] for n in names},
                            tmp_path / "bad.json", {"test": 1}, activation_types=["Q8_K"])


def test_target_errors_are_one_line(small, tmp_path, capsys):
    cache = tmp_path / "sens.json"
    code, out, err = _quantize(capsys, small, tmp_path / "c.gguf", cache, "--target-bpw", "4", "--type", "Q4_K_M")
    assert code != 0 and "error:" in err and "--type Q4_K_M and --target-bpw" in err and "Traceback" not in err
    code, out, err = _quantize(capsys, small, tmp_path / "c.gguf", cache, "--target-bpw", "1.5")
    assert code != 0 and "error:" in err and "below the smallest choice" in err
    assert not (tmp_path / "c.gguf").exists()
    code, out, err = _quantize(capsys, small, tmp_path / "c.gguf", cache, "--target-bpw", "4", "--format", "awq")
    assert code != 0 and "allocate one format at a time, one of gguf, gptq, compressed-tensors" in err
    code, out, err = _quantize(capsys, small, tmp_path / "c", cache, "--target-bpw", "4", "--format", "gptq",
                               "--preset", "w4a16-g128")
    assert code != 0 and "--preset w4a16-g128 and --target-bpw" in err


def test_target_bpw_for_gptq_chooses_presets_per_fused_group(small, tmp_path, capsys):
    """The HF formats: one preset per q/k/v, o, gate/up and down group, written as GPTQ `dynamic` rules that
    the reader (and the measured KLD) follow; embeddings and lm_head stay float and count against the budget."""
    cache = tmp_path / "sens.json"
    code, out, err = _quantize(capsys, small, tmp_path / "g", cache, "--target-bpw", "13.9", "--format", "gptq")
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    a = res["allocation"]
    assert a["tensor_bytes"] <= a["budget_bytes"]
    assert abs(res["outputs"][0]["bpw"] - a["bpw"]) < 1e-3
    targets = a["targets"]
    for layer in range(4):
        qkv = {targets[f"model.layers.{layer}.self_attn.{m}_proj.weight"] for m in "qkv"}
        gate_up = {targets[f"model.layers.{layer}.mlp.{m}_proj.weight"] for m in ("gate", "up")}
        assert len(qkv) == 1 and len(gate_up) == 1
    assert len(set(targets.values())) >= 2
    assert abs(a["predicted_kld"] / a["measured_kld"] - 1) <= 0.25
    config = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert config.get("dynamic"), config


def test_gptq_sensitivity_equals_the_kld_of_a_gptq_file_holding_only_that_change(small, tmp_path):
    """With GPTQ, a candidate is measured GPTQ-rounded on the full-precision model's Hessians of other windows
    (lm_head's: KL-weighted, per row cluster): exactly what the pipeline writes when that one tensor is quantized
    (its input is then the full-precision model's), calibrated on those windows. Without the Hessians (the
    data-free measurement) the two differ."""
    import quantkit
    from quantkit.calib import load_calibration
    from quantkit.eval.sensitivity import ggml_candidates, measure_sensitivity, model_kld
    from quantkit.model.checkpoint import open_checkpoint
    from quantkit.model.tokenizer import load_tokenizer
    from quantkit.runtime.model import load_model

    ckpt = open_checkpoint(small)
    tokenizer = load_tokenizer(ckpt.tokenizer_path)
    tokens = load_calibration("builtin", tokenizer, 2, 48, 0).tokens
    other = load_calibration("builtin", tokenizer, 8, 128, 1).tokens  # the Hessians' windows (the run's calibration)
    gptq = {"damp": 0.1, "block_size": 128, "group_aware": True}
    for name in ("model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        table = measure_sensitivity(ckpt, tokens, ggml_candidates(["Q2_K"], {}, gptq), {name: [name]},
                                    tmp_path / f"{name}.json", {"test": 1}, hessians=True, head_clusters=8,
                                    hessian_tokens=other)
        rtn = measure_sensitivity(ckpt, tokens, ggml_candidates(["Q2_K"], {}), {name: [name]},
                                  tmp_path / f"{name}.rtn.json", {"test": 1})
        result = quantkit.quantize(small, tmp_path / f"{name}.gguf", method="gptq", formats="gguf", gguf_type="F32",
                                   overrides=[f"{name}=Q2_K"], calib="builtin", calib_samples=8, calib_seqlen=128,
                                   seed=1, compute_dtype="float32", head_clusters=8, **gptq)
        measured = model_kld(ckpt, tokens, load_model(result.paths["gguf"]))
        assert table.kld[name]["Q2_K"] == pytest.approx(measured, rel=1e-3), name
        assert rtn.kld[name]["Q2_K"] > 1.1 * measured, name  # GPTQ recovers more than the 10% the test needs
    assert any(r.get("module") == "lm_head" and r.get("hessian") == "KL, 8 row clusters" for r in result.log)


def test_embedding_sensitivity_with_gptq_equals_the_kld_of_its_fisher_rounded_file(small, tmp_path):
    """The embedding has no input: a GPTQ measurement rounds it against the output's Fisher matrix, measured once
    and kept beside the table; the run given that matrix writes exactly the measured embedding. With too few tokens
    to estimate the matrix, the embedding keeps its data-free encoding."""
    from quantkit.calib import load_calibration
    from quantkit.eval.sensitivity import (embedding_hessian_path, ggml_candidates, load_embedding_hessian,
                                           measure_sensitivity, model_kld)
    from quantkit.model.checkpoint import open_checkpoint
    from quantkit.model.tokenizer import load_tokenizer
    from quantkit.pipeline.quantize import QuantizeOptions, make_plan, quantize_checkpoint
    from quantkit.runtime.model import load_model

    ckpt = open_checkpoint(small)
    tokenizer = load_tokenizer(ckpt.tokenizer_path)
    name, cache = "model.embed_tokens.weight", tmp_path / "s.json"
    gptq = {"damp": 0.1, "block_size": 128, "group_aware": True}
    candidates = ggml_candidates(["Q2_K"], {}, gptq)

    few = load_calibration("builtin", tokenizer, 2, 48, 0).tokens  # 384 scores for 256 dimensions
    table = measure_sensitivity(ckpt, few, candidates, {name: [name]}, tmp_path / "few.json", {"t": 0}, hessians=True)
    rtn = measure_sensitivity(ckpt, few, ggml_candidates(["Q2_K"], {}), {name: [name]}, tmp_path / "few-rtn.json",
                              {"t": 0})
    assert table.embedding_hessian is None and table.kld == rtn.kld

    tokens = load_calibration("builtin", tokenizer, 8, 128, 0).tokens
    table = measure_sensitivity(ckpt, tokens, candidates, {name: [name]}, cache, {"test": 1}, hessians=True)
    assert table.embedding_hessian == embedding_hessian_path(cache) and table.embedding_hessian.exists()
    assert load_embedding_hessian(table.embedding_hessian, {"test": 1}).shape == (256, 256)
    with pytest.raises(QuantkitError, match="Fisher matrix of another model or calibration"):
        load_embedding_hessian(table.embedding_hessian, {"test": 2})
    again = measure_sensitivity(ckpt, tokens, candidates, {name: [name]}, cache, {"test": 1}, hessians=True)
    assert again.measured == 0 and again.embedding_hessian == table.embedding_hessian  # all from the cache
    rtn = measure_sensitivity(ckpt, tokens, ggml_candidates(["Q2_K"], {}), {name: [name]}, tmp_path / "r.json",
                              {"test": 1})

    plan = make_plan(ckpt, method="gptq", formats="gguf", gguf_type="F32", overrides=[f"{name}=Q2_K"],
                     calib="builtin", calib_samples=8, calib_seqlen=128, compute_dtype="float32")
    options = QuantizeOptions(calib="builtin", calib_samples=8, calib_seqlen=128,
                              embedding_hessian=table.embedding_hessian, **gptq)
    result = quantize_checkpoint(ckpt, plan, tmp_path / "e.gguf", options)
    measured = model_kld(ckpt, tokens, load_model(result.paths["gguf"]))
    assert table.kld[name]["Q2_K"] == pytest.approx(measured, rel=1e-3)
    assert measured < 0.95 * rtn.kld[name]["Q2_K"]  # the Fisher-weighted rounding beats the data-free one (0.91x)
    assert any(r.get("module") == "embed_tokens" and r.get("hessian") == "output fisher" for r in result.log)
