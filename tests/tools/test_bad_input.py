"""Bad and unusual input through the CLI, as a new user would type it.

Every row must end with a non-zero exit, no traceback, at most 4 lines on stderr naming the
option or file at fault, and nothing the user owns changed: every file under the test's
folder (previous outputs, checkpoints, pipeline files) keeps its bytes, and nothing new is
left there.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from neodragon_npu.tools.cli import EXIT_ERROR, main


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root``: path -> content hash ("dir" for folders)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def owned(tmp_path_factory):
    """What a user has: a previous build, an importance run, checkpoints good and bad, a
    foreign directory, ONNX and pipeline files."""
    from neodragon_npu.neodragon_models.configs import get_denoiser_config
    from neodragon_npu.neodragon_models.denoiser import build_denoiser, save_denoiser

    root = tmp_path_factory.mktemp("owned")
    assert main(["-q", "build", "denoiser", "--config", "tiny", "--until", "export", "--no-cache",
                 "-o", str(root / "build")]) == 0
    assert main(["-q", "importance", "--config", "tiny", "--samples-per-stage", "1", "-o",
                 str(root / "imp")]) == 0
    (root / "build" / "my-notes.txt").write_text("the user's notes\n")
    denoiser = build_denoiser(get_denoiser_config("tiny"), seed=0)
    good = save_denoiser(denoiser, root / "ckpt")
    empty = root / "ckpt-empty-config"
    shutil.copytree(good, empty)
    (empty / "diffusion_transformer_320p" / "config.json").write_text("{}\n")
    corrupt = root / "ckpt-corrupt"
    shutil.copytree(good, corrupt)
    weights = corrupt / "diffusion_transformer_320p" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    mismatched = root / "ckpt-mismatched"
    shutil.copytree(good, mismatched)
    config = json.loads((mismatched / "diffusion_transformer_320p" / "config.json").read_text())
    config["num_layers"] += 1
    (mismatched / "diffusion_transformer_320p" / "config.json").write_text(json.dumps(config))
    (root / "sr.pth.tar").write_bytes(b"not a checkpoint")
    (root / "foreign").mkdir()
    (root / "foreign" / "thesis.tex").write_text("\\section{}\n")
    (root / "a-file").write_text("x\n")
    (root / "bad.onnx").write_bytes(b"\x08\x07garbage")
    assert main(["-q", "apply", _pipeline(root, "ok.toml", '[[passes]]\nname = "fold_constants"\n'),
                 "denoiser:tiny:0", "-o", str(root / "good.onnx")]) == 0
    (root / "truncated.onnx").write_bytes((root / "good.onnx").read_bytes()[:300])
    _pipeline(root, "typo.toml", '[[passes]]\nname = "fold_constants"\noption = {max_rounds = 2}\n')
    _pipeline(root, "negative.toml", '[[passes]]\nname = "fold_constants"\noptions = {max_rounds = -3}\n')
    _pipeline(root, "wrong-type.toml", '[[passes]]\nname = "fold_constants"\noptions = {max_rounds = "four"}\n')
    _pipeline(root, "not-toml.toml", '[[passes]\nname = \n')
    _pipeline(root, "top-level.toml", 'pases = 1\n[[passes]]\nname = "fold_constants"\n')
    _pipeline(root, "engine.toml", '[[passes]]\nname = "split_attention"\noptions = {mask_segments = [[0, 1, 1, 0]]}\n')
    _pipeline(root, "crop.toml", '[[passes]]\nname = "round_weights_adaround"\n'
                                 'options = {calibration = "c.npz", crop = [48]}\n')
    np.savez(root / "c.npz", x=np.zeros((1, 3, 8, 8), np.float32))
    return root


def _pipeline(root: Path, name: str, text: str) -> str:
    (root / name).write_text(text)
    return str(root / name)


# (id, argv with {R} for the user's folder, what the message must name)
CASES = [
    # ownership of output directories
    ("importance over a build", ["importance", "--config", "tiny", "--samples-per-stage", "1", "-o", "{R}/build"],
     "{R}/build holds a build"),
    ("more calls than a stage makes", ["importance", "--config", "tiny", "-o", "{R}/new"], "--samples-per-stage 4"),
    ("build over an importance run", ["build", "denoiser", "--config", "tiny", "-o", "{R}/imp"],
     "holds an importance run"),
    ("build's input inside its output", ["build", "denoiser", "--config", "tiny", "--remove-blocks", "count=1",
                                         "--importance", "{R}/imp/importance.json", "-o", "{R}/imp"],
     "--importance {R}/imp/importance.json lies inside the output directory"),
    ("checkpoint inside the output", ["build", "denoiser", "--config", "tiny", "--checkpoint", "{R}/ckpt/x",
                                      "-o", "{R}/ckpt"], "--checkpoint"),
    ("cache inside the output", ["build", "denoiser", "--config", "tiny", "--cache-dir", "{R}/build/cache",
                                 "-o", "{R}/build"], "--cache-dir"),
    ("a foreign directory", ["build", "denoiser", "--config", "tiny", "-o", "{R}/foreign"],
     "{R}/foreign is not empty and holds no neodragon-npu output"),
    ("a file as output", ["build", "denoiser", "--config", "tiny", "-o", "{R}/a-file"], "{R}/a-file is a file"),
    ("the current directory", ["build", "quicksrnet", "--config", "small", "-o", "."], "-o . is the current directory"),
    ("apply over its input", ["apply", "{R}/ok.toml", "{R}/good.onnx", "-o", "{R}/good.onnx"], "is the input model"),
    # options refused before any work
    ("unknown --skip-pass", ["build", "denoiser", "--skip-pass", "split_adaln_typo", "-o", "{R}/new"],
     "--skip-pass split_adaln_typo"),
    ("negative seed", ["build", "denoiser", "--seed", "-1", "-o", "{R}/new"], "--seed"),
    ("zero calibration samples", ["build", "denoiser", "--calibration-samples", "0", "-o", "{R}/new"],
     "--calibration-samples"),
    ("partition budget below a layer", ["build", "denoiser", "--config", "tiny", "--all-stages",
                                        "--partition-budget", "1000", "-o", "{R}/new"], "--partition-budget"),
    ("remove a block that does not exist", ["build", "denoiser", "--config", "tiny", "--remove-blocks", "99",
                                            "-o", "{R}/new"], "99"),
    ("count= without scores", ["build", "denoiser", "--config", "tiny", "--remove-blocks", "count=1",
                               "-o", "{R}/new"], "--importance"),
    ("verify --json into a missing folder", ["verify", "{R}/build", "--json", "{R}/missing/v.json"], "--json"),
    ("report --json into a missing folder", ["report", "denoiser", "--json", "{R}/missing/r.json"], "--json"),
    ("emit a target twice", ["emit", "{R}/build", "--hub", "--target", "sm8750,sm8750", "--dry-run"], "--target"),
    # checkpoints
    ("missing checkpoint", ["build", "denoiser", "--config", "tiny", "--checkpoint", "{R}/nope", "-o", "{R}/new"],
     "{R}/nope"),
    ("empty config.json", ["build", "denoiser", "--config", "tiny", "--checkpoint", "{R}/ckpt-empty-config",
                           "-o", "{R}/new"], "config.json lacks num_layers"),
    ("corrupt safetensors", ["build", "denoiser", "--config", "tiny", "--checkpoint", "{R}/ckpt-corrupt",
                             "-o", "{R}/new"], "diffusion_pytorch_model.safetensors"),
    ("mismatched checkpoint", ["build", "denoiser", "--config", "tiny", "--checkpoint", "{R}/ckpt-mismatched",
                               "-o", "{R}/new"], "does not match the model"),
    ("importance, corrupt checkpoint", ["importance", "--config", "tiny", "--samples-per-stage", "1",
                                        "--checkpoint", "{R}/ckpt-corrupt", "-o", "{R}/new"], "safetensors"),
    ("quicksrnet checkpoint not a checkpoint", ["build", "quicksrnet", "--checkpoint", "{R}/sr.pth.tar",
                                                "-o", "{R}/new"], "sr.pth.tar"),
    # ONNX files
    ("malformed ONNX", ["stats", "{R}/bad.onnx"], "bad.onnx"),
    ("truncated ONNX", ["diff", "{R}/good.onnx", "{R}/truncated.onnx"], "truncated.onnx"),
    ("apply to malformed ONNX", ["apply", "{R}/ok.toml", "{R}/bad.onnx", "-o", "{R}/out.onnx"], "bad.onnx"),
    # pipeline files
    ("pipeline key typo", ["apply", "{R}/typo.toml", "denoiser:tiny:0", "-o", "{R}/out.onnx"], "'option'"),
    ("pass option out of range", ["apply", "{R}/negative.toml", "denoiser:tiny:0", "-o", "{R}/out.onnx"],
     "max_rounds = -3"),
    ("pass option of the wrong type", ["apply", "{R}/wrong-type.toml", "denoiser:tiny:0", "-o", "{R}/out.onnx"],
     "max_rounds = 'four' must be int"),
    ("pipeline not TOML", ["apply", "{R}/not-toml.toml", "denoiser:tiny:0", "-o", "{R}/out.onnx"], "not-toml.toml"),
    ("pipeline top-level typo", ["apply", "{R}/top-level.toml", "denoiser:tiny:0", "-o", "{R}/out.onnx"], "'pases'"),
    ("engine-only pass option", ["apply", "{R}/engine.toml", "denoiser:tiny:0", "-o", "{R}/out.onnx"],
     "mask_segments is set by the build engine"),
    ("pass option of the wrong length", ["apply", "{R}/crop.toml", "denoiser:tiny:0", "-o", "{R}/out.onnx"],
     "crop = [48] must hold 2 values"),
    ("missing pipeline file", ["apply", "{R}/nope.toml", "denoiser:tiny:0", "-o", "{R}/out.onnx"], "nope.toml"),
    # the cache command
    ("cache info of a non-cache", ["cache", "info", "{R}/foreign"], "{R}/foreign"),
]


@pytest.mark.parametrize("argv, names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_a_few_lines_and_changes_nothing(argv, names, owned, capsys, monkeypatch):
    before = _snapshot(owned)
    monkeypatch.chdir(owned)
    argv = [a.replace("{R}", str(owned)) for a in argv]
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code != 0
    assert "Traceback" not in err
    assert 1 <= len(lines) <= 4, err
    assert names.replace("{R}", str(owned)) in err, err
    assert _snapshot(owned) == before


def test_the_table_covers_each_kind_of_failure():
    """The table must keep a row for every case the issue lists (a row removed by mistake
    fails here, not silently)."""
    names = {c[0] for c in CASES}
    for needed in ("importance over a build", "build's input inside its output", "pipeline key typo",
                   "unknown --skip-pass", "pass option out of range", "pass option of the wrong type",
                   "empty config.json", "verify --json into a missing folder", "report --json into a missing folder",
                   "partition budget below a layer", "the current directory", "corrupt safetensors",
                   "mismatched checkpoint", "malformed ONNX", "pipeline not TOML"):
        assert needed in names
    assert len(CASES) >= 30
    assert EXIT_ERROR != 0
