import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_denoiser():
    from neodragon_npu.neodragon_models.configs import get_denoiser_config
    from neodragon_npu.neodragon_models.denoiser import build_denoiser

    return build_denoiser(get_denoiser_config("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_stage_inputs(tiny_denoiser):
    """Envelope inputs of every tiny stage, as {stage: {name: tensor}}."""
    from neodragon_npu.neodragon_models.sampling import example_stage_inputs

    return {s: example_stage_inputs(tiny_denoiser, s, seed=3) for s in range(3)}


@pytest.fixture(autouse=True)
def _logging_as_pytest_sees_it():
    """The CLI's main() gives the package logger its own stderr handler and stops it
    propagating; undo that after each test, so a later test's caplog sees the messages."""
    import logging

    yield
    ours = logging.getLogger("neodragon_npu")
    ours.handlers[:] = []
    ours.propagate = True
    ours.setLevel(logging.NOTSET)


def _cli(*args: str, kill_at: str | None = None, log: Path) -> subprocess.CompletedProcess:
    from neodragon_npu.tools.engine.cache import KILL_AT_ENV

    env = dict(os.environ)
    env.pop(KILL_AT_ENV, None)
    if kill_at:
        env[KILL_AT_ENV] = kill_at
    # the log goes to a file: a killed build's compile worker may still hold a pipe open
    with open(log, "w") as f:
        run = subprocess.run([sys.executable, "-m", "neodragon_npu.tools.cli", *args], env=env,
                             stdout=f, stderr=subprocess.STDOUT)
    return subprocess.CompletedProcess(run.args, run.returncode, log.read_text(), "")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """The tiny system's bundle (``build neodragon --config tiny``), built by a run killed
    (SIGKILL) inside the float pipeline once its denoise phase was stored, a second run
    killed once clip-l was built, then a third run to the end: (bundle, first log, second
    log, third log). Tests of single models may read its builds (``graphs/<model>``)."""
    root = tmp_path_factory.mktemp("bundle")
    out = root / "tiny"
    args = ("build", "neodragon", "--config", "tiny", "-o", str(out))
    in_pipeline = _cli(*args, kill_at="bundle:phase:denoise", log=root / "killed-in-pipeline.log")
    assert in_pipeline.returncode == -9, in_pipeline.stdout[-3000:]
    killed = _cli(*args, kill_at="bundle:built:clip-l", log=root / "killed.log")
    assert killed.returncode == -9, killed.stdout[-3000:]
    assert not out.exists()
    resumed = _cli(*args, log=root / "resumed.log")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    return out, in_pipeline.stdout, killed.stdout, resumed.stdout
