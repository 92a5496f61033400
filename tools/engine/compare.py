"""Two build directories compared file by file and manifest entry by manifest entry, with
what legitimately differs between two runs of the same build set aside.

Set aside: timings, peak memory and CPU time, the machine, and the bytes of the EPContext
models and context binaries. Those last differ between two compiles of the same QDQ file:
onnxruntime names the compiled graph after a hash of the path the file was opened from (a
build's staging directory has a random name), and the QNN compiler writes a few
run-dependent bytes itself. Every other file (samples, float and QDQ graphs, weights,
encodings, JSON) must be equal byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

from neodragon_npu.graphs.onnx_io import sha256
from neodragon_npu.tools.engine.artifacts import MANIFEST

VOLATILE_KEYS = {"host", "steps", "seconds", "compile_seconds", "quantize_seconds", "quantize_peak_rss_bytes",
                 "peak_rss_bytes", "cpu_seconds", "cache"}
UNCOMPARED_FILES = {MANIFEST, "report.txt"}


def _compiled(path: str) -> bool:
    """An EPContext model or a context binary: its bytes vary from compile to compile."""
    return path.endswith(("_ctx.onnx", "_qnn.bin", ".bin"))


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def compare_builds(a: str | Path, b: str | Path) -> tuple[list[str], str]:
    """The differences between builds ``a`` and ``b`` (empty if equal) and a readable report."""
    a, b = Path(a), Path(b)
    for root in (a, b):
        if not (root / MANIFEST).is_file():
            raise ValueError(f"{root} holds no {MANIFEST}: not a build directory")
    diffs: list[str] = []
    files_a, files_b = _files(a), _files(b)
    for name in sorted(set(files_a) ^ set(files_b)):
        diffs.append(f"{name}: only in {a if name in files_a else b}")
    same = compiled = 0
    for name in sorted(set(files_a) & set(files_b)):
        if name in UNCOMPARED_FILES:
            continue
        if _compiled(name):
            compiled += 1
            continue
        if sha256(files_a[name]) != sha256(files_b[name]):
            diffs.append(f"{name}: contents differ")
        else:
            same += 1
    ma, mb = (json.loads((root / MANIFEST).read_text()) for root in (a, b))
    for manifest in (ma, mb):
        manifest["files"] = {f["path"]: (f["bytes"], f["sha256"]) for f in manifest.get("files", [])
                             if not _compiled(f["path"]) and f["path"] not in UNCOMPARED_FILES}
    sa, sb = _strip(ma), _strip(mb)
    for key in sorted(set(sa) | set(sb)):
        if sa.get(key) != sb.get(key):
            diffs.append(f"manifest entry {key!r} differs: {json.dumps(sa.get(key))[:200]} vs "
                         f"{json.dumps(sb.get(key))[:200]}")
    lines = [f"{a} vs {b}:",
             f"  {same} file(s) equal byte for byte; {compiled} compiled file(s) (EPContext models, context "
             f"binaries) present in both, their bytes not compared",
             f"  manifest: {len(sa)} entries compared, timings and the machine set aside"]
    lines += [f"  DIFFERENT {d}" for d in diffs] or ["  no difference"]
    return diffs, "\n".join(lines)
