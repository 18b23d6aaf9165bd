"""dvc.yaml is the map: each stage lists exactly the code it runs, read from the import graph.

A stage whose deps miss a module it imports reruns too rarely (an edit goes unnoticed); one
whose deps list a module it never imports reruns too often (editing the downloader used to
retrain the classifier and throw the GAN's checkpoints away). Both fail here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from pipeline.training import checkpoints

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages")


def _imports(path: Path) -> set[str]:
    """Modules of this repo that ``path`` imports anywhere (lazy imports inside functions
    run too), except under ``if TYPE_CHECKING:``, which never runs."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for guard in ast.walk(tree)
        if isinstance(guard, ast.If) and "TYPE_CHECKING" in ast.unparse(guard.test)
        for inner in guard.body
        for node in ast.walk(inner)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _file(module: str) -> Path | None:
    """The repo file of a dotted module name (a package's __init__ is not code we track)."""
    path = REPO / (module.replace(".", "/") + ".py")
    return path if path.is_file() else None


def closure(entry: str) -> set[str]:
    """Repo-relative paths of every module ``entry`` (a repo path) runs, itself included."""
    seen: set[str] = set()
    todo = [REPO / entry]
    while todo:
        path = todo.pop()
        relative = path.relative_to(REPO).as_posix()
        if relative in seen:
            continue
        seen.add(relative)
        todo += [found for name in _imports(path) if (found := _file(name)) is not None]
    return seen


def _stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(_stages()))
def test_code_deps_are_exactly_the_import_graph(name: str) -> None:
    stage = _stages()[name]
    module = re.search(r"python -m (stages\.\w+)", stage["cmd"])
    assert module, f"{name}: cmd should run `python -m stages.<name>`: {stage['cmd']}"
    entry = module.group(1).replace(".", "/") + ".py"
    listed = {dep for dep in stage["deps"] if dep.endswith(".py")}
    runs = closure(entry)
    assert sorted(listed - runs) == [], f"{name} lists code it never imports"
    assert sorted(runs - listed) == [], f"{name} imports code its deps do not list"


def test_checkpoint_digest_hashes_what_decides_the_weights() -> None:
    """Every module the train stage runs either decides the weights (hashed: a checkpoint
    from other code is not resumed) or is named as bookkeeping, with no module in both."""
    runs = {
        path.removeprefix("pipeline/")
        for path in closure("stages/train.py")
        if path.startswith("pipeline/")
    }
    hashed, bookkeeping = set(checkpoints.SOURCES), set(checkpoints.BOOKKEEPING)
    assert not hashed & bookkeeping
    assert hashed | bookkeeping == runs


def test_train_stage_takes_one_flag_per_output() -> None:
    from dataclasses import fields

    from pipeline.training.train import Outputs
    from stages.train import OUTPUTS

    assert tuple(field.name for field in fields(Outputs)) == OUTPUTS


def package_imports() -> dict[str, set[str]]:
    """Each package of ``pipeline/`` -> the other packages its modules import (lazy imports
    included, as in :func:`closure`)."""
    graph: dict[str, set[str]] = {}
    for package in sorted(path for path in (REPO / "pipeline").iterdir() if path.is_dir()):
        if not (package / "__init__.py").is_file():
            continue  # data folders (serve/web)
        found = graph.setdefault(package.name, set())
        for module in package.glob("*.py"):
            found |= {name.split(".")[1] for name in _imports(module) if name.count(".") >= 1}
        found -= {package.name}
    return graph


def test_pipeline_is_packages_by_role() -> None:
    """No module at the top of ``pipeline/`` but its ``__init__``: every module sits in the
    package of its role."""
    assert sorted(path.name for path in (REPO / "pipeline").glob("*.py")) == ["__init__.py"]


def test_the_architecture_page_maps_the_package_graph() -> None:
    """docs/architecture.md's package table (package, role, what it imports) is the import
    graph: a new cross-package import shows up there, or this fails."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("## Package dependencies", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \|[^|\n]*\|([^|\n]*)\|", section, flags=re.M)
    documented = {package: set(re.findall(r"`(\w+)`", imports)) for package, imports in rows}
    assert documented == package_imports()


@pytest.mark.parametrize("package", ["serve", "inference"])
def test_serving_never_imports_training(package: str) -> None:
    """What a deployment runs (the service, the CLI) reaches no TensorFlow code: neither
    ``training`` nor ``evaluation`` (whose yardstick builder trains)."""
    for module in sorted((REPO / "pipeline" / package).glob("*.py")):
        reached = closure(module.relative_to(REPO).as_posix())
        heavy = sorted(path for path in reached if path.startswith(HEAVY_PACKAGES))
        assert heavy == [], f"{module.name} reaches {heavy}"


HEAVY_PACKAGES = ("pipeline/training/", "pipeline/evaluation/", "pipeline/tracking/")
