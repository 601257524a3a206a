"""Every third-party package the shipped code imports is a declared dependency of the project.

A package that arrives only as someone else's dependency can vanish in that package's next
release; the import then fails on a user's machine, not here.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[2]
SHIPPED = ("quantflow", "flows", "tasks", "deployments")


def imported_modules() -> set[str]:
    names: set[str] = set()
    for package in SHIPPED:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - set(SHIPPED)


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {normal(re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]) for requirement in requirements}


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_declared():
    owners = importlib.metadata.packages_distributions()
    undeclared = {
        module: owners.get(module, ["?"])
        for module in imported_modules()
        if not {normal(dist) for dist in owners.get(module, [module])} & declared()
    }
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
