"""The package's shape: no import circle among its modules, the layers import downwards
only, and no asset name is written outside the stage table and the asset definitions.

Imports inside functions count: they are how a circle hides. Imports under
``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "agrifm_pipeline"
NAME = "agrifm_pipeline"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str) -> set[str]:
    """The package's modules ``module`` imports, at the top or inside functions."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    is_package = MODULES[module].name == "__init__.py"
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == NAME)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                here = module.split(".") if is_package else module.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join([*here, *([base] if base else [])])
            if base.split(".")[0] == NAME:
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    out.add(sub if sub in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    out.discard(module)
    return {m for m in out if m in MODULES}


GRAPH = {m: _imports(m) for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def _is_package_init(importer: str, imported: str) -> bool:
    """A submodule importing its own package's ``__init__`` (which re-exports it) is not a
    circle of code: Python runs the package first."""
    return importer.startswith(imported + ".")


def test_no_import_circle() -> None:
    graph = {m: {d for d in deps if not _is_package_init(m, d)} for m, deps in GRAPH.items()}
    assert _cycles(graph) == [], "import circles (imports inside functions included)"


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# Layers, lowest first: a module may import its own layer and the ones below it. The
# same list, with a line per module, is docs/architecture.md.
LAYERS = [
    {  # the vocabulary: names, errors, grids, frames, fingerprints
        "agrifm_pipeline.errors",
        "agrifm_pipeline.stages",
        "agrifm_pipeline.lineage",
        "agrifm_pipeline.tiles",
        "agrifm_pipeline.frames",
        "agrifm_pipeline.specs",
        "agrifm_pipeline.model.config",
    },
    {"agrifm_pipeline.storage"},  # versioned, checksummed partitions
    {"agrifm_pipeline.settings", "agrifm_pipeline.runtime"},  # every setting's one rule
    {  # where data and weights come from, and the model
        "agrifm_pipeline.checkpoint",
        "agrifm_pipeline.model",
        "agrifm_pipeline.preprocess",
        "agrifm_pipeline.providers",
        "agrifm_pipeline.regions",
        "agrifm_pipeline.registry",
        "agrifm_pipeline.roi",
    },
    {  # the science of a tile-year, judging, cataloguing, computing: no Dagster
        "agrifm_pipeline.tileyear",
        "agrifm_pipeline.inference",
        "agrifm_pipeline.api",
        "agrifm_pipeline.audit",
        "agrifm_pipeline.scene_listing",
        "agrifm_pipeline.catalog",
        "agrifm_pipeline.compute",
        "agrifm_pipeline.mapping",  # similarity and few-shot maps on any product
    },
    {"agrifm_pipeline.defs", "agrifm_pipeline.definitions"},  # Dagster
    {"agrifm_pipeline.cli", "agrifm_pipeline.demo"},  # the commands
]


def test_every_module_has_a_layer() -> None:
    assert [m for m in MODULES if m != NAME and _layer(m) is None] == []


def _layer(module: str) -> int | None:
    for i, roots in enumerate(LAYERS):
        if any(module == r or module.startswith(r + ".") for r in roots):
            return i
    return None


def test_layers_import_downwards() -> None:
    wrong = []
    for module, deps in GRAPH.items():
        mine = _layer(module)
        if mine is None:
            continue
        for dep in deps:
            theirs = _layer(dep)
            if theirs is not None and theirs > mine:
                wrong.append(f"{module} -> {dep}")
    assert wrong == []


def test_science_code_is_dagster_free() -> None:
    """Only the Dagster layer (defs/, definitions) and the commands import dagster."""
    allowed = ("agrifm_pipeline.defs", "agrifm_pipeline.definitions", "agrifm_pipeline.cli",
               "agrifm_pipeline.demo", "agrifm_pipeline.compute")  # fmt: skip
    users = []
    for module, path in MODULES.items():
        if module.startswith(allowed):
            continue
        if re.search(r"^\s*(import dagster|from dagster)", path.read_text(), re.M):
            users.append(module)
    assert users == []


def test_asset_names_are_written_only_in_the_stage_table() -> None:
    """Every module names a stored asset through :mod:`agrifm_pipeline.stages`; only the
    table itself and the asset definitions (whose function names are the keys) write one."""
    from agrifm_pipeline import stages

    names = {s.asset for s in stages.TABLE} | {stages.CHECKPOINT_ASSET, stages.AUDIT_ASSET}
    allowed = {"agrifm_pipeline.stages", "agrifm_pipeline.defs.assets"}
    found = []
    for module, path in MODULES.items():
        if module in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{module}:{node.lineno} {node.value!r}")
    assert found == []


def test_the_definitions_declare_exactly_the_stage_tables_assets() -> None:
    import dagster as dg

    from agrifm_pipeline import stages
    from agrifm_pipeline.definitions import defs

    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    stored = {s.asset for s in stages.TABLE}
    assert keys == stored | {stages.CHECKPOINT_ASSET, stages.AUDIT_ASSET}
    graph = defs.resolve_asset_graph()
    for s in stages.TABLE:
        node = graph.get(dg.AssetKey(s.asset))
        assert node.code_version == s.code_version, s.asset
        if s.upstream is not None:
            assert dg.AssetKey(s.upstream) in node.parent_keys, s.asset
