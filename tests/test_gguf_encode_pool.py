"""The process-pool encoder gives the same bytes as the in-process encoders, reports errors the same way, and
leaves no shared memory behind."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from quantkit.errors import SchemeError
from quantkit.gguf.encode_pool import ProcessEncoder
from quantkit.gguf.quants import quantize_ggml
from tests.test_gguf_quants import edge_weights


@pytest.fixture(scope="module")
def pool():
    with ProcessEncoder(workers=2) as p:
        yield p


def _shm_names() -> set[str]:
    """The POSIX shared-memory blocks multiprocessing.shared_memory created (its names start with psm_)."""
    return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")} if os.path.isdir("/dev/shm") else set()


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_pool_bytes_equal_in_process_encoding(pool, type_name, dtype):
    x = torch.from_numpy(edge_weights(70, 512, seed=int(torch.randint(0, 1 << 30, ()))))
    x[3] /= 1000.0  # keep the large-magnitude row finite in fp16
    w = x.to(dtype)
    ours = quantize_ggml(w, type_name, pool=pool)
    ref = quantize_ggml(w, type_name, threads=1)
    assert ours.shape == ref.shape and ours.type_name == type_name
    assert np.array_equal(ours.data, ref.data)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_K", "Q6_K"])
def test_pool_with_importance_equals_in_process(pool, type_name):
    rng = np.random.default_rng()
    x = (rng.standard_normal((300, 1024)) * 0.02).astype(np.float32)  # several chunks of 256 rows
    imp = (rng.random(1024) ** 4 * 50).astype(np.float32)
    ours = quantize_ggml(x, type_name, importance=imp, pool=pool)
    assert np.array_equal(ours.data, quantize_ggml(x, type_name, importance=imp, threads=1).data)
    assert not np.array_equal(ours.data, quantize_ggml(x, type_name, pool=pool).data)


def test_pool_buffers_grow_and_shrinking_requests_reuse_them(pool):
    rng = np.random.default_rng()
    for rows in (8, 700, 40, 1200, 3):  # grows twice, and reuses the larger buffers in between
        x = (rng.standard_normal((rows, 768)) * 0.02).astype(np.float32)
        assert np.array_equal(quantize_ggml(x, "Q4_K", pool=pool).data, quantize_ggml(x, "Q4_K", threads=1).data)


def test_pool_reports_non_finite_weights_with_the_index(pool):
    x = np.zeros((600, 512), np.float32)
    x[550, 7] = np.inf
    with pytest.raises(SchemeError,
                       match=r"blk.3.ffn_up.weight: weight contains NaN or Inf \(first at index \[550, 7\]\)"):
        quantize_ggml(x, "Q4_K", name="blk.3.ffn_up.weight", pool=pool)
    # the pool still works after a failed tensor
    y = np.ones((4, 256), np.float32)
    assert np.array_equal(quantize_ggml(y, "Q4_K", pool=pool).data, quantize_ggml(y, "Q4_K", threads=1).data)


def test_pool_close_unlinks_its_shared_memory():
    before = _shm_names()
    with ProcessEncoder(workers=1) as p:
        quantize_ggml(np.ones((16, 256), np.float32), "Q8_0", pool=p)
        assert len(_shm_names() - before) == 2 or not os.path.isdir("/dev/shm")
    assert _shm_names() - before == set()


def test_a_killed_worker_is_a_clear_error_not_a_hang():
    import signal

    from quantkit.gguf.encode_pool import EncoderCrashed

    x = np.ones((64, 256), np.float32)
    with ProcessEncoder(workers=1) as p:
        quantize_ggml(x, "Q4_K", pool=p)  # the worker is up
        for proc in list(p._pool._processes.values()):
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
        with pytest.raises(EncoderCrashed, match=r"blk.0.ffn_up.weight: an encoder worker process died"):
            quantize_ggml(x, "Q4_K", name="blk.0.ffn_up.weight", pool=p)


def test_a_script_without_a_main_guard_runs_once(tmp_path):
    """"spawn" re-imports the main script in every child; the pool hides it, so unguarded top-level code (here:
    the whole conversion) is not run again per worker."""
    import subprocess
    import sys

    from quantkit.testing import REPO_ROOT

    script = tmp_path / "unguarded.py"
    script.write_text(
        "import numpy as np\n"
        "from quantkit.gguf.encode_pool import ProcessEncoder\n"
        "from quantkit.gguf.quants import quantize_ggml\n"
        "print('top level', flush=True)\n"
        "with ProcessEncoder(workers=2) as pool:\n"
        "    x = np.ones((600, 256), np.float32)\n"
        "    assert np.array_equal(quantize_ggml(x, 'Q4_K', pool=pool).data, quantize_ggml(x, 'Q4_K').data)\n"
        "print('done', flush=True)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["top", "level", "done"], proc.stdout + proc.stderr[-2000:]


def test_no_room_in_shared_memory_falls_back_to_in_process_encoding(monkeypatch):
    from quantkit.gguf import encode_pool

    x = (np.random.default_rng().standard_normal((300, 512)) * 0.02).astype(np.float32)
    with ProcessEncoder(workers=1) as p:
        monkeypatch.setattr(encode_pool, "_shm_has_room", lambda nbytes: False)
        assert p.run(x, "f32", "Q4_K", None, "t") is None
        assert np.array_equal(quantize_ggml(x, "Q4_K", pool=p).data, quantize_ggml(x, "Q4_K", threads=1).data)


def test_tensors_over_the_staging_cap_are_encoded_in_process(monkeypatch):
    from quantkit.gguf import encode_pool

    x = (np.random.default_rng().standard_normal((64, 512)) * 0.02).astype(np.float32)
    with ProcessEncoder(workers=1) as p:
        monkeypatch.setattr(encode_pool, "MAX_STAGED_BYTES", x.nbytes - 1)
        assert p.run(x, "f32", "Q6_K", None, "t") is None
        assert np.array_equal(quantize_ggml(x, "Q6_K", pool=p).data, quantize_ggml(x, "Q6_K", threads=1).data)
