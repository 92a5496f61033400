import os
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
