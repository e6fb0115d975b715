"""The package's imports run one way, with no cycles and no private names across modules.

    foundation → kernels → engines → monitor → stages → run → cli        analysis reads files only

The foundation (paths, the config schema, records, layout, seeds, interrupts, chunks,
trackers, text checks, constitution, prompts, preferences, models) imports nothing above it. Stages may use the monitor's instruments (the
screen projects onto its directions); the validation harness and `selftrain-drift` on
checkpoints drive stages and probes, so they sit with the run.

Every import counts, including those inside functions: a lazy import still ties two modules.
A module's layer is the first rule below that names it.
"""
from __future__ import annotations

import ast
from pathlib import Path


SRC = Path(__file__).resolve().parents[1] / "src"

# (layer, prefixes): modules whose dotted name equals or starts with a prefix + "."
LAYERS = [
    ("foundation", ["selftrain", "selftrain.paths", "selftrain.config", "selftrain.config.schema",
                    "selftrain.run", "selftrain.run.records", "selftrain.run.layout", "selftrain.run.seeds",
                    "selftrain.run.interrupts", "selftrain.run.chunks", "selftrain.run.trackers", "selftrain.run.preempt",
                    "selftrain.text",
                    "selftrain.constitution", "selftrain.prompts", "selftrain.preferences",
                    "selftrain.models", "selftrain.kernels", "selftrain.engines",
                    "selftrain.monitor", "selftrain.analysis"]),
    ("kernels", ["selftrain.kernels."]),
    ("engines", ["selftrain.engines."]),
    # the harnesses drive stages and the probe: they sit with the run, above both
    ("run", ["selftrain.monitor.validate", "selftrain.monitor.checkpoints", "selftrain.config.checks",
             "selftrain.run."]),
    ("stages", ["selftrain.stages", "selftrain.stages."]),  # its __init__ holds helpers the stages share
    ("monitor", ["selftrain.monitor."]),
    ("analysis", ["selftrain.analysis."]),
    ("cli", ["selftrain.cli"]),
]
RANK = {"foundation": 0, "kernels": 1, "engines": 2, "monitor": 3, "stages": 4, "run": 5, "cli": 6}
# analysis works on artifacts on disk: it imports the foundation (records, layout) and itself only,
# and anything from the stages up may use it (the probe stage writes its statistics and report)
ANALYSIS_MAY = {"foundation", "analysis"}
USES_ANALYSIS = {"stages", "monitor", "run", "cli", "analysis"}


def layer(mod: str) -> str:
    for name, prefixes in LAYERS:
        for p in prefixes:
            if (mod == p) if not p.endswith(".") else mod.startswith(p):
                return name
    raise AssertionError(f"{mod}: no layer names it; add it to LAYERS in {Path(__file__).name}")


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted((SRC / "selftrain").rglob("*.py")):
        parts = f.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(mod: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every selftrain import in the file."""
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "selftrain"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.split(".")[0] == "selftrain":
                out.append((base, [a.name for a in node.names], node.lineno))
    return out


MODS = modules()


def rel(path: Path) -> str:
    return str(path.relative_to(SRC)) if path.is_relative_to(SRC) else path.name


def resolve(target: str, names: list[str], mods: dict) -> list[str]:
    """`from pkg import mod` imports the module pkg.mod; other names come from pkg itself."""
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
    return subs + ([target] if len(subs) < len(names) or not names else [])


def edges(mods: dict) -> dict[str, set[str]]:
    g = {m: set() for m in mods}
    for mod, path in mods.items():
        for target, names, _ in imports(mod, path):
            g[mod].update(t for t in resolve(target, names, mods) if t != mod and t in mods)
    return g


def against_layers(mods: dict) -> list[str]:
    bad = []
    for mod, path in mods.items():
        src = layer(mod)
        for target, names, line in imports(mod, path):
            for t in resolve(target, names, mods):
                dst = layer(t)
                if t == mod or (dst == "foundation" and src != "foundation"):
                    continue
                if src == "foundation":
                    ok = dst == "foundation"
                elif src == "analysis" or dst == "analysis":
                    ok = src == "analysis" and dst in ANALYSIS_MAY or src in USES_ANALYSIS and dst == "analysis"
                else:
                    ok = RANK[dst] <= RANK[src]
                if not ok:
                    bad.append(f"{rel(path)}:{line}: {src} imports {dst} ({t})")
    return bad


def cycles(mods: dict) -> list[str]:
    g, seen, stack, found = edges(mods), set(), [], []

    def visit(m, on):
        seen.add(m); on.add(m); stack.append(m)
        for t in sorted(g[m]):
            if t in on:
                found.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in seen:
                visit(t, on)
        on.discard(m); stack.pop()

    for m in sorted(g):
        if m not in seen:
            visit(m, set())
    return found


def private_names(mods: dict) -> list[str]:
    bad = []
    for mod, path in mods.items():
        for target, names, line in imports(mod, path):
            bad += [f"{rel(path)}:{line}: {target}.{n}" for n in names
                    if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in mods]
    return bad


def test_every_module_has_a_layer_and_a_docstring():
    for mod, path in MODS.items():
        layer(mod)
        assert ast.get_docstring(ast.parse(path.read_text())), f"{rel(path)}: opens without saying what it does"


def test_imports_run_one_way():
    bad = against_layers(MODS)
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(MODS)
    assert not found, "import cycles:\n" + "\n".join(found)


def test_no_private_name_crosses_modules():
    bad = private_names(MODS)
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_the_checks_can_fail(tmp_path):
    """A kernel that imports the loop and a private name, and a two-module cycle, are all caught."""
    def module(name, body):
        f = tmp_path / (name.replace(".", "/") + ".py")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text('"""A module that breaks the rules."""\n' + body)
        return f
    mods = {"selftrain.kernels.bad": module("selftrain.kernels.bad", "from selftrain.run.loop import _run\n"),
            "selftrain.run.loop": module("selftrain.run.loop", "from selftrain.kernels import bad\n")}
    assert against_layers(mods) == ["bad.py:2: kernels imports run (selftrain.run.loop)"]
    assert private_names(mods) == ["bad.py:2: selftrain.run.loop._run"]
    assert cycles(mods) == ["selftrain.kernels.bad -> selftrain.run.loop -> selftrain.kernels.bad"]
