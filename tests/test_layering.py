"""docs/ARCHITECTURE.md's layering, checked: no module imports one of a higher layer (at any depth of
the file, function-level imports included), so no import runs upward and none dodges a cycle."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gemma2np")

# module -> layer, as in the ARCHITECTURE table (4a/4b/4c as 4.0/4.1/4.2)
LAYERS = {
    "safeio": 0,  # strict JSON and model-directory file checks, used by every loader
    "config": 1, "rope": 1,
    "checkpoint": 2, "gguf_io": 2, "gguf_quant": 2, "original": 2,
    "ops": 3, "intermediates": 3, "kernels": 3, "_native": 3, "parallel": 3,
    "cache": 4.0, "outputs": 4.0, "model.validation": 4.0, "model.embeddings": 4.0, "model.pretrained": 4.0, "model.decoder": 4.0,
    "generation": 4.1,
    "model.heads": 4.2, "modeling": 4.2, "model": 4.2,
    "chat": 5, "chat_session": 5, "tokenizer": 5,
    "cli": 6, "cli_models": 6, "compare": 6, "llamacpp_log": 6, "llamacpp_compare": 6, "perplexity": 6, "convert": 6, "__main__": 6, "__init__": 6,
}


def _layer(mod: str) -> float:
    for name in (mod, mod.split(".")[0]):
        if name in LAYERS:
            return LAYERS[name]
    raise KeyError(mod)


def _modules():
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py") and "data" not in dirpath:
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__") if rel != "__init__" else rel, os.path.join(dirpath, f)


def _imports(name: str, path: str):
    """The package modules `path` imports (resolved from relative imports)."""
    package = name.split(".")[:-1] if not path.endswith("__init__.py") else name.split(".")
    if name == "__init__":
        package = []
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = ".".join(base + ([node.module] if node.module else []))
            if node.module is None:
                for a in node.names:
                    sub = ".".join(base + [a.name])
                    is_module = os.path.exists(os.path.join(ROOT, *sub.split(".")) + ".py") or \
                        os.path.isdir(os.path.join(ROOT, *sub.split("."))) or a.name == "_native"
                    yield sub if is_module else (".".join(base) or "__init__")
            elif target:
                yield target


def test_every_module_has_a_layer():
    for name, _ in _modules():
        _layer(name)


@pytest.mark.parametrize("name,path", sorted(_modules()))
def test_no_import_runs_upward(name, path):
    me = _layer(name)
    upward = [t for t in _imports(name, path) if t != "__init__" and t and _layer(t) > me]
    assert not upward, f"{name} (layer {me}) imports {[(t, _layer(t)) for t in upward]}"
