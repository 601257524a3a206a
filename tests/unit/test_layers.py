"""The layers import only downward (core <- tasks <- flows <- deployments), and the core never imports Prefect."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
LAYERS = ("quantflow", "tasks", "flows", "deployments")  # each may import only the ones before it


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_every_layer_imports_only_the_layers_below_it():
    upward = []
    for rank, layer in enumerate(LAYERS):
        above = LAYERS[rank + 1 :] + (("prefect", "prefect_aws") if layer == "quantflow" else ())
        for path in (ROOT / layer).rglob("*.py"):
            upward += [(str(path.relative_to(ROOT)), name) for name in imports(path) if name.split(".")[0] in above]
    assert not upward, f"imports that point up a layer (or Prefect in the core): {upward}"


def test_importing_the_whole_core_loads_no_prefect():
    """Stronger than the source scan: no module of the core pulls Prefect in through a dependency either."""
    code = (
        "import importlib, pkgutil, sys, quantflow\n"
        "for m in pkgutil.walk_packages(quantflow.__path__, 'quantflow.'):\n"
        "    try: importlib.import_module(m.name)\n"
        "    except ModuleNotFoundError as e:\n"  # the FP8 kernel module needs Triton, which CPU torch lacks
        "        if e.name != 'triton': raise\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in ('prefect', 'tasks', 'flows', 'deployments')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", result.stdout
