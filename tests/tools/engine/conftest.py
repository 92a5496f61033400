"""One tiny all-stages build shared by the tests that read a build directory."""

import pytest

from neodragon_npu.tools.engine.family import AllStagesOptions, build_denoiser_stages


@pytest.fixture(scope="session")
def build(tmp_path_factory):
    out = tmp_path_factory.mktemp("all") / "build"
    opts = AllStagesOptions(
        config="tiny", targets=("sm8750", "x-elite"), calibration_samples=4, max_partition_weight_bytes=220_000
    )
    return out, build_denoiser_stages(opts, out)
