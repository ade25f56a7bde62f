"""The package's layout holds (ARCHITECTURE.md): no import cycle, the engine touches no weight, importing fastface
has no side effects, and every test file is collected by the README's test command."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package name it installs as (pyproject's package-dir)
SOURCES = {ROOT / "fastface": "fastface", ROOT / "kernels": "fastface.kernels"}


def package_modules() -> dict[str, Path]:
    mods = {}
    for folder, prefix in SOURCES.items():
        for f in folder.rglob("*.py"):
            parts = [p for p in f.relative_to(folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([prefix, *parts])] = f
    return mods


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> package modules it imports, at module level or inside functions (relative imports resolved;
    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module). A package's own
    submodules and the top-level package are not edges (importing a submodule runs its parents first)."""
    edges = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rsplit(".", 1)[0] if "." in name else ""
                if name and name != m and not name.startswith(m + ".") and name != "fastface":
                    edges[m].add(name)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(v):
        state[v] = 1
        path.append(v)
        for w in sorted(edges[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(edges):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
    mods = package_modules()
    assert "fastface.engine" in mods and "fastface.kernels.grouped_moe" in mods
    cycle = find_cycle(import_graph(mods))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_op_contracts_and_kernels_import_no_model_or_loop():
    """ops/, fastface/kernels/ and the C++ wrapper depend on the contracts only, never on the model or the loops."""
    mods = package_modules()
    edges = import_graph(mods)
    above = {"fastface.model", "fastface.sampling", "fastface.engine", "fastface.pipeline", "fastface.decoding",
             "fastface.prompts", "fastface.train"}
    lower = [m for m in mods if m.startswith(("fastface.ops", "fastface.kernels"))] + ["fastface._cpp",
                                                                                      "fastface.torch_backend"]
    for m in lower:
        assert not edges[m] & above, f"{m} imports {sorted(edges[m] & above)}"


# weights and weight-holding submodules of FaceTransformer: the engine names none of them
_WEIGHT_NAMES = {"weight", "bias", "qkv", "out", "router_weight", "gate_up_proj", "down_proj", "shared_gate_up_proj",
                 "shared_down_proj", "router", "sem_proj", "id_proj", "lm_head", "embed", "ln_f", "ln_attn", "ln_moe",
                 "ln_seq", "attn", "moe", "seq_moe", "layers", "parameters", "named_parameters", "state_dict"}


def test_engine_reads_no_weight():
    """The engine schedules; the model computes. No attribute access in engine.py names a weight or a sublayer."""
    tree = ast.parse((ROOT / "fastface" / "engine.py").read_text())
    found = sorted({(node.attr, node.lineno) for node in ast.walk(tree)
                    if isinstance(node, ast.Attribute) and node.attr in _WEIGHT_NAMES})
    assert not found, f"engine.py reaches into the model: {found}"


def test_import_fastface_only_defines_names():
    """``import fastface`` imports neither transformers nor the engine; ``fastface.hf`` registers the integration."""
    code = ("import sys, fastface; "
            "print(int('transformers' in sys.modules), int('fastface.engine' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "0"], out
    pytest.importorskip("transformers")
    code = ("import fastface.hf; from transformers.integrations import moe; "
            "print(int('fastface' in moe.ExpertsInterface._global_mapping))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1"], out


def test_every_test_file_is_collected():
    """The README's test command (pytest with pyproject's testpaths) reaches every test file, bench/ included."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    paths = [ROOT / p for p in cfg["testpaths"]]
    files = sorted(ROOT.glob("tests/**/test_*.py")) + sorted(ROOT.glob("bench/**/test_*.py"))
    assert files
    for f in files:
        assert any(p in f.parents for p in paths), f"{f.relative_to(ROOT)} lies outside testpaths {cfg['testpaths']}"


def test_architecture_doc_names_real_paths():
    """ARCHITECTURE.md exists and every path it lists in its layout exists."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    listed = [line.split()[0] for line in text.split("```")[1].splitlines() if line.strip()]
    assert len(listed) > 10
    for path in listed:
        assert (ROOT / path.rstrip("/")).exists(), f"ARCHITECTURE.md lists {path}, which is not in the tree"
