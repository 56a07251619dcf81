"""The engine runs on a GPU box with nothing but its numeric stack installed.

worker/engine, worker/models and kernels/ may import only torch, triton, numpy, safetensors,
tokenizers/transformers, the standard library and each other (guarded, optional imports of tqdm
for progress bars and huggingface_hub for hub ids are allowed). Nothing in shared/ imports torch.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE_ALLOWED = {"torch", "triton", "numpy", "safetensors", "tokenizers", "transformers",
                  "worker", "kernels"}
SOFT_ALLOWED = {"tqdm", "huggingface_hub"}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """Top-level module names imported by a file, and whether the import is inside a try."""
    tree = ast.parse(path.read_text())
    guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try)
               for n in ast.walk(t) if isinstance(n, ast.Import | ast.ImportFrom)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name.split(".")[0], id(node) in guarded) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module.split(".")[0], id(node) in guarded))
    return out


ENGINE_FILES = sorted(p for d in ("worker/engine", "worker/models", "kernels")
                      for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", ENGINE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_engine_imports_only_the_numeric_stack(path: Path) -> None:
    for name, guarded in _imports(path):
        if name in sys.stdlib_module_names or name == "__future__" or name in ENGINE_ALLOWED:
            continue
        assert guarded and name in SOFT_ALLOWED, f"{path.name} imports {name}"


@pytest.mark.parametrize("path", sorted((ROOT / "shared").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_shared_never_imports_torch(path: Path) -> None:
    assert "torch" not in {name for name, _ in _imports(path)}


def test_no_other_distribution_provides_the_kernels_package() -> None:
    """`kernels` is this project's top-level package; the Hub's `kernels` distribution (which
    transformers 5.25 requires) has the same name, and installed beside it one shadows the other:
    transformers' `from kernels import ...` then fails inside every model import."""
    import importlib.metadata

    providers = set(importlib.metadata.packages_distributions().get("kernels", [])) - {"sluice"}
    assert not providers, (
        f"{sorted(providers)} also provide a top-level `kernels` package, which clashes with "
        "this project's; pyproject.toml's transformers bound keeps it out")
