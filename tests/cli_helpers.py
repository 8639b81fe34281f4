"""Running the quantkit command line in-process from tests (tests/ is on sys.path under pytest)."""

from quantkit.cli import main


def exit_code(*args) -> int:
    """Run `quantkit ARGS...` in this process; its exit code (0 when it returns normally)."""
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def run_captured(capsys, *args):
    """(exit code, captured stdout/stderr) of `quantkit ARGS...`."""
    code = exit_code(*args)
    return code, capsys.readouterr()
