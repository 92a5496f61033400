import json

from neodragon_npu.tools.engine.stage_report import format_stage_report, report_json, stage_report


def test_report_compares_baseline_and_optimized_graphs(tmp_path, caplog):
    with caplog.at_level("INFO", logger="neodragon_npu"):
        results = stage_report("tiny", [2], target="sm8750", compile=True, work_dir=tmp_path)
    # each build's progress says which build it is
    steps = [m for m in caplog.messages if m.startswith("[")]
    assert steps and all(line.startswith(("[stage 2 baseline: ", "[stage 2 optimized: ")) for line in steps)
    before, after = results[2]["baseline"], results[2]["optimized"]
    assert after.largest_score_tensor == before.largest_score_tensor // 2  # per head: 1 of 2 heads
    assert after.op_output_bytes < before.op_output_bytes
    assert before.compile_seconds > 0 and after.compile_seconds > 0
    text = format_stage_report("tiny", results)
    from neodragon_npu.neodragon_models import pyramid
    from neodragon_npu.neodragon_models.configs import get_denoiser_config

    tokens = pyramid.envelope_attention_tokens(get_denoiser_config("tiny").geometry, 2, 2)
    assert f"stage 2 ({tokens} attention tokens)" in text and "largest attention-score tensor" in text
    assert json.loads(report_json(results))["2"]["optimized"]["nodes"] == after.nodes
    assert (tmp_path / "stage2_optimized" / "manifest.json").is_file()
