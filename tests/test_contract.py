"""The layout's rules, checked on the source: every pass file registered under its own name,
and the import rules between the top-level folders (style.md, README's layout table)."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from neodragon_npu.passes.base import Pass
from neodragon_npu.passes.registry import IR_FOLDERS, PASSES

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("passes", "kernels", "graphs", "neodragon_models", "tools")
# what each folder may import from the others (besides itself)
ALLOWED = {
    "kernels": set(),
    "graphs": {"kernels"},
    "passes": {"graphs", "kernels"},
    "neodragon_models": {"kernels", "graphs", "passes"},  # specs name their pipelines
    "tools": {"graphs", "kernels", "passes", "neodragon_models"},
}
# the models themselves (not their specs) import kernels and each other only
MODEL_CORE_ALLOWED = {"kernels"}


def _pass_files():
    return sorted(f for ir in IR_FOLDERS for f in (ROOT / "passes" / ir).glob("*.py") if f.name != "__init__.py")


def _imports(path: Path) -> list[str]:
    """Every module an import statement in ``path`` names (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = ["neodragon_npu", *path.relative_to(ROOT).parent.parts]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found += [base] + [f"{base}.{a.name}" for a in node.names]
    return found


def _ours(module: str) -> tuple[str, ...] | None:
    parts = module.split(".")
    if parts[0] == "neodragon_npu" and len(parts) > 1:
        return tuple(parts[1:])
    return None


def test_every_pass_file_holds_one_pass_registered_under_its_file_name():
    files = _pass_files()
    assert {f.stem for f in files} == set(PASSES)
    for f in files:
        module = importlib.import_module(f"neodragon_npu.passes.{f.parent.name}.{f.stem}")
        classes = [c for c in vars(module).values()
                   if isinstance(c, type) and issubclass(c, Pass) and c.__module__ == module.__name__]
        assert len(classes) == 1, f
        assert classes[0].NAME == f.stem and classes[0].IR == f.parent.name, f
        assert PASSES[f.stem] is classes[0]
        assert classes[0].summary(), f"{f}: the pass needs a docstring"


@pytest.mark.parametrize("path", _pass_files(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_pass_imports_no_other_pass_and_no_model_or_tool(path):
    for module in _imports(path):
        ours = _ours(module)
        if ours is None:
            continue
        assert ours[0] in ("graphs", "kernels") or ours[:2] == ("passes", "base"), (
            f"{path.relative_to(ROOT)} imports {module}: a pass imports graphs/, kernels/ and passes/base only")


@pytest.mark.parametrize("folder", FOLDERS)
def test_folders_import_only_what_the_layout_allows(folder):
    for path in sorted((ROOT / folder).rglob("*.py")):
        core_model = folder == "neodragon_models" and "specs" not in path.parts and path.name != "spec.py"
        allowed = MODEL_CORE_ALLOWED if core_model else ALLOWED[folder]
        for module in _imports(path):
            ours = _ours(module)
            if ours is None or ours[0] == folder:
                continue
            assert ours[0] in allowed, f"{path.relative_to(ROOT)} imports {module}"


def test_no_folder_is_a_top_level_package():
    """The folders' plain names are PyPI's too (Hugging Face's kernels among them): none of
    them may be importable as a top-level package from the checkout."""
    for folder in FOLDERS:
        assert not (ROOT / folder / "__init__.py").exists(), folder


def test_the_contract_test_fails_on_a_pass_importing_a_pass(tmp_path):
    """The import check sees a pass importing another pass (or a model)."""
    bad = tmp_path / "passes" / "onnx" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from neodragon_npu.passes.onnx.fold_constants import FoldConstantsPass\n"
                   "from ..fx import split_adaln\nimport neodragon_npu.neodragon_models.denoiser\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        with pytest.raises(AssertionError, match="imports neodragon_npu.passes.onnx.fold_constants"):
            test_a_pass_imports_no_other_pass_and_no_model_or_tool(bad)
    finally:
        ROOT = saved
    assert "neodragon_npu.passes.fx.split_adaln" in [m for m in _imports_at(bad, tmp_path)]


def _imports_at(path, root):
    global ROOT
    saved, ROOT = ROOT, root
    try:
        return _imports(path)
    finally:
        ROOT = saved


def test_a_misnamed_pass_file_fails_at_import(tmp_path, monkeypatch):
    """The registry refuses a pass whose NAME is not its file's name."""
    from neodragon_npu.passes import registry

    folder = tmp_path / "onnx"
    folder.mkdir()
    (folder / "fold_things.py").write_text(
        "from neodragon_npu.passes.base import Pass, PassResult\n\n"
        "class FoldThingsPass(Pass):\n    '''Fold.'''\n    IR = 'onnx'\n    NAME = 'fold_other_things'\n\n"
        "    def call(self, model):\n        return PassResult(model, False)\n")
    (folder / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path.parent))
    monkeypatch.setattr(registry, "__file__", str(tmp_path / "registry.py"))
    monkeypatch.setattr(registry, "__package__", tmp_path.name)
    monkeypatch.setattr(registry, "IR_FOLDERS", ("onnx",))
    with pytest.raises(ImportError, match="has NAME 'fold_other_things'"):
        registry._discover()


@pytest.mark.parametrize("where", ["checkout", "elsewhere"])
def test_diffusers_and_transformers_models_import_beside_ours(where, tmp_path):
    """transformers imports Hugging Face's `kernels` package; our kernels/ folder must not
    shadow it, from inside the checkout or anywhere else."""
    code = ("import transformers, diffusers\n"
            "from transformers import CLIPTextModelWithProjection, T5EncoderModel\n"
            "from diffusers import UNet2DConditionModel, AutoencoderKL\n"
            "import neodragon_npu.kernels.attention, neodragon_npu.passes.registry\n"
            "import kernels; assert 'site-packages' in kernels.__file__, kernels.__file__\n"
            "print('ok')\n")
    cwd = ROOT if where == "checkout" else tmp_path
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_readme_pass_table_is_the_registry():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## What the passes do"):text.index("## Layout")]
    rows = [line.split("|")[1].strip().strip("`") for line in table.splitlines() if line.startswith("| `")]
    assert sorted(rows) == sorted(PASSES)
    irs = {line.split("|")[1].strip().strip("`"): line.split("|")[2].strip().lower()
           for line in table.splitlines() if line.startswith("| `")}
    assert irs == {name: cls.IR for name, cls in PASSES.items()}
