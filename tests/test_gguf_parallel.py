"""Worker-process block encoding (quantkit.gguf.parallel) gives exactly the bytes of in-process encoding."""

import glob
import os

import numpy as np
import pytest
import torch

from quantkit.errors import SchemeError
from quantkit.gguf import parallel
from quantkit.gguf.quants import quantize_ggml

ROWS, COLS = 520, 4096  # 2.1M elements: above parallel.MIN_ELEMENTS, so quantize_ggml uses the workers


def _in_process(monkeypatch, *args, **kwargs):
    monkeypatch.setenv("QUANTKIT_ENCODE_PROCESSES", "0")
    try:
        return quantize_ggml(*args, threads=2, **kwargs)
    finally:
        monkeypatch.delenv("QUANTKIT_ENCODE_PROCESSES")


@pytest.mark.parametrize("type_name,with_imatrix", [("Q4_K", False), ("Q6_K", False), ("Q4_1", True), ("Q5_K", True)])
def test_worker_processes_give_the_in_process_bytes(monkeypatch, type_name, with_imatrix):
    assert ROWS * COLS >= parallel.MIN_ELEMENTS
    gen = torch.Generator().manual_seed(7)
    w = (torch.randn(ROWS, COLS, generator=gen) * 0.02).to(torch.bfloat16)
    imp = torch.rand(COLS, generator=gen) * 3 if with_imatrix else None
    monkeypatch.delenv("QUANTKIT_ENCODE_PROCESSES", raising=False)
    got = quantize_ggml(w, type_name, importance=imp, threads=2)
    assert len(parallel._WORKERS) == 2 and all(p.poll() is None for p in parallel._WORKERS)  # really in workers
    want = _in_process(monkeypatch, w, type_name, importance=imp)
    assert got.type_name == want.type_name and got.shape == want.shape
    assert np.array_equal(got.data, want.data)


def test_worker_error_names_the_tensor_and_index_and_leaves_no_files(monkeypatch):
    monkeypatch.delenv("QUANTKIT_ENCODE_PROCESSES", raising=False)
    w = torch.randn(ROWS, COLS) * 0.02
    w[401, 33] = float("inf")
    with pytest.raises(SchemeError, match=r"blk\.3\.ffn_up\.weight: weight contains NaN or Inf \(first at index \[401, 33\]\)"):
        quantize_ggml(w, "Q4_K", name="blk.3.ffn_up.weight", threads=2)
    assert not glob.glob(os.path.join(parallel._shared_dir(), f"quantkit-{os.getpid()}-*"))


def test_dead_workers_are_replaced(monkeypatch):
    monkeypatch.delenv("QUANTKIT_ENCODE_PROCESSES", raising=False)
    w = torch.randn(ROWS, COLS) * 0.02
    first = quantize_ggml(w, "Q8_0", threads=2)
    for p in parallel._WORKERS:
        p.kill()
        p.wait()
    again = quantize_ggml(w, "Q8_0", threads=2)
    assert np.array_equal(first.data, again.data)
    assert all(p.poll() is None for p in parallel._WORKERS)
