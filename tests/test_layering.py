"""The house rules of the code's layers, read from the imports with `ast` (nothing is imported).

- the engine (`core/`) never imports the app (`ui/`);
- the family contract (`core/family_api/`) sits below the engine: the standard library and `core.config` only
  (torch types are named under TYPE_CHECKING, never imported);
- the engine and the app reach a family only through the contract (`core.family_api.lookup`), never by
  importing a module under `core/families/`;
- no family package imports another (the shared toolbox `core/families/dit/` is for all of them);
- no module outside a family's package uses that package's private (`_underscore`) names.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STDLIB = set(sys.stdlib_module_names) | {"__future__"}
SHARED_FAMILY_TOOLBOX = "dit"


def _modules(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Lines inside `if TYPE_CHECKING:` blocks (imports for the type checker only)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) of every import in `path`, at any depth, TYPE_CHECKING left out."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree)
    here = _module_name(path)
    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", 0) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative import: resolve against this module's package
                package = here.split(".")[: len(here.split(".")) - node.level + (path.name == "__init__.py")]
                module = ".".join(package + ([module] if module else []))
            names = [alias.name for alias in node.names]
            found.append((node.lineno, module, names))
            # `from core.families.x import y` may import the submodule y
            found += [(node.lineno, f"{module}.{n}", []) for n in names if (ROOT / module.replace(".", "/") / n).exists()
                      or (ROOT / module.replace(".", "/") / f"{n}.py").exists()]
    return found


def _family_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["core", "families"] else None


def _where(path: Path, line: int, module: str) -> str:
    return f"{path.relative_to(ROOT)}:{line} imports {module}"


def test_the_engine_never_imports_the_app():
    bad = [_where(p, n, m) for p in _modules("core") for n, m, _ in imports_of(p) if m == "ui" or m.startswith("ui.")]
    assert not bad, "\n".join(bad)


def test_the_family_contract_needs_only_the_standard_library_and_the_config():
    bad = [_where(p, n, m) for p in _modules("core/family_api") for n, m, _ in imports_of(p)
           if m.split(".")[0] not in STDLIB and not m.startswith(("core.family_api", "core.config"))]
    assert not bad, "\n".join(bad)


def test_the_engine_and_the_app_reach_families_only_through_the_contract():
    engine = [p for p in _modules("core", "ui", "tools") if not p.is_relative_to(ROOT / "core" / "families")]
    engine += [ROOT / "train.py", ROOT / "launch.py"]
    bad = [_where(p, n, m) for p in engine for n, m, _ in imports_of(p)
           if m == "core.families" or m.startswith("core.families.")]
    assert not bad, "\n".join(bad)


def test_no_family_package_imports_another():
    bad = []
    for path in _modules("core/families"):
        if path.name == "tiny.py":
            # The tiny-model builders (tests and bench/ only, never imported by the app) share the stand-ins
            # of core/families/tiny_parts.py and may use another family's converter to write ComfyUI's files.
            continue
        own = _family_of(_module_name(path))
        for line, module, _ in imports_of(path):
            other = _family_of(module)
            if other and own and other not in (own, SHARED_FAMILY_TOOLBOX):
                bad.append(_where(path, line, module))
    assert not bad, "\n".join(bad)


def test_nobody_outside_a_family_package_uses_its_private_names():
    bad = []
    for path in _modules("core", "ui", "tools", "bench", "tests"):
        own = _family_of(_module_name(path))
        for line, module, names in imports_of(path):
            family = _family_of(module)
            if family is None or family == own:
                continue
            private = [n for n in names if n.startswith("_")]
            if private or any(part.startswith("_") and part != "__init__" for part in module.split(".")):
                bad.append(f"{_where(path, line, module)} {private}")
    assert not bad, "\n".join(bad)


def test_the_checks_above_can_fail(tmp_path):
    """The reader sees a relative import, an import inside a function and one under TYPE_CHECKING."""
    source = tmp_path / "probe.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
                      "def f():\n    from ui.app import main\n")
    found = [m for _, m, _ in imports_of_outside(source)]
    assert "ui.app" in found and "torch" not in found


def imports_of_outside(path: Path) -> list[tuple[int, str, list[str]]]:
    """`imports_of` for a file outside the repository (the module name does not matter there)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    return [(node.lineno, node.module or "", [a.name for a in node.names]) if isinstance(node, ast.ImportFrom)
            else (node.lineno, node.names[0].name, [])
            for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
            and node.lineno not in skip]


def _code_words(path: Path) -> list[tuple[int, str]]:
    """(line, word) of every identifier and non-docstring string of a module, split at '_', '-', '.' and ' '."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and ast.get_docstring(node) is not None}
    found = []
    for node in ast.walk(tree):
        text = (node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute)
                else node.name if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else node.arg
                if isinstance(node, ast.arg) else node.value if isinstance(node, ast.Constant)
                and isinstance(node.value, str) and id(node) not in docstrings else "")
        found += [(node.lineno, w.lower()) for w in re.split(r"[_\-. /]+", text) if w]
    return found


def test_the_shared_transformer_toolbox_names_no_family():
    from core.family_api.registry import FAMILIES

    words = {w for name in FAMILIES for w in name.split("-") if len(w) >= 3} | {
        p.name.replace("_", "") for p in (ROOT / "core" / "families").iterdir() if p.is_dir() and len(p.name) > 3}
    words -= {SHARED_FAMILY_TOOLBOX, "dev", "image", "edit", "large", "turbo", "pycache"}
    bad = [f"{p.relative_to(ROOT)}:{line} '{word}'" for p in _modules(f"core/families/{SHARED_FAMILY_TOOLBOX}")
           for line, word in _code_words(p) if word in words]
    assert words and not bad, "\n".join(bad)


# The engine's modules that read families only through the registry's rows (issue 21: detection, key rules,
# memory, presets, the tools and the training loop name no family; the app neither).
FAMILY_BLIND = ("core/train", "core/tools", "core/export", "core/data", "ui", "core/model_info.py", "core/memory.py",
                "core/presets.py", "core/sample.py")


def _string_constants(path: Path) -> list[tuple[int, str]]:
    return [(node.lineno, node.value) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_the_engine_and_the_app_name_no_family_in_their_code():
    """A family's name as a string (`"sdxl"`, `"flux-dev"`) in the engine or the app would be a rule the
    registry row does not carry; docstrings and comments may name families, code may not."""
    from core.family_api.registry import FAMILIES

    paths = [p for entry in FAMILY_BLIND for p in ([ROOT / entry] if entry.endswith(".py") else _modules(entry))]
    bad = [f"{p.relative_to(ROOT)}:{line} {value!r}" for p in paths for line, value in _string_constants(p)
           if value in FAMILIES]
    assert paths and not bad, "\n".join(bad)
