"""The machine a build ran on, recorded in its manifest and report."""

import json

from neodragon_npu.tools.engine import artifacts
from neodragon_npu.tools.engine.host import cpu_model, describe_host, host_line, memory_bytes

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
processor\t: 1
model name\t: AMD EPYC 9R14 96-Core Processor
"""


def test_cpu_model_and_memory_are_read_from_proc_files():
    assert cpu_model(CPUINFO) == "AMD EPYC 9R14 96-Core Processor"
    assert memory_bytes("MemTotal:       24576000 kB\nMemFree:  1 kB\n") == 24576000 * 1024
    assert memory_bytes("no such line\n") is None


def test_host_line_reads_like_a_sentence():
    host = {"cpu": "AMD EPYC", "cpus": 2, "memory_bytes": 24.6e9}
    assert host_line(host) == "AMD EPYC, 2 CPUs, 24.6 GB"
    assert host_line({**host, "memory_bytes": None}) == "AMD EPYC, 2 CPUs"


def test_manifest_names_the_host_and_package_versions(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    manifest = json.loads(artifacts.write_manifest(tmp_path, {"pipeline": "test"}).read_text())
    host = manifest["host"]
    assert host["cpus"] >= 1 and host["cpu"]
    assert host["packages"]["onnxruntime-qnn"] == describe_host()["packages"]["onnxruntime-qnn"] != "not installed"
    assert [f["path"] for f in manifest["files"]] == ["a.txt"]
    # a build that recorded its host first keeps that record
    kept = json.loads(artifacts.write_manifest(tmp_path, {"host": {"cpu": "earlier"}}).read_text())
    assert kept["host"] == {"cpu": "earlier"}
