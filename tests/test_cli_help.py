"""The command line's self-description: `quantkit --help` summaries that fit, --list-types / --list-presets,
--type / --preset as choices of the registries (registry key = CLI string)."""

import pytest
from click.testing import CliRunner

from quantkit.cli import cli
from quantkit.gguf.mixes import FILE_TYPES
from quantkit.pipeline.plan import list_gguf_types, list_presets
from quantkit.quant.scheme import PRESET_NOTES, PRESETS


def test_every_command_summary_fits_in_the_command_list(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    res = CliRunner().invoke(cli, ["--help"], terminal_width=80)
    assert res.exit_code == 0
    listing = res.output.split("Commands:")[1].strip().splitlines()
    assert len(listing) >= 10
    for line in listing:
        assert not line.rstrip().endswith("..."), line  # click cuts a long first docstring line with "..."
    ctx = cli.make_context("quantkit", ["--help"], resilient_parsing=True)
    for name in cli.list_commands(ctx):
        short = cli.get_command(ctx, name).get_short_help_str(limit=1000)
        assert len(short) <= 60, (name, short)  # "  NAME      summary" within 80 columns


@pytest.mark.parametrize("cmd", ["plan", "quantize"])
def test_list_types_and_presets_without_a_model(cmd):
    res = CliRunner().invoke(cli, [cmd, "--list-types"])
    assert res.exit_code == 0, res.output
    rows = {line.split()[0]: line.split() for line in res.output.splitlines()[1:len(FILE_TYPES) + 1]}
    assert list(rows) == list(FILE_TYPES)
    assert rows["Q8_0"][1] == "8.50" and rows["Q4_K_M"][1] == "4.83"  # llama.cpp's 4.83 BPW for Mistral-7B Q4_K_M
    assert "the usual choice" in " ".join(rows["Q4_K_M"])
    res = CliRunner().invoke(cli, [cmd, "--list-presets"])
    assert res.exit_code == 0, res.output
    rows = {line.split()[0]: line.split() for line in res.output.splitlines()[1:len(PRESETS) + 1]}
    assert list(rows) == list(PRESETS)
    assert rows["w4a16-g128"][2] == "4.16"  # quantized linears: 4 bits + fp16 scale / 128 + packed zeros, g_idx
    assert "BPW" in res.output and "stored tensor bytes" in res.output


def test_listings_use_the_plan_bpw_and_describe_every_entry():
    types = list_gguf_types()
    assert [r["name"] for r in types] == list(FILE_TYPES) and all(r["description"] for r in types)
    assert {r["name"]: r["bpw"] for r in types}["BF16"] == 16.0
    presets = list_presets()
    assert set(PRESET_NOTES) == set(PRESETS) and all(r["description"] for r in presets)
    bpw = {r["name"]: r["bpw"] for r in presets}
    assert bpw["w2a16-g64"] < bpw["w3a16-g128"] < bpw["w4a16-g128"] < bpw["w4a16-g32"] < bpw["w8a16"]


@pytest.mark.parametrize("args, bad", [(["--type", "Q7_X"], "Q7_X"), (["--preset", "w5a16"], "w5a16")])
def test_type_and_preset_are_choices(tmp_path, args, bad):
    res = CliRunner().invoke(cli, ["plan", str(tmp_path), *args])
    assert res.exit_code == 2 and f"'{bad}' is not one of" in res.output


def test_choices_accept_any_case_and_pass_the_registry_key(monkeypatch):
    seen = {}
    monkeypatch.setattr("quantkit.api.plan", lambda model, **kw: seen.update(kw) or (_ for _ in ()).throw(SystemExit))
    CliRunner().invoke(cli, ["plan", "m", "--type", "q4_k_m"])
    assert seen["gguf_type"] == "Q4_K_M"
    CliRunner().invoke(cli, ["plan", "m", "--preset", "W4A16-G32"])
    assert seen["preset"] == "w4a16-g32"
