"""The package's shape: layers that import one way only, without cycles, and an ``import
fastvae`` that loads the op library and nothing the compiler, Triton, the trainer or the
command line need."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastvae as fv
from fastvae.ops import backends

# Bottom to top; a module may import from its own layer and those before it. The root package
# is the facade: it re-exports the ops and (lazily) the model and training names; the command
# line sits on top of it.
LAYERS = ("fastvae.kernels", "fastvae.ops", "fastvae.models", "fastvae.training", "fastvae",
          "fastvae.cli")


def _layer(module: str) -> int:
    if module == "fastvae.__main__":
        return LAYERS.index("fastvae.cli")
    if module == "fastvae":
        return LAYERS.index("fastvae")
    for i, layer in enumerate(LAYERS):
        if layer != "fastvae" and (module == layer or module.startswith(layer + ".")):
            return i
    raise AssertionError(f"{module} belongs to no layer: add its folder to LAYERS")


def _sources() -> dict[str, Path]:
    """Module name -> source file, for every module of the package (kernels included)."""
    modules = {}
    for package in ("fastvae", "fastvae.kernels"):
        root = Path(importlib.util.find_spec(package).origin).parent
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if package == "fastvae" and parts[0] == "kernels":
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``module`` imports, anywhere in its body (function-level
    imports too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # "from pkg import submodule" imports the submodule
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m == "fastvae" or m.startswith("fastvae.")}


@pytest.fixture(scope="module")
def import_graph() -> dict[str, set[str]]:
    sources = _sources()
    return {m: _imports(m, p, set(sources)) for m, p in sources.items()}


def test_the_package_is_found_whole(import_graph):
    assert {"fastvae", "fastvae.ops.functional", "fastvae.models.vae",
            "fastvae.training.trainer", "fastvae.cli", "fastvae.kernels"} <= set(import_graph)


def test_layers_import_downwards_only(import_graph):
    upward = sorted(f"{m} imports {target}" for m, targets in import_graph.items()
                    for target in targets if _layer(target) > _layer(m))
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_import_cycles(import_graph):
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        if module in stack:
            cycle = " -> ".join([*stack[stack.index(module):], module])
            raise AssertionError(f"import cycle: {cycle}")
        if module in done:
            return
        for target in sorted(import_graph.get(module, ())):
            visit(target, [*stack, module])
        done.add(module)

    for module in sorted(import_graph):
        visit(module, [])


# What `import fastvae` must leave unloaded (prefixes of module names), beyond what
# `import torch` itself loads: the compiler, Triton, the upper layers and their dependencies.
HEAVY = ("torch._dynamo", "torch._inductor", "torch.distributed", "torch.onnx", "sympy",
         "triton", "fastvae.kernels", "fastvae.models", "fastvae.training", "fastvae.cli",
         "matplotlib", "PIL", "safetensors", "sklearn", "tqdm")


def test_import_loads_only_the_ops():
    code = ("import json, sys, torch; before = set(sys.modules); import fastvae; "
            "print(json.dumps(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    loaded = json.loads(out.splitlines()[-1])
    heavy = [m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert not heavy, f"import fastvae loads {heavy}"
    assert "fastvae.ops.custom_ops" in loaded  # the ops are registered at import


def test_lazy_names_resolve():
    """Every public name is reachable, listed by dir(), and the same object as its module's."""
    from fastvae.models import build, vae
    from fastvae.training import trainer

    assert set(fv.__all__) <= set(dir(fv))
    for name in fv.__all__:
        assert getattr(fv, name) is not None
    assert fv.VAE is vae.VAE
    assert fv.build_vae is build.build_vae  # vae.build_vae, or build_vqvae with quantizer="vq"
    assert fv.train is trainer.train
    assert fv.TrainConfig is trainer.TrainConfig
    with pytest.raises(AttributeError, match="no_such_name"):
        fv.no_such_name  # noqa: B018


def test_backend_resolution_is_marked_as_torch_compile_would():
    """The backend is resolved once per trace, as a constant: ``_resolve`` carries what
    torch.compiler.assume_constant_result sets (set by hand so that importing fastvae does
    not import torch._dynamo)."""
    marked = torch.compiler.assume_constant_result(lambda: None)
    assert vars(marked), "assume_constant_result sets no attribute any more"
    assert vars(marked).items() <= vars(backends._resolve).items()
