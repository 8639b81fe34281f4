"""SIGTERM during a write unwinds like Ctrl-C: the atomic output leaves nothing behind."""

import signal
import subprocess
import sys
import time


def test_sigterm_during_gguf_convert_leaves_no_output(nano_path, tmp_path):
    out = tmp_path / "nano.gguf"
    proc = subprocess.Popen(
        [sys.executable, "-m", "quantkit", "convert", str(nano_path), "--format", "gguf", "--type", "Q4_K_M",
         "-o", str(out), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any(p.name.startswith(".nano.gguf.tmp")
                                                                      for p in tmp_path.iterdir()):
        time.sleep(0.05)
    assert proc.poll() is None, "conversion finished before the temporary file was seen"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert b"Traceback" not in err
    assert list(tmp_path.iterdir()) == []
