"""One tiny all-stages build shared by the tests that read a build directory."""

import pytest

from neodragon_npu.tools.engine.build import build as run_build
from neodragon_npu.tools.engine.options import BuildOptions

FAMILY = BuildOptions(model="denoiser", config="tiny", family=True, targets=("sm8750", "x-elite"),
                      calibration_samples=4, partition_budget=220_000)


@pytest.fixture(scope="session")
def build(tmp_path_factory):
    out = tmp_path_factory.mktemp("all") / "build"
    return out, run_build(FAMILY, out)
