"""The torch_xla boundary: only ``torchxla_rlhf/runtime/`` imports torch_xla, only its shim
touches the private ``torch_xla._XLAC``, and the shim refuses a torch_xla that lacks an entry
point with one line."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "torchxla_rlhf"
RUNTIME = PACKAGE / "runtime"


def _imports_torch_xla(path: Path) -> list[int]:
    """Line numbers of ``import torch_xla...`` / ``from torch_xla... import`` in ``path``."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        if any(n == "torch_xla" or n.startswith("torch_xla.") for n in names):
            lines.append(node.lineno)
    return lines


def test_only_the_runtime_package_imports_torch_xla():
    offenders = {
        str(p.relative_to(PACKAGE)): lines
        for p in sorted(PACKAGE.rglob("*.py"))
        if RUNTIME not in p.parents and (lines := _imports_torch_xla(p))
    }
    assert offenders == {}
    # The walk does see imports: the runtime's own modules have them.
    assert _imports_torch_xla(RUNTIME / "devices.py")


def test_only_the_shim_touches_private_xlac():
    hits = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                  if "_XLAC" in p.read_text())
    assert hits == ["runtime/_xlac.py"]


def test_runtime_modules_stay_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in RUNTIME.glob("*.py")}
    assert len(sizes) >= 9
    assert {name: n for name, n in sizes.items() if n > 400} == {}


def test_shim_names_a_missing_entry_point_in_one_line(monkeypatch):
    import torch_xla
    import torch_xla.distributed.spmd as xs
    from torchxla_rlhf.errors import UserError
    from torchxla_rlhf.runtime import _xlac

    _xlac.check()  # the installed torch_xla has everything
    monkeypatch.delattr(torch_xla._XLAC, "_xla_user_computation")
    monkeypatch.delattr(xs.Mesh, "_get_op_sharding_args")
    with pytest.raises(UserError) as e:
        _xlac.check()
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"torch_xla {torch_xla.__version__} lacks ")
    assert "torch_xla._XLAC._xla_user_computation" in msg
    assert "torch_xla.distributed.spmd.Mesh._get_op_sharding_args" in msg
    assert f"torch_xla=={_xlac.PINNED}" in msg
    assert _xlac.missing() == ["torch_xla._XLAC._xla_user_computation",
                               "torch_xla.distributed.spmd.Mesh._get_op_sharding_args"]


def test_shim_lists_every_private_entry_point_the_runtime_uses():
    """Every ``xlac.NAME`` the runtime calls is checked at import (a new one must be added to
    ``ENTRY_POINTS``, or an old torch_xla would fail mid-run instead of at start-up)."""
    from torchxla_rlhf.runtime import _xlac

    used = set()
    for p in RUNTIME.glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "xlac"):
                used.add(node.attr)
    assert used and used <= set(_xlac.ENTRY_POINTS)


def test_runtime_import_loads_no_torch_xla():
    """Importing ``torchxla_rlhf.runtime`` loads no torch_xla (``--help`` stays cheap, and
    ``init()`` picks ``PJRT_DEVICE`` before torch_xla starts): outside the shim, torch_xla and
    the shim are imported only inside functions, never at a module's top level."""
    top_level = {}
    for p in sorted(RUNTIME.glob("*.py")):
        if p.name == "_xlac.py":
            continue
        for node in ast.parse(p.read_text()).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            names += [f"{node.module}.{a.name}" for a in getattr(node, "names", [])
                      if isinstance(node, ast.ImportFrom)]
            bad = [n for n in names if n.startswith("torch_xla") or "_xlac" in n]
            if bad:
                top_level[p.name] = bad
    assert top_level == {}
