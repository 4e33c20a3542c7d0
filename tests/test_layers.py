"""The package is laid out by layer; imports only point down (or within a layer), and no module
imports another module's private names. Checked on every import statement, lazy ones included."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# lowest first; a module may import its own layer and the layers listed before it
LAYERS = [
    ("base", ["liedeploy", "liedeploy._version", "liedeploy.errors", "liedeploy.progress"]),
    ("io", ["liedeploy.io"]),
    ("core", ["liedeploy.core"]),
    ("files", ["liedeploy.files"]),
    ("training", ["liedeploy.train", "liedeploy.distributed", "liedeploy.hf_trainer"]),
    ("bank", ["liedeploy.bank"]),
    ("export", ["liedeploy.exporters"]),
    ("serving", ["liedeploy.serving"]),
    ("demo", ["liedeploy.demo"]),
    ("cli", ["liedeploy.cli", "liedeploy.__main__"]),
]
# training and files sit side by side: neither imports the other
SIDE_BY_SIDE = {("training", "files"), ("files", "training")}


def layer_of(module: str):
    best = None
    for rank, (name, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or (p != "liedeploy" and module.startswith(p + "."))) and (best is None or len(p) > best[2]):
                best = (rank, name, len(p))
    return best[:2] if best else None


def module_name(rel_path: str) -> str:
    parts = rel_path[:-3].split("/")
    if parts[0] == "exporters":  # installed as liedeploy.exporters
        parts = ["liedeploy"] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(module: str, source: str, is_package: bool):
    """``(imported module, names, line)`` for every liedeploy import in ``source``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("liedeploy")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                target = ".".join(pkg + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("liedeploy"):
                out.append((target, [a.name for a in node.names], node.lineno))
    return out


def violations(sources: dict) -> list:
    """Upward or sideways imports and private-name imports in ``{relative path: source}``."""
    found = []
    for path, source in sources.items():
        me = module_name(path)
        mine = layer_of(me)
        for target, names, line in imports_of(me, source, path.endswith("__init__.py")):
            theirs = layer_of(target)
            if theirs is None:
                continue
            if theirs[0] > mine[0] or (mine[1], theirs[1]) in SIDE_BY_SIDE:
                found.append(f"{path}:{line}: {mine[1]} imports {target} ({theirs[1]})")
            same_module = target == me
            for n in names:
                if n.startswith("_") and not n.startswith("__") and not same_module:
                    found.append(f"{path}:{line}: imports the private name {n} of {target}")
    return found


def _tree() -> dict:
    out = {}
    for top in ("liedeploy", "exporters"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    full = os.path.join(folder, f)
                    out[os.path.relpath(full, ROOT)] = open(full).read()
    return out


def test_every_module_has_a_layer():
    unplaced = [p for p in _tree() if layer_of(module_name(p)) is None]
    assert unplaced == []


def test_imports_point_down_and_no_private_names_cross_modules():
    assert violations(_tree()) == []


def test_a_planted_upward_import_is_found():
    tree = _tree()
    tree["liedeploy/core/merge.py"] += "\n\ndef _planted():\n    from liedeploy.serving.app import create_app\n"
    tree["liedeploy/io/atomic.py"] += "\nfrom liedeploy.core.adapt import _factor_dtype\n"
    found = violations(tree)
    assert any("core imports liedeploy.serving.app (serving)" in v for v in found)
    assert any("io imports liedeploy.core.adapt (core)" in v for v in found)
    assert any("private name _factor_dtype" in v for v in found)


def test_a_planted_sideways_import_is_found():
    tree = {"liedeploy/train.py": "from liedeploy.files.prune import prune_files\n"}
    assert violations(tree) == ["liedeploy/train.py:1: training imports liedeploy.files.prune (files)"]


def test_every_module_declares_all():
    missing = [p for p, s in _tree().items() if "__all__" not in s and not p.endswith("__main__.py")]
    assert missing == []


HEAVY = ("onnx", "onnxruntime", "onnxscript", "tensorrt", "liedeploy.exporters")


def top_level_heavy_imports(sources: dict) -> list:
    """Module-level imports of the export stacks in ``liedeploy/`` (they belong inside functions)."""
    found = []
    for path, source in sources.items():
        if not path.startswith("liedeploy/"):
            continue
        for node in ast.parse(source).body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                if any(n == h or n.startswith(h + ".") for h in HEAVY):
                    found.append(f"{path}:{node.lineno}: {n}")
    return found


def test_no_module_of_liedeploy_imports_an_export_stack_at_top_level():
    assert top_level_heavy_imports(_tree()) == []
    planted = {"liedeploy/demo/x.py": "from liedeploy.exporters.onnx import export_onnx\n"}
    assert top_level_heavy_imports(planted) == ["liedeploy/demo/x.py:1: liedeploy.exporters.onnx"]
