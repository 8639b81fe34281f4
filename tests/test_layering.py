"""The package import rules of docs/architecture.md, checked on the source (every import, lazy ones included)."""

import ast
from pathlib import Path

import pytest

import quantkit

ROOT = Path(quantkit.__file__).parent

NEUTRAL = {"errors", "tensors", "ggml_types", "io", "allocator", "progress", "cache"}
# package -> the quantkit packages it may import (besides itself and the neutral modules)
ALLOWED = {
    "kernels": set(),
    "model": {"kernels"},
    "quant": {"model", "kernels"},
    "calib": {"model"},
    "gguf": {"model", "quant", "kernels"},
    "formats": {"model", "quant", "gguf", "kernels"},
    "runtime": {"model", "quant", "gguf", "formats", "kernels"},
    "eval": {"model", "quant", "gguf", "formats", "kernels", "runtime", "calib"},
    "pipeline": {"model", "quant", "gguf", "formats", "kernels", "runtime", "eval", "calib"},
    "api": {"model", "quant", "gguf", "formats", "kernels", "runtime", "eval", "calib", "pipeline"},
}
NEUTRAL_ALLOWED: set[str] = set()  # the neutral modules import no other quantkit package, except:
# GGMLTensor.dequantize uses the one bit-exact dequantizer, the torch reference beside the ggml kernels, which
# itself imports only neutral modules (checked below)
MODULE_EXCEPTIONS = {"tensors": {"quantkit.kernels.ggml_ref"}}
FREE = {"commands", "cli", "__main__", "testing", "__init__"}  # the top: may import anything


def package_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root)
    return rel.parts[0].removesuffix(".py")


def quantkit_imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, first component after `quantkit.`, full module) of every import of a quantkit module in the file."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "quantkit"]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "quantkit" and len(parts) > 1:
                found.append((node.lineno, parts[1], name))
    return found


def violations(root: Path = ROOT) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        pkg = package_of(path, root)
        if pkg in FREE:
            continue
        allowed = NEUTRAL_ALLOWED if pkg in NEUTRAL else ALLOWED.get(pkg)
        if allowed is None:
            out.append(f"{path.relative_to(root)}: package {pkg!r} has no rule in docs/architecture.md")
            continue
        for line, target, module in quantkit_imports(path):
            if target == "__version__" or module in MODULE_EXCEPTIONS.get(pkg, ()):
                continue
            if target != pkg and target not in NEUTRAL and target not in allowed:
                out.append(f"{path.relative_to(root)}:{line}: {pkg} may not import quantkit.{target}")
    return out


def test_package_imports_follow_the_rules():
    assert violations() == []


def test_the_dequantizer_neutral_code_uses_imports_only_neutral_modules():
    for _, target, module in quantkit_imports(ROOT / "kernels" / "ggml_ref.py"):
        assert target in NEUTRAL, module


def test_a_forbidden_import_is_caught(tmp_path):
    """The check is live: adding `quant -> formats` (the classic mistake) to a copy of the tree fails it."""
    import shutil

    copy = tmp_path / "quantkit"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so", "csrc"))
    (copy / "quant" / "rtn.py").write_text((copy / "quant" / "rtn.py").read_text()
                                           + "\nfrom quantkit.formats.base import get_format  # noqa\n")
    found = sorted(set(violations(copy)) - set(violations()))
    assert len(found) == 1 and "quant/rtn.py" in found[0] and "quant may not import quantkit.formats" in found[0]


@pytest.mark.parametrize("doc_rule", sorted(ALLOWED))
def test_rules_are_documented(doc_rule):
    text = (ROOT.parent / "docs" / "architecture.md").read_text()
    assert f"`{doc_rule}/`" in text or f"`{doc_rule}.py`" in text
