import json
import os

import pytest

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


def _write_output(path, files: dict[str, str], kind: str = "build") -> None:
    """An output of this tool in ``path`` holding ``files`` (name -> text), as a command
    writes it (staged, with a manifest)."""
    with artifacts.staged_dir(path, kind) as work:
        for name, text in files.items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_text(text)
        artifacts.write_manifest(work, {"pipeline": "test"}, kind=kind)


def test_a_rebuild_replaces_only_its_own_files_and_keeps_what_the_user_added(tmp_path):
    out = tmp_path / "out"
    _write_output(out, {"model.onnx": "v1", "old_only.txt": "v1", "sub/graph.bin": "v1"})
    (out / "notes.md").write_text("mine")
    (out / "plots").mkdir()
    (out / "plots" / "sqnr.png").write_text("my plot")
    (out / "sub" / "extra.txt").write_text("mine too")
    (out / "report.txt").write_text("I wrote this one")  # a name the next output takes
    _write_output(out, {"model.onnx": "v2", "sub/graph.bin": "v2", "report.txt": "the tool's"})
    assert (out / "model.onnx").read_text() == "v2" and (out / "sub" / "graph.bin").read_text() == "v2"
    assert not (out / "old_only.txt").exists()  # the previous output's own file
    assert (out / "notes.md").read_text() == "mine"
    assert (out / "plots" / "sqnr.png").read_text() == "my plot"
    assert (out / "sub" / "extra.txt").read_text() == "mine too"
    assert (out / "report.txt").read_text() == "the tool's"
    assert (out / ("report.txt" + artifacts.KEPT_SUFFIX)).read_text() == "I wrote this one"
    # the user's files stay the user's: the manifest does not list them, a third build keeps them
    listed = {f["path"] for f in json.loads((out / artifacts.MANIFEST).read_text())["files"]}
    assert listed == {"model.onnx", "sub/graph.bin", "report.txt"}
    _write_output(out, {"model.onnx": "v3"})
    assert (out / "notes.md").read_text() == "mine" and not (out / "sub" / "graph.bin").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_another_kind_of_output_or_a_foreign_directory_is_refused_unless_forced(tmp_path):
    out = tmp_path / "out"
    _write_output(out, {"importance.json": "{}"}, kind="importance")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(artifacts.OutputDirError, match="holds an importance run of neodragon-npu, not a build"):
        _write_output(out, {"model.onnx": "v1"})
    assert sorted(p.name for p in out.iterdir()) == before
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("text")
    with pytest.raises(artifacts.OutputDirError, match="holds no neodragon-npu output.*--force"):
        _write_output(foreign, {"model.onnx": "v1"})
    with artifacts.staged_dir(foreign, "build", force=True) as work:
        (work / "model.onnx").write_text("v1")
        artifacts.write_manifest(work, {}, kind="build")
    assert (foreign / "chapter1.tex").read_text() == "text" and (foreign / "model.onnx").read_text() == "v1"
    assert not list(tmp_path.glob(".*"))


def test_an_input_inside_the_output_or_the_current_directory_is_refused_before_any_work(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _write_output(out, {"importance.json": "{}"}, kind="importance")
    with pytest.raises(artifacts.OutputDirError, match=r"--importance .*importance.json lies inside the output"):
        artifacts.check_output_dir(out, "importance", inputs={"--importance": out / "importance.json"})
    monkeypatch.chdir(out)
    with pytest.raises(artifacts.OutputDirError, match=r"-o \. is the current directory"):
        artifacts.check_output_dir(".", "importance")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(artifacts.OutputDirError, match="is a file"):
        artifacts.check_output_dir(out / "importance.json")


def test_an_output_set_aside_by_a_killed_swap_is_restored_or_removed(tmp_path):
    """A command killed between setting the old output aside and renaming the new one into
    place leaves ``.NAME.old-PID``: the next command into NAME puts it back if nothing took
    its place (the user's files with it), or removes it if the new output is there."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    _write_output(out, {"model.onnx": "v1"})
    (out / "notes.md").write_text("mine")
    os.rename(out, tmp_path / f".out.old-{dead.pid}")
    assert not artifacts.remove_leftovers(out)
    assert (out / "notes.md").read_text() == "mine" and (out / "model.onnx").read_text() == "v1"
    (tmp_path / f".out.old-{dead.pid}").mkdir()
    (tmp_path / f".out.old-{dead.pid}" / "model.onnx").write_text("v0")
    artifacts.remove_leftovers(out)
    assert not (tmp_path / f".out.old-{dead.pid}").exists() and (out / "model.onnx").read_text() == "v1"
