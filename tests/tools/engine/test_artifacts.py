import os

from neodragon_npu.tools.engine import artifacts
from neodragon_npu.graphs.onnx_io import sha256


def test_digests_hashed_ahead_are_reused_until_the_file_changes(tmp_path, monkeypatch):
    same, changed, late = (tmp_path / n for n in ("same.bin", "changed.bin", "late.bin"))
    same.write_bytes(b"a" * 5000)
    changed.write_bytes(b"b" * 5000)
    with artifacts.Digests() as digests:
        digests.start([same, changed])
        digests._pool.submit(lambda: None).result()  # one thread, in order: both are hashed
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


def test_hashes_still_queued_are_taken_back_by_the_manifest(tmp_path):
    """When the manifest comes before the background thread got to a file, the manifest
    hashes it itself instead of waiting for that one thread."""
    import threading
    import time

    files = [tmp_path / f"f{i}.bin" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 1000)
    release = threading.Event()
    with artifacts.Digests() as digests:
        digests._pool.submit(release.wait, 60)  # the hashing thread is busy elsewhere
        digests.start(files)
        start = time.perf_counter()
        entries = {e["path"]: e["sha256"] for e in artifacts.file_entries(tmp_path, digests)}
        took = time.perf_counter() - start
        release.set()
    assert took < 30
    assert entries == {f.name: sha256(f) for f in files}
