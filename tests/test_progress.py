"""Progress on stderr (quantkit/progress.py): a tqdm bar on a terminal, plain periodic lines anywhere else."""

import io
import json

import pytest

from quantkit.cli import main
from quantkit.progress import LineProgress, human_duration, interval_s, progress
from quantkit.testing import make_random_checkpoint


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_tqdm_bar_anything_else_plain_lines():
    from tqdm import tqdm

    bar = progress(total=3, desc="x", file=FakeTerminal())
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress(total=3, desc="x", file=io.StringIO()), LineProgress)
    silent = progress(range(3), desc="x", file=io.StringIO(), enabled=False)
    assert list(silent) == [0, 1, 2]


def test_plain_lines_say_where_it_is_and_how_long_is_left(monkeypatch):
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr("quantkit.progress.time.monotonic", lambda: next(clock))
    out = io.StringIO()
    bar = LineProgress(desc="quantize (gptq)", total=32, unit="layer", initial=2, file=out, interval=15)
    bar.update(1)  # 10 s after the start: too early for a line
    bar.update(1)  # 20 s
    bar.set_postfix_str("down_proj sqnr 18.2 dB")
    bar.update(1)  # 30 s: 10 s since the last line
    bar.update(1)  # 40 s
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "quantize (gptq): layer 4/32 (12%), 20 s elapsed, ~5 min left"  # 2 layers in 20 s, 28 to go
    assert lines[1] == "quantize (gptq): layer 6/32 (19%), 40 s elapsed, ~4 min left; down_proj sqnr 18.2 dB"
    assert lines[2] == "quantize (gptq): 6 layers done in 50 s"


def test_plain_lines_of_bytes_and_of_an_iterable(monkeypatch):
    out = io.StringIO()
    bar = LineProgress(desc="writing m.gguf", total=4_100_000_000, unit="B", unit_scale=True, file=out, interval=0)
    bar.update(1_200_000_000)
    assert out.getvalue().startswith("writing m.gguf: 1.2GB/4.1GB (29%), 0 s elapsed, ~0 s left")
    out = io.StringIO()
    assert list(LineProgress(range(3), desc="load", total=3, unit="tensor", file=out, interval=0)) == [0, 1, 2]
    assert out.getvalue().splitlines()[-2:] == ["load: tensor 3/3 (100%), 0 s elapsed", "load: 3 tensors done in 0 s"]


def test_interval_and_durations(monkeypatch):
    monkeypatch.delenv("QUANTKIT_PROGRESS_INTERVAL", raising=False)
    assert interval_s() == 10
    for text, value in (("2.5", 2.5), ("0", 0), ("-1", 10), ("nan", 10), ("soon", 10)):
        monkeypatch.setenv("QUANTKIT_PROGRESS_INTERVAL", text)
        assert interval_s() == value, text
    assert [human_duration(s) for s in (41, 420, 9000)] == ["41 s", "7 min", "2.5 h"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("p") / "src", layers=2, hidden=64, intermediate=256,
                                  heads=4, kv_heads=2)


def test_quantize_reports_layers_in_plain_lines_when_stderr_is_not_a_terminal(src, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QUANTKIT_PROGRESS_INTERVAL", "0")
    main(["quantize", str(src), "--preset", "w4a16-g32", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "quantize (rtn): layer 1/2 (50%)" in err and "quantize (rtn): layer 2/2 (100%)" in err
    assert "elapsed" in err and "~" in err
    main(["quantize", str(src), "--type", "Q8_0", "-o", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err
    assert "\r" not in err and "writing " in err and "B (100%)" in err


def test_a_short_run_stays_quiet_with_the_default_interval(src, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("QUANTKIT_PROGRESS_INTERVAL", raising=False)
    main(["quantize", str(src), "--preset", "w4a16-g32", "-o", str(tmp_path / "out"), "--json"])
    out, err = capsys.readouterr()
    assert json.loads(out)["status"] == "ok" and err == ""


def test_eval_writes_no_carriage_returns_to_a_pipe(src, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QUANTKIT_PROGRESS_INTERVAL", "0")
    text = tmp_path / "t.txt"
    text.write_text("It was a dark and stormy night; the rain fell in torrents. " * 200)
    main(["eval", str(src), "--text", str(text), "--ctx", "64", "--max-windows", "3"])
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "perplexity (llamacpp, ctx 64): window 3/3 (100%)" in err and "loading model: tensor" in err
