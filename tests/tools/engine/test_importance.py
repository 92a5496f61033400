import json

from neodragon_npu.tools.engine.importance import run_importance


def test_importance_writes_scores_table_and_charts(tmp_path):
    data = run_importance("tiny", tmp_path / "imp", prompts=1, samples_per_stage=2)
    out = tmp_path / "imp"
    saved = json.loads((out / "importance.json").read_text())
    assert saved["samples_per_stage"] == 2 and len(saved["blocks"]) == 3
    assert sorted(saved["ranking_least_important_first"]) == [0, 1, 2]
    assert saved["blocks"][2]["bi_text"]["mean"] is None  # context-pre-only
    assert all(0 <= b["bi_image"]["stage2"] <= 2 for b in saved["blocks"])
    for png in ("bi_image.png", "bi_text.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "combined" in data["table"]
