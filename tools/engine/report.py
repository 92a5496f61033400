"""The short human-readable report written next to every build."""

from __future__ import annotations

from pathlib import Path

from neodragon_npu.tools.engine.host import host_line
from neodragon_npu.graphs.stats import GraphStats, format_bytes, format_stats


def _stats_pair(before: GraphStats, after: GraphStats, label: str) -> list[str]:
    def row(name: str, a: float, b: float, fmt) -> str:
        return f"  {name:<24}{fmt(a):>14} -> {fmt(b):<14}"

    return [
        f"{label}:",
        row("nodes", before.node_count, after.node_count, str),
        row("op-output bytes/call", before.op_output_bytes, after.op_output_bytes, format_bytes),
        row("largest tensor", before.largest_tensor[1], after.largest_tensor[1], format_bytes),
        row("peak live activations", before.peak_live_bytes, after.peak_live_bytes, format_bytes),
        row("weights", before.weight_bytes, after.weight_bytes, format_bytes),
        *([row("MACs/call", before.extra["macs"], after.extra["macs"], lambda m: f"{m / 1e9:.3f} G")]
          if before.extra.get("macs") else []),
        *([row("Transpose/Reshape bytes", before.extra["layout_bytes"], after.extra["layout_bytes"], format_bytes)]
          if "layout_bytes" in before.extra else []),
    ]


def _passes(records: list[dict]) -> list[str]:
    return [
        f"  {r['pass']:<28} {'modified' if r['modified'] else 'no change':<10} {r['seconds']:.2f} s"
        for r in records
    ]


def model_lines(model: dict) -> list[str]:
    """What a build changed in the model before tracing (blocks removed), for its report."""
    removed = model.get("removed_blocks")
    if not removed:
        return []
    total = len(model.get("block_mapping", {})) + len(removed) if "block_mapping" in model else None
    of = f" of {total}" if total else ""
    return [f"Model: {len(removed)}{of} blocks removed before tracing ({', '.join(map(str, removed))}); "
            "block_mapping.json maps old indices to new", ""]


def render_report(report: dict) -> str:
    lines = [report["title"], "=" * len(report["title"]), ""]
    if "host" in report:
        lines += [f"Host: {host_line(report['host'])}", ""]
    lines += model_lines(report.get("model", {}))
    if "steps" in report:
        lines.append("Steps:")
        for r in report["steps"]:
            cpu = f"  CPU {r.cpu_seconds:6.0f} s" if r.cpu_seconds is not None else ""
            lines.append(f"  {r.name:<64} {r.seconds:8.1f} s{cpu}  peak RSS {r.peak_rss_bytes / 1e9:.2f} GB")
        lines.append("")
    if "fx_before" in report:
        lines += _stats_pair(report["fx_before"], report["fx_after"], "FX graph (fp32 bytes)")
        lines += _passes(report["fx_passes"]) + [""]
    if "onnx_before" in report:
        lines += _stats_pair(report["onnx_before"], report["onnx_after"], "ONNX graph (fp32 bytes)")
        lines += _passes(report["onnx_passes"]) + [""]
        lines.append(format_stats(report["onnx_after"], "Float ONNX graph handed to quantization:"))
        lines.append("")
    if "float_check" in report:
        worst = min(c.sqnr_db for c in report["float_check"])
        lines.append(f"Float ONNX vs PyTorch: worst sample SQNR {worst:.1f} dB")
    if "auto_16bit" in report:
        lines += _auto_16bit(report["auto_16bit"])
    if "qdq" in report:
        q = report["qdq"]
        n_q = q.op_counts.get("QuantizeLinear", 0) + q.op_counts.get("DequantizeLinear", 0)
        lines.append(f"W8A16 QDQ model: {q.node_count} nodes ({n_q} Q/DQ), weights {format_bytes(q.weight_bytes)}")
    if "fp16" in report:
        peak, where = report["fp16_range"]
        lines.append(f"FP16 graph: {report['fp16'].node_count} nodes, weights {format_bytes(report['fp16'].weight_bytes)}; "
                     f"largest activation on the calibration samples {peak:.4g} ({where}; FP16 ends at 65504)")
        lines += [f"  {note}" for note in report.get("fp16_notes", ())]
    if "compile_seconds" in report:
        lines.append(f"HTP context binary built in {report['compile_seconds']:.1f} s")
    if "htp_check" in report:
        lines.append("")
        lines.append(f"{report.get('check_device', 'HTP simulator')} vs fp32 PyTorch (check samples, not used for "
                     "calibration):")
        for label, cmp in report["htp_check"]:
            lines.append(f"  {label}: {cmp}")
        for name, db in report.get("htp_sqnr_per_output_db", {}).items():
            lines.append(f"  {name}, all samples pooled: SQNR {db:.2f} dB")
        lines.append(f"  all samples pooled{' (worst output)' if 'htp_sqnr_per_output_db' in report else ''}: "
                     f"SQNR {report['htp_sqnr_db']:.2f} dB")
    return "\n".join(lines) + "\n"


def _auto_16bit(a: dict) -> list[str]:
    kept = a["kept"]
    lines = [f"Weights kept at 16 bit by their int8 noise (target {a['target_db']:g} dB, {a['samples']} calibration "
             f"samples, round-to-nearest int8):",
             f"  all {a['weights']} weights int8: {a['all_int8_db']:.2f} dB (sum of each weight's noise alone: "
             f"{a['all_int8_sum_db']:.2f} dB)",
             f"  {len(kept)} kept at 16 bit ({a['kept_weight_share']:.0%} of the weight bytes); the int8 rest, "
             f"predicted: {a['predicted_db']:.2f} dB"]
    noisiest = sorted(a["noise_db"].items(), key=lambda kv: kv[1])
    for weight, db in noisiest[:min(len(noisiest), max(len(kept), 5))]:
        lines.append(f"  {db:7.2f} dB  {weight}{'  (16 bit)' if weight in kept else ''}")
    return lines + [""]


def write_report(path: Path, report: dict) -> Path:
    path.write_text(render_report(report))
    return path
