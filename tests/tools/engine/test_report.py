from collections import Counter

from neodragon_npu.tools.engine.progress import StepRecord
from neodragon_npu.graphs.stats import GraphStats
from neodragon_npu.tools.engine.report import render_report


def _stats(nodes, out_bytes):
    return GraphStats(nodes, Counter({"MatMul": nodes}), 10, out_bytes, ("t", 4, (1,)), 8, "n", 0)


def test_report_shows_steps_stats_and_passes():
    text = render_report(
        {
            "title": "denoiser tiny stage 2",
            "host": {"cpu": "AMD EPYC", "cpus": 2, "memory_bytes": 24.6e9},
            "steps": [StepRecord("export", 1.25, 2 * 10**9, cpu_seconds=2.4), StepRecord("old record", 1.0, 10**9)],
            "onnx_before": _stats(10, 2048),
            "onnx_after": _stats(8, 1024),
            "onnx_passes": [{"pass": "fold_constants", "modified": True, "seconds": 0.1}],
            "compile_seconds": 3.0,
        }
    )
    assert text.startswith("denoiser tiny stage 2\n=====")
    assert "Host: AMD EPYC, 2 CPUs, 24.6 GB" in text
    assert "export" in text and "1.2 s  CPU      2 s  peak RSS 2.00 GB" in text
    assert "old record" in text and "CPU" not in text.split("old record")[1].splitlines()[0]
    assert "2.00 KB -> 1.00 KB" in text
    assert "fold_constants               modified" in text
    assert "HTP context binary built in 3.0 s" in text
