"""The resume work directory (`quantkit.pipeline.workdir`): what a reloaded layer keeps alive."""

from __future__ import annotations

import gc
import sys
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
