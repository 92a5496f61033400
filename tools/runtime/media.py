"""Writing what ``generate`` makes: the video (MP4 through the ffmpeg that imageio-ffmpeg
ships, or an animated GIF when there is none), a contact sheet of frames, and the per-frame
PSNR plot. numpy, Pillow and matplotlib only."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import numpy as np

logger = logging.getLogger("neodragon_npu")
FPS = 24  # 49 frames: about two seconds, as the released pipeline exports


def _ffmpeg() -> str | None:
    try:
        import imageio_ffmpeg
    except ImportError:
        return None
    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError:
        return None


def write_video(frames: np.ndarray, path: str | Path, fps: int = FPS) -> Path:
    """``frames`` [F, H, W, 3] uint8 to ``path``: H.264 MP4 where an ffmpeg is found, else an
    animated GIF beside it (``.gif``). Returns the file written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    exe = _ffmpeg() if path.suffix.lower() == ".mp4" else None
    if exe is not None:
        f, h, w, _ = frames.shape
        # yuv420p needs even sides: pad one row or column by repeating the edge
        padded = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        cmd = [exe, "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s",
               f"{padded.shape[2]}x{padded.shape[1]}", "-r", str(fps), "-i", "-", "-c:v", "libx264",
               "-pix_fmt", "yuv420p", "-crf", "16", str(path)]
        done = subprocess.run(cmd, input=np.ascontiguousarray(padded).tobytes(), capture_output=True)
        if done.returncode == 0:
            return path
        logger.warning("ffmpeg could not write %s (%s); writing a GIF instead", path,
                       done.stderr.decode(errors="replace").strip().splitlines()[-1:] or "no message")
    elif path.suffix.lower() == ".mp4":
        logger.warning("no ffmpeg here (pip install imageio-ffmpeg): writing a GIF instead of %s", path)
    from PIL import Image

    gif = path.with_suffix(".gif")
    images = [Image.fromarray(f) for f in frames]
    images[0].save(gif, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return gif


def _picks(count: int, n: int) -> list[int]:
    return sorted({round(i * (count - 1) / max(n - 1, 1)) for i in range(n)})


def write_contact_sheet(rows: list[tuple[str, np.ndarray]], path: str | Path, frames: int = 7,
                        title: str = "", width_inches: float = 10.0) -> Path:
    """A PNG grid: one row per (label, [F, H, W, 3] uint8 video), the same evenly spaced
    frames in every row, each titled with its frame index."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = _picks(len(rows[0][1]), frames)
    h, w = rows[0][1].shape[1:3]
    cell = width_inches / len(picks)
    fig, axes = plt.subplots(len(rows), len(picks), squeeze=False,
                             figsize=(width_inches, cell * h / w * len(rows) + 0.6 + 0.25 * len(rows)))
    for r, (label, video) in enumerate(rows):
        for c, k in enumerate(picks):
            ax = axes[r][c]
            ax.imshow(video[k])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"frame {k}", fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_psnr_plot(psnr_db: list[float], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    finite = [v if np.isfinite(v) else np.nan for v in psnr_db]
    ax.plot(range(len(finite)), finite, marker="o", markersize=3)
    ax.set_xlabel("frame")
    ax.set_ylabel("PSNR against float (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def psnr_8bit(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
