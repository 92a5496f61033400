"""The streaming decoder's two compiled graphs chained over whole videos in the HTP
simulator, each call's state outputs fed to the next call."""

import pytest

from neodragon_npu.tools.engine.build import build
from neodragon_npu.tools.engine.options import BuildOptions
from neodragon_npu.tools.engine.stream_check import StreamCheckError, check_stream


@pytest.fixture(scope="module")
def decoder_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    for graph in ("first", "next"):
        build(BuildOptions(model="vae-decoder", config="tiny", graphs=(graph,), cache=False, min_sqnr_db=20.0),
              root / graph)
    build(BuildOptions(model="vae-decoder", config="tiny", seed=1, graphs=("next",), cache=False,
                       min_sqnr_db=20.0), root / "other-seed")
    return root


def test_a_video_decodes_through_both_binaries_and_agrees_with_aimet(decoder_builds):
    htp = check_stream(decoder_builds / "first", decoder_builds / "next", videos=1)
    assert [len(v) for v in htp.frame_sqnr_db] == [49]
    assert htp.pooled_db > 25.0
    qdq = check_stream(decoder_builds / "first", decoder_builds / "next", videos=1, runtime="cpu-qdq")
    assert abs(qdq.pooled_db - htp.pooled_db) < 3.0


def test_builds_that_cannot_be_chained_are_refused(decoder_builds):
    with pytest.raises(StreamCheckError, match="not a vae-decoder build of the 'first' graph"):
        check_stream(decoder_builds / "next", decoder_builds / "first")
    with pytest.raises(StreamCheckError, match="differ in model"):
        check_stream(decoder_builds / "first", decoder_builds / "other-seed")
    with pytest.raises(StreamCheckError, match="no manifest.json"):
        check_stream(decoder_builds, decoder_builds / "next")
