"""The resume work directory (`quantkit.pipeline.workdir`): what a reloaded layer keeps alive."""

from __future__ import annotations

import gc
import sys
import weakref
from pathlib import Path

import pytest
import torch

from quantkit.pipeline.workdir import WorkDir


def _mapped(path: Path) -> bool:
    return any(line.rstrip().endswith(str(path)) for line in Path("/proc/self/maps").read_text().splitlines())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_reloaded_layer_releases_its_file_when_its_tensors_go(tmp_path):
    """A resumed run keeps each reloaded layer's imatrix for the whole run but hands its tensors to the writers and
    drops them. The imatrix must not be a view of the layer file: one small view keeps the whole file mapped, with
    every page the writers read still resident (and counted in the run's memory)."""
    work = WorkDir(tmp_path / "work", "fingerprint", num_layers=2)
    work.start(resume=False)
    weight = torch.randn(256, 512)
    work.save_layer(0, [("model.layers.0.mlp.up_proj.weight", weight, None)],
                    {"model.layers.0.mlp.up_proj.weight": (torch.rand(512), 64)}, [{"layer": 0}])
    named, imatrix, log = work.load_layer(0)
    assert torch.equal(named[0][1], weight) and log == [{"layer": 0}]
    layer_file = work._layer_file(0)
    assert _mapped(layer_file)
    del named
    gc.collect()
    assert not _mapped(layer_file)
    sums, count = imatrix["model.layers.0.mlp.up_proj.weight"]
    assert count == 64 and sums.shape == (512,)


def test_resumed_run_keeps_no_replayed_tensor_while_it_quantizes(tmp_path, monkeypatch):
    """A resumed run replays the finished tensors (views of the work-dir files) to the writers, then quantizes the
    next layer. No replayed tensor may live on into that layer: a loop variable that did kept the last replayed
    layer's whole file mapped, 0.3 GB of it resident at 7B, through the first resumed layer."""
    from quantkit.formats.dump import DumpWriter
    from quantkit.pipeline import layerwise
    from quantkit.pipeline.layerwise import PipelineOptions, quantize_model
    from quantkit.pipeline.plan import build_plan
    from quantkit.model.checkpoint import open_checkpoint
    from quantkit.testing import make_random_checkpoint

    ckpt = open_checkpoint(make_random_checkpoint(tmp_path / "src", layers=3, hidden=64, intermediate=128, heads=4,
                                                  kv_heads=2))
    targets = build_plan(ckpt.config, preset="w4a16-g32", formats=["dump"], method="gptq").targets()
    tokens = torch.randint(0, ckpt.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))

    def run():
        writer = DumpWriter(tmp_path / "out", max_shard_bytes=1)  # writes each tensor as it comes: holds none
        return quantize_model(ckpt, targets, [writer], tokens, PipelineOptions(method="gptq"),
                              work_dir=tmp_path / "work", progress=False)

    def interrupt(i):
        if i == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(layerwise, "LAYER_DONE_HOOKS", [interrupt])
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(layerwise, "LAYER_DONE_HOOKS", [])

    replayed: list = []
    for method in ("load_layer", "load_embedding"):
        real = getattr(WorkDir, method)

        def recording(self, *args, _real=real):
            out = _real(self, *args)
            named = out[0] if isinstance(out, tuple) else out
            for _, *stored in named:  # float tensors, and the tensors inside quantized ones
                for t in stored:
                    parts = [t] if torch.is_tensor(t) else list(vars(t).values()) if t is not None else []
                    replayed.extend(weakref.ref(x) for x in parts if torch.is_tensor(x))
            return out

        monkeypatch.setattr(WorkDir, method, recording)
    alive_at_layer: dict[int, int] = {}
    quantize_layer = layerwise.LayerwiseQuantizer._quantize_layer

    def checking(self, i, acts):
        gc.collect()
        alive_at_layer[i] = sum(r() is not None for r in replayed)
        return quantize_layer(self, i, acts)

    monkeypatch.setattr(layerwise.LayerwiseQuantizer, "_quantize_layer", checking)
    result = run()
    assert result is not None and (tmp_path / "out").is_dir()
    assert len(replayed) > 10 and alive_at_layer == {2: 0}
