import json

import pytest

from neodragon_npu.tools.engine.artifacts import write_manifest
from neodragon_npu.tools.engine.hub import COMPILE_OPTIONS, HubUnavailableError, plan_hub_jobs, submit_hub_jobs


def _all_stages_build(tmp_path):
    build = tmp_path / "b"
    build.mkdir()
    partitions = []
    for k in range(2):
        graphs = {str(s): {"qdq_model": f"stage{s}_part{k}_w8a16.onnx"} for s in range(3)}
        partitions.append({"index": k, "graphs": graphs})
    write_manifest(build, {"pipeline": "denoiser", "mode": "all-stages", "partitions": partitions})
    return build


class RecordingHub:
    """Stands in for the qai_hub module at the network boundary: records every request."""

    def __init__(self):
        self.calls = []

    def Device(self, name):  # noqa: N802 (qai_hub's spelling)
        return ("device", name)

    def _job(self, kind, **kwargs):
        self.calls.append((kind, kwargs))
        job_id = f"j{len(self.calls)}"

        class Job:
            def __init__(self):
                self.job_id = job_id

            def get_target_model(self):
                return f"model-of-{job_id}"

        return Job()

    def submit_compile_job(self, **kwargs):
        return self._job("compile", **kwargs)

    def submit_link_job(self, **kwargs):
        return self._job("link", **kwargs)

    def submit_profile_job(self, **kwargs):
        return self._job("profile", **kwargs)


def test_requests_compile_each_stage_graph_and_link_per_partition(tmp_path):
    build = _all_stages_build(tmp_path)
    requests = plan_hub_jobs(build, "sm8750", profile=True)
    assert [(r.kind, r.name) for r in requests[:5]] == [
        ("compile", "stage2_part0"), ("compile", "stage1_part0"), ("compile", "stage0_part0"),
        ("link", "part0_linked"), ("profile", "part0_profile"),
    ]
    assert requests[0].model == str(build / "stage2_part0_w8a16.onnx")
    assert requests[0].options == COMPILE_OPTIONS == "--target_runtime qnn_context_binary"
    assert {r.device for r in requests} == {"Samsung Galaxy S25 (Family)"}


def test_submission_sends_exactly_these_calls(tmp_path):
    hub = RecordingHub()
    ids = submit_hub_jobs(plan_hub_jobs(_all_stages_build(tmp_path), "x-elite"), client=hub)
    assert len(ids) == 8  # 2 partitions x (3 compiles + 1 link)
    kind, kwargs = hub.calls[0]
    assert kind == "compile" and kwargs == {
        "model": str(tmp_path / "b" / "stage2_part0_w8a16.onnx"),
        "device": ("device", "Snapdragon X Elite CRD"),
        "name": "stage2_part0",
        "options": "--target_runtime qnn_context_binary",
    }
    kind, kwargs = hub.calls[3]
    assert kind == "link" and kwargs["models"] == ["model-of-j1", "model-of-j2", "model-of-j3"]


def test_without_a_token_it_stops_with_one_sentence(tmp_path, monkeypatch):
    monkeypatch.delenv("QAI_HUB_API_TOKEN", raising=False)
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(tmp_path / "none.ini"))
    with pytest.raises(HubUnavailableError) as info:
        submit_hub_jobs(plan_hub_jobs(_all_stages_build(tmp_path), "sm8750"))
    message = str(info.value)
    assert "\n" not in message and ". " not in message and message.endswith("no job was submitted.")


def test_emit_cli_dry_run_and_offline_error(tmp_path, capsys, monkeypatch):
    from neodragon_npu.tools.cli import EXIT_ERROR, main

    build = _all_stages_build(tmp_path)
    assert main(["emit", str(build), "--hub", "--dry-run"]) == 0
    assert "compile  stage2_part0" in capsys.readouterr().out
    monkeypatch.delenv("QAI_HUB_API_TOKEN", raising=False)
    monkeypatch.setenv("QAIHUB_CLIENT_INI", str(tmp_path / "none.ini"))
    assert main(["emit", str(build), "--hub"]) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "API token" in err[0]


def test_a_directory_that_is_not_a_build_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"tool": "other"}))
    with pytest.raises(ValueError, match="was not written by neodragon-npu"):
        plan_hub_jobs(tmp_path, "sm8750")
