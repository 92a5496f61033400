import os

from graphs import artifacts
from graphs.onnx_io import sha256


def test_digests_hashed_ahead_are_reused_until_the_file_changes(tmp_path, monkeypatch):
    same, changed, late = (tmp_path / n for n in ("same.bin", "changed.bin", "late.bin"))
    same.write_bytes(b"a" * 5000)
    changed.write_bytes(b"b" * 5000)
    with artifacts.Digests() as digests:
        digests.start([same, changed])
        assert digests.get(same) == sha256(same) and digests.get(changed) == sha256(changed)
        late.write_bytes(b"never hashed ahead")
        changed.write_bytes(b"c" * 5000)  # same size: the modification time tells
        stat = changed.stat()
        os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        assert digests.get(changed) is None and digests.get(late) is None

        hashed = []
        monkeypatch.setattr(artifacts, "sha256", lambda p: hashed.append(p.name) or sha256(p))
        entries = {e["path"]: e["sha256"] for e in artifacts.file_entries(tmp_path, digests)}
    assert sorted(hashed) == ["changed.bin", "late.bin"]
    assert entries == {p.name: sha256(p) for p in (same, changed, late)}
