"""What generate writes: the MP4 through imageio-ffmpeg's ffmpeg, the GIF without it, the
contact sheet and the PSNR plot."""

import numpy as np
from PIL import Image

from neodragon_npu.tools.runtime import media


def _frames(n=5, h=32, w=48):
    rng = np.random.default_rng(0)
    return (rng.random((n, h, w, 3)) * 255).astype(np.uint8)


def test_a_video_without_ffmpeg_is_a_gif_holding_every_frame(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(media, "_ffmpeg", lambda: None)
    frames = _frames()
    out = media.write_video(frames, tmp_path / "v.mp4")
    assert out == tmp_path / "v.gif" and not (tmp_path / "v.mp4").exists()
    assert "writing a GIF instead" in caplog.text
    with Image.open(out) as gif:
        assert gif.n_frames == len(frames) and gif.size == (48, 32)


def test_an_mp4_is_written_through_the_installed_ffmpeg(tmp_path):
    assert media._ffmpeg() is not None  # imageio-ffmpeg is a dependency
    out = media.write_video(_frames(h=31), tmp_path / "v.mp4")  # an odd height is padded
    assert out.suffix == ".mp4" and out.read_bytes()[4:8] == b"ftyp"


def test_the_contact_sheet_and_the_psnr_plot_are_pngs(tmp_path):
    frames = _frames(n=9)
    sheet = media.write_contact_sheet([("a", frames), ("b", frames)], tmp_path / "s.png", frames=4, title="t")
    plot = media.write_psnr_plot([40.0, float("inf"), 35.5], tmp_path / "p.png", "t")
    for path in (sheet, plot):
        assert Image.open(path).format == "PNG"
    assert media._picks(9, 4) == [0, 3, 5, 8]
    assert media.psnr_8bit(frames[0], frames[0]) == float("inf")
    assert abs(media.psnr_8bit(np.zeros((2, 2), np.uint8), np.full((2, 2), 255, np.uint8))) < 1e-9
