"""quantkit deletes or overwrites only what it created: work dirs, --force, outputs overlapping inputs, umask."""

import os
import stat

import pytest

from cli_helpers import exit_code
from quantkit.testing import make_random_checkpoint


@pytest.fixture
def src(tmp_path):
    return make_random_checkpoint(tmp_path / "src")


def snapshot(path):
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*"))


def quantize(src, out, *extra):
    return exit_code("quantize", src, "--preset", "w4a16-g32", "--no-progress", "-o", out, *extra)


def test_work_dir_that_is_not_quantkits_is_refused_not_emptied(src, tmp_path, capsys):
    mine = tmp_path / "my-files"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert quantize(src, tmp_path / "out", "--work-dir", mine) == 4
    assert (mine / "thesis.tex").read_text() == "years of work"
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a quantkit work directory" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_work_dir_or_output_on_the_source_model_is_refused(src, tmp_path, capsys):
    before = snapshot(src)
    assert quantize(src, tmp_path / "out", "--work-dir", src) == 4
    assert quantize(src, src, "--force") == 4
    assert quantize(src, src / "inside") == 4
    assert quantize(src, tmp_path, "--force") == 4  # the output would contain the model
    assert snapshot(src) == before
    assert "overlaps model" in capsys.readouterr().err


def test_force_replaces_only_quantkit_outputs(src, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert quantize(src, foreign, "--force") == 4
    assert (foreign / "notes.txt").read_text() == "keep me"

    out = tmp_path / "out"
    assert quantize(src, out) == 0
    assert quantize(src, out) == 4  # exists, no --force
    assert quantize(src, out, "--force") == 0  # an earlier quantkit output: replaced

    multi = tmp_path / "multi"
    assert quantize(src, multi, "--format", "gptq,compressed-tensors") == 0
    assert quantize(src, multi, "--format", "gptq,compressed-tensors", "--force") == 0


def test_gguf_force_replaces_only_quantkit_gguf(src, tmp_path):
    user_file = tmp_path / "model.gguf"
    user_file.write_bytes(b"GGUF" + b"\0" * 64)  # someone else's GGUF
    assert exit_code("quantize", src, "--type", "Q8_0", "--no-progress", "-o", user_file, "--force") == 4
    assert user_file.read_bytes() == b"GGUF" + b"\0" * 64
    out = tmp_path / "ours.gguf"
    assert exit_code("quantize", src, "--type", "Q8_0", "--no-progress", "-o", out) == 0
    assert exit_code("quantize", src, "--type", "Q8_0", "--no-progress", "-o", out, "--force") == 0


def test_eval_report_never_replaces_a_users_file(src, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    report = tmp_path / "report"
    report.write_text("not a directory of ours")
    code = exit_code("eval", src, "--text", text, "--convention", "llamacpp", "--ctx", "64", "--max-windows", "1",
               "--report", report, "--no-progress")
    assert code == 4 and report.read_text() == "not a directory of ours"
    assert exit_code("eval", src, "--text", text, "--convention", "llamacpp", "--ctx", "64", "--max-windows", "1",
               "--report", text, "--no-progress") == 4  # the report would replace the evaluated text
    assert text.exists()


def test_outputs_follow_the_umask(src, tmp_path):
    old = os.umask(0o022)
    try:
        assert quantize(src, tmp_path / "out") == 0
        assert exit_code("quantize", src, "--type", "Q8_0", "--no-progress", "-o", tmp_path / "m.gguf") == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    for f in (tmp_path / "out").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert stat.S_IMODE((tmp_path / "m.gguf").stat().st_mode) == 0o644


@pytest.mark.parametrize("args", [["--preset", "w4a16-g32"], ["--type", "Q8_0"]])
def test_a_file_size_limit_is_one_error_line_and_no_output(src, tmp_path, args):
    """EFBIG (RLIMIT_FSIZE) in the middle of a run: exit 4, one `error:` line, no output left half-written."""
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    out = tmp_path / ("o.gguf" if "--type" in args else "out")
    proc = subprocess.run([sys.executable, "-m", "quantkit", "quantize", str(src), *args, "-o", str(out),
                           "--no-progress"], capture_output=True, text=True, preexec_fn=limit, timeout=600)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "file too large" in lines[-1], lines
    assert not out.exists() and not any(p.name.startswith(f".{out.name}.tmp") for p in tmp_path.iterdir())


def test_a_read_only_output_directory_is_one_error_line(src, tmp_path, capsys):
    if os.geteuid() == 0:  # root writes through directory permissions; use a path under a regular file instead
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        out = blocker / "out"
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        out = ro / "out"
    assert quantize(src, out) == 4
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nothing was written" in err and "Traceback" not in err
