"""Every write fault is one clean failure (#13 part 2), with real faults: a small tmpfs that fills up (in a private
mount namespace), a file-size limit (RLIMIT_FSIZE), SIGKILL.

After a fault there is no output, no half-built output and no `.NAME.tmp-*` anywhere; `OUT.partial` stays only when a
re-run can resume from it (and the message says so); the next run removes what killed runs left behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from cli_helpers import exit_code
from quantkit.io import human_bytes, stale_temporaries
from quantkit.testing import make_random_checkpoint

# a 2-layer random model: outputs of ~8 MB (the 32000 x 64 embedding and lm_head dominate), work dir ~4 MB
W4 = ["--preset", "w4a16-g32", "--no-progress"]
MULTI = [*W4, "--format", "gptq,compressed-tensors"]

# the CLI in a subprocess, with hooks after each completed layer: fill the disk (leaving FILL_LEAVE bytes) or die
CLI = textwrap.dedent("""
    import os, signal, sys
    from quantkit.pipeline import layerwise

    def fill(disk, leave):
        st = os.statvfs(disk)
        n = st.f_bavail * st.f_frsize - leave
        if n > 0:
            with open(os.path.join(disk, "filler"), "wb") as f:
                os.posix_fallocate(f.fileno(), 0, n)

    def hook(i):
        if i == int(os.environ.get("FILL_AFTER_LAYER", "-1")):
            fill(os.environ["DISK"], int(os.environ.get("FILL_LEAVE", "0")))
        if i == int(os.environ.get("KILL_AFTER_LAYER", "-1")):
            os.kill(os.getpid(), signal.SIGKILL)
        if i == int(os.environ.get("TERM_AFTER_LAYER", "-1")):
            os.kill(os.getpid(), signal.SIGTERM)

    layerwise.LAYER_DONE_HOOKS.append(hook)
    from quantkit.cli import main
    main(sys.argv[1:])
""")

# runs inside the mount namespace: each step runs the CLI, then records its exit code, stderr and the disk's files
SCENARIO = textwrap.dedent("""
    import json, os, subprocess, sys
    from pathlib import Path

    disk, steps, result, cli = Path(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    records = []
    for step in steps:
        if step.get("unfill"):
            (disk / "filler").unlink(missing_ok=True)
        env = dict(os.environ, DISK=str(disk), **{k: str(v) for k, v in step.get("env", {}).items()})
        proc = subprocess.run([sys.executable, "-c", cli, *step["args"]], capture_output=True, text=True, env=env)
        records.append({"rc": proc.returncode, "stderr": proc.stderr,
                        "files": sorted(str(p.relative_to(disk)) for p in disk.rglob("*")),
                        "free": os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize})
    result.write_text(json.dumps(records))
""")


def _namespace_prefix() -> list[str] | None:
    """`unshare` arguments for a private mount namespace in which mounting a tmpfs works (as root: a mount
    namespace; otherwise a user namespace too), or None."""
    if shutil.which("unshare") is None or sys.platform != "linux":
        return None
    import tempfile

    prefixes = [["unshare", "--user", "--map-root-user", "--mount"]]
    if os.geteuid() == 0:
        prefixes.insert(0, ["unshare", "--mount"])
    with tempfile.TemporaryDirectory() as where:
        for prefix in prefixes:
            probe = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", where],
                                   capture_output=True)
            if probe.returncode == 0:
                return prefix
    return None


@pytest.fixture(scope="module")
def namespace():
    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip("cannot mount a small tmpfs here (needs unshare and mount namespaces)")
    return prefix


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("model") / "src")


def on_small_disk(namespace, tmp_path: Path, size: int, steps: list[dict]) -> tuple[Path, list[dict]]:
    """Run `steps` (CLI arguments, with DISK in them replaced by the disk's path) on a fresh tmpfs of `size` bytes
    in a private mount namespace; returns (the disk's path, one record per step)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    for step in steps:
        step["args"] = [str(a).replace("DISK", str(disk)) for a in step["args"]]
    result = tmp_path / "result.json"
    proc = subprocess.run([*namespace, "sh", "-c", 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"',
                           "sh", str(size), str(disk), sys.executable, "-c", SCENARIO, str(disk), json.dumps(steps),
                           str(result), CLI], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and result.exists(), proc.stderr[-3000:]
    return disk, json.loads(result.read_text())


def quantize_args(src, out, *extra) -> list[str]:
    return ["quantize", str(src), *W4, "-o", str(out), *extra]


def temporaries(files: list[str]) -> list[str]:
    return [f for f in files if ".tmp" in Path(f).name or ".old-" in Path(f).name]


def last_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else ""


# ---- a full disk ----

def test_too_small_a_disk_is_refused_before_any_work(namespace, src, tmp_path):
    """The plan knows the output's size: a disk that cannot hold it is refused up front, naming the path, the
    bytes needed and the bytes free; nothing is created (no output, no work dir, no temporaries)."""
    size = 4 << 20
    disk, [run] = on_small_disk(namespace, tmp_path, size, [{"args": quantize_args(src, "DISK/out")}])
    assert run["rc"] == 4, run["stderr"]
    err = last_line(run["stderr"])
    assert "Traceback" not in run["stderr"]
    assert err.startswith(f"error: {disk}/out: not enough disk space (about "), err
    assert re.search(rf"about \d+\.\d MB is needed: the output \d+\.\d MB, the work dir {disk}/out.partial \d",
                     err), err
    assert f"but only {human_bytes(size)} is free on {disk}; nothing was written" in err, err
    assert "resuming" not in run["stderr"]
    assert run["files"] == []


def test_disk_full_mid_run_keeps_completed_layers_and_the_same_command_resumes(namespace, src, tmp_path):
    """ENOSPC after layer 0 (the disk fills up under the run): exit 4, one line naming the output and what it needs,
    no output or temporaries; OUT.partial holds layer 0 and the message says how to resume. With space again, the
    same command resumes at layer 1 and leaves only the output."""
    args = quantize_args(src, "DISK/out")
    disk, (full, again) = on_small_disk(namespace, tmp_path, 64 << 20, [
        {"args": args, "env": {"FILL_AFTER_LAYER": 0}},
        {"args": args, "unfill": True},
    ])
    assert full["rc"] == 4, full["stderr"]
    err = last_line(full["stderr"])
    assert err.startswith(f"error: {disk}/out: out of disk space while writing ("), err
    assert re.search(r"about \d+\.\d MB is needed: the output \d+\.\d MB", err), err
    assert f"completed layers (1 of 2) are kept in {disk}/out.partial" in err, err
    assert "run the same command again to resume" in err and f"delete {disk}/out.partial" in err, err
    assert "out" not in full["files"] and temporaries(full["files"]) == []
    assert "out.partial" in full["files"]

    assert again["rc"] == 0, again["stderr"]
    assert "resuming from layer 1/2" in again["stderr"]
    assert "out" in again["files"] and not any(f.startswith("out.partial") for f in again["files"])
    assert temporaries(again["files"]) == []


def test_disk_full_while_writing_the_second_format_leaves_neither(namespace, src, tmp_path):
    """gptq,compressed-tensors: the gptq output is complete, then compressed-tensors hits ENOSPC. All or nothing:
    no OUT at all (not OUT/gptq either), no temporaries; the work dir (all layers) stays for a resume, which then
    writes both."""
    args = [*quantize_args(src, "DISK/multi"), "--format", "gptq,compressed-tensors"]
    disk, (full, again) = on_small_disk(namespace, tmp_path, 64 << 20, [
        # after the last layer the writers still hold every tensor: room for one ~8.8 MB output, not two
        {"args": args, "env": {"FILL_AFTER_LAYER": 1, "FILL_LEAVE": 11 << 20}},
        {"args": args, "unfill": True},
    ])
    assert full["rc"] == 4, full["stderr"]
    assert not any(f == "multi" or f.startswith("multi/") for f in full["files"]), full["files"]
    assert temporaries(full["files"]) == []
    err = last_line(full["stderr"])
    assert err.startswith(f"error: {disk}/multi: out of disk space while writing ("), err
    assert re.search(r"is needed: the 2 outputs \d+\.\d MB", err) and "(2 of 2) are kept in" in err, err
    assert "multi.partial" in full["files"]

    assert again["rc"] == 0, again["stderr"]
    assert "resuming from layer 2/2" in again["stderr"]
    for fmt in ("gptq", "compressed-tensors"):
        assert f"multi/{fmt}/model.safetensors" in again["files"]
    assert not any(f.startswith("multi.partial") for f in again["files"]) and temporaries(again["files"]) == []


def test_disk_full_in_a_gguf_run(namespace, src, tmp_path):
    """The same for one GGUF file (the work dir fills up after layer 0): no file, no temporaries, resumable."""
    args = ["quantize", str(src), "--type", "Q8_0", "--no-progress", "-o", "DISK/m.gguf"]
    disk, (full, again) = on_small_disk(namespace, tmp_path, 64 << 20, [
        {"args": args, "env": {"FILL_AFTER_LAYER": 0}},
        {"args": args, "unfill": True},
    ])
    assert full["rc"] == 4 and "out of disk space" in last_line(full["stderr"]), full["stderr"]
    assert f"{disk}/m.gguf: " in last_line(full["stderr"])
    assert [f for f in full["files"] if not f.startswith("m.gguf.partial/")] == ["filler", "m.gguf.partial"]
    assert again["rc"] == 0, again["stderr"]
    assert sorted(f for f in again["files"] if f != "filler") == ["m.gguf", "m.gguf.quant_log.jsonl"]


def test_convert_refuses_a_disk_too_small_and_names_the_need_when_it_fills_up(namespace, src, tmp_path):
    """`convert` plans its output too: refused up front on a disk smaller than the weights; on a disk that holds
    the weights but not the tokenizer and config files besides, ENOSPC mid-write is one line naming the output and
    what it needs, and nothing is left."""
    from quantkit.pipeline.convert import planned_bytes

    source = tmp_path / "src"
    shutil.copytree(src, source)
    (source / "generation_config.json").write_text(json.dumps({"note": "x" * (256 << 10)}))  # copied verbatim
    need = planned_bytes(source, "hf", None, None, False)
    args = ["convert", str(source), "--format", "hf", "-o", "DISK/f"]
    disk, [small] = on_small_disk(namespace, tmp_path, need // 2, [{"args": args}])
    assert small["rc"] == 4 and small["files"] == [], small
    assert last_line(small["stderr"]).startswith(f"error: {disk}/f: not enough disk space (about "
                                                 f"{human_bytes(need)} is needed: the output"), small["stderr"]

    shutil.rmtree(disk)
    disk, [tight] = on_small_disk(namespace, tmp_path, need + (64 << 10), [{"args": args}])
    assert tight["rc"] == 4 and tight["files"] == [], tight
    assert last_line(tight["stderr"]) == (f"error: {disk}/f: out of disk space while writing (about "
                                          f"{human_bytes(need)} is needed: the output {human_bytes(need)}): nothing "
                                          "was written"), tight["stderr"]


# ---- a file-size limit (unprivileged: RLIMIT_FSIZE) ----

def _run_limited(args, limit: int | None):
    import resource

    def apply():
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "quantkit", *map(str, args)], capture_output=True, text=True,
                          preexec_fn=apply, timeout=600)


def test_file_size_limit_at_the_end_keeps_the_layers_and_resumes(src, tmp_path):
    """Every work-dir file fits 5 MiB, the ~8 MB output shard does not: EFBIG at the very end. Exit 4, no output,
    no temporaries, all layers kept and the message says so; without the limit the same command resumes."""
    out = tmp_path / "out"
    proc = _run_limited(quantize_args(src, out), 5 << 20)
    assert proc.returncode == 4, proc.stderr[-2000:]
    err = last_line(proc.stderr)
    assert err.startswith(f"error: {out}: file too large"), err
    assert f"completed layers (2 of 2) are kept in {out}.partial" in err and "run the same command again" in err
    assert not out.exists() and stale_temporaries(out) == [] and not list(tmp_path.glob(".*tmp*"))
    assert (tmp_path / "out.partial" / "state.json").is_file()

    proc = _run_limited(quantize_args(src, out), None)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming from layer 2/2" in proc.stderr
    assert (out / "model.safetensors").is_file() and not (tmp_path / "out.partial").exists()


def test_file_size_limit_before_any_layer_leaves_no_work_dir(src, tmp_path):
    """1 MiB: the first work-dir file (the embedding) is too large. Nothing to resume, so nothing stays."""
    out = tmp_path / "out"
    proc = _run_limited(quantize_args(src, out), 1 << 20)
    assert proc.returncode == 4 and "file too large" in last_line(proc.stderr), proc.stderr[-2000:]
    assert "kept in" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no output, no out.partial, no temporaries


# ---- errors a resume cannot fix ----

def _with_nan_in_layer(src: Path, dst: Path, layer: int) -> Path:
    shutil.copytree(src, dst)
    name = f"model.layers.{layer}.mlp.down_proj.weight"
    for f in dst.glob("*.safetensors"):
        tensors = load_file(f)
        if name in tensors:
            tensors[name][0, 0] = float("nan")
            save_file(tensors, f, metadata={"format": "pt"})
            return dst
    raise AssertionError(f"{name} not found")


def test_a_non_finite_weight_removes_the_work_dir_this_run_made(src, tmp_path, capsys):
    """Layer 0 completes, layer 1 holds a NaN: the error is the input's, a re-run would stop at the same place, so
    the OUT.partial this run created is removed (and no output, no temporaries)."""
    bad = _with_nan_in_layer(src, tmp_path / "bad", 1)
    out = tmp_path / "out"
    assert exit_code("quantize", bad, *W4, "-o", out) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model.layers.1.mlp.down_proj.weight: weight contains NaN"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_a_users_empty_work_dir_is_emptied_not_removed(src, tmp_path, capsys):
    bad = _with_nan_in_layer(src, tmp_path / "bad", 1)
    mine = tmp_path / "mine"
    mine.mkdir()
    assert exit_code("quantize", bad, *W4, "-o", tmp_path / "out", "--work-dir", mine) == 1
    assert mine.is_dir() and list(mine.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "mine"]


def test_a_bad_option_creates_nothing(src, tmp_path, capsys):
    assert exit_code("quantize", src, *W4, "--method", "gptq", "--calib", tmp_path / "missing.txt", "-o",
               tmp_path / "out") != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---- what killed runs leave behind ----

def _kill_after(args, layer: int):
    env = dict(os.environ, KILL_AFTER_LAYER=str(layer))
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.parametrize("kind", ["multi", "gguf"])
def test_the_next_run_removes_what_a_killed_run_left(src, tmp_path, kind):
    """SIGKILL after layer 0 leaves the staging directory `.OUT.tmp-PID-XXXX` (partial files, no marker) and
    OUT.partial. The next run resumes, removes those and the older-style `.OUT.tmp-XXXXXXXX`, and touches nothing
    else: not another output's temporaries, not a look-alike name, not the temporary of a process still running."""
    out = tmp_path / ("m.gguf" if kind == "gguf" else "multi")
    args = (["quantize", src, "--type", "Q8_0", "--no-progress", "-o", out] if kind == "gguf"
            else ["quantize", src, *MULTI, "-o", out])
    killed = _kill_after(args, 0)
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = stale_temporaries(out)
    assert left and all(p.name.startswith(f".{out.name}.tmp-") for p in left)
    assert not out.exists() and (tmp_path / f"{out.name}.partial").is_dir()

    legacy = tmp_path / f".{out.name}.tmp-k3x9_q2z"  # what quantkit named temporaries before the PID was in the name
    legacy.mkdir()
    (legacy / "model-00000.part.safetensors").write_bytes(b"\0" * 100)
    alive = tmp_path / f".{out.name}.tmp-{os.getpid()}-abcd1234"  # a run still at work (this test's process)
    alive.mkdir()
    keep = [tmp_path / f".{out.name}.tmpfoo", tmp_path / f".other.tmp-{2**22 + 7}-abcd1234",
            tmp_path / f"{out.name}.tmp-abc12345", tmp_path / f".{out.name}.tmp-x.y"]
    for p in keep:
        p.write_text("not quantkit's")

    resumed = _kill_after(args, -1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from layer 1/2" in resumed.stderr
    assert out.exists() and not (tmp_path / f"{out.name}.partial").exists()
    assert all(not p.exists() for p in left) and not legacy.exists()
    assert alive.is_dir() and all(p.read_text() == "not quantkit's" for p in keep)
    alive.rmdir()
    assert stale_temporaries(out) == []


def test_sigterm_keeps_the_completed_layers_and_says_how_to_resume(src, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", CLI, *quantize_args(src, out)], capture_output=True, text=True,
                          env=dict(os.environ, TERM_AFTER_LAYER="0"), timeout=600)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert (f"interrupted: completed layers are kept in {out}.partial; run the same command again to resume "
            f"(or delete {out}.partial)") in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.partial"]


def test_a_killed_multi_format_run_never_shows_a_half_built_output(src, tmp_path):
    """Before, OUT/ (with its marker) existed from the start of a multi-format run; now nothing is at OUT until
    every format is complete."""
    out = tmp_path / "multi"
    killed = _kill_after(["quantize", src, *MULTI, "-o", out], 1)
    assert killed.returncode == -9
    assert not out.exists()


def test_check_free_space_sums_what_lands_on_one_file_system(tmp_path):
    from quantkit.errors import OutOfSpaceError
    from quantkit.io import check_free_space

    free = check_free_space([("the output", tmp_path / "a" / "b", 1)])  # measured where it would land
    assert list(free) == [tmp_path]
    half = free[tmp_path] // 2 + 1
    with pytest.raises(OutOfSpaceError) as e:
        check_free_space([("the output", tmp_path / "out", half), (f"the work dir {tmp_path}/w", tmp_path / "w", half)])
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path}/out: not enough disk space (about {human_bytes(2 * half)} is needed: the "
                          f"output {human_bytes(half)}, the work dir {tmp_path}/w {human_bytes(half)}), but only "), msg


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 999, 1000, 4_100_000_000, 12_345_678)] == ["0 B", "999 B", "1.0 kB",
                                                                                   "4.1 GB", "12.3 MB"]
