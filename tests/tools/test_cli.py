import pytest

from neodragon_npu.tools.cli import EXIT_ERROR, build_parser, main


def test_passes_and_targets_are_listed(capsys):
    assert main(["passes", "--options"]) == 0
    out = capsys.readouterr().out
    assert "specialize_shapes" in out and "[onnx]" in out and "calibration (path; required)" in out
    assert "max_rounds (int in [1, 100]; default 4)" in out
    assert main(["targets"]) == 0
    assert "soc_model 69" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["build", "denoiser", "--config", "nope", "--out", "x"], "unknown denoiser config 'nope'"),
        (["build", "denoiser", "--target", "sm1", "--out", "x"], "unknown target 'sm1'"),
        (["build", "denoiser", "--stage", "7", "--out", "x"], "--stage 7: denoiser has no such graph; its graphs: 0, 1, 2"),
        (["build", "vae", "--out", "x"], "unknown model 'vae'; models: denoiser, quicksrnet"),
        (["build", "denoiser", "--all-stages", "--until", "dance", "-o", "x"], "invalid choice: 'dance'"),
        (["build", "denoiser", "--partition-budget", "1G", "-o", "x"], "--partition-budget applies to a family build"),
        (["build", "denoiser", "--gptq-target", "float", "-o", "x"], "--gptq-target applies to a family build"),
        (["build", "ssd1b-vae-decoder", "--partition-activations", "2G", "-o", "x"],
         "--partition-activations applies to a family build"),
        (["build", "ssd1b-vae-decoder", "--all-graphs", "--partition-activations", "0", "-o", "x"],
         "--partition-activations must be a whole number of at least 1"),
        (["build", "quicksrnet", "--stage", "2", "-o", "x"], "--stage is not an option of quicksrnet"),
        (["build", "quicksrnet", "--remove-blocks", "1", "-o", "x"], "--remove-blocks is not an option of quicksrnet"),
        (["build", "denoiser", "--skip-pass", "split_adaln_typo", "-o", "x"], "--skip-pass split_adaln_typo: no such pass"),
        (["build", "denoiser", "--precision", "fp16", "--kv-bits", "8", "-o", "x"], "--kv-bits applies to W8A16 builds"),
        (["build", "denoiser", "--target", "sm8750,sm8750", "-o", "x"], "names a target twice"),
        (["stats", "missing.onnx"], "missing.onnx: no such ONNX file"),
        (["build", "denoiser", "--high-precision", "none", "--first-blocks-16bit", "2", "--out", "x"],
         "leave out --first-blocks-16bit"),
        (["build", "denoiser", "--first-blocks-16bit", "-1", "--out", "x"], "--first-blocks-16bit -1 is negative"),
        (["build", "neodragon", "--config", "tiny", "--stage", "2", "-o", "x"],
         "--stage does not apply to `build neodragon`"),
        (["build", "neodragon", "--config", "tiny", "--until", "export", "-o", "x"],
         "--until does not apply to `build neodragon`"),
        (["build", "neodragon", "--config", "small", "-o", "x"], "unknown system config 'small'; known: tiny, neodragon"),
        (["build", "neodragon", "--config", "tiny", "--target", "sm1", "-o", "x"], "unknown target 'sm1'"),
        (["build", "dt5", "--prompts", "4", "-o", "x"], "--prompts applies to `build neodragon`"),
        (["generate", "a fox", "--bundle", "nowhere", "-o", "v.mp4"], "nowhere holds no manifest.json: not a bundle"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("neodragon-npu: error:")
    assert not (tmp_path / "x").exists()


def test_apply_stats_and_diff_end_to_end(tmp_path, capsys):
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('[[passes]]\nname = "specialize_shapes"\n[[passes]]\nname = "fold_constants"\n')
    assert main(["-q", "apply", str(pipeline), "denoiser:tiny:0", "--out", str(tmp_path / "a.onnx")]) == 0
    cleanup = tmp_path / "c.toml"
    cleanup.write_text('[[passes]]\nname = "remove_unused_nodes"\n')
    assert main(["-q", "apply", str(cleanup), str(tmp_path / "a.onnx"), "--out", str(tmp_path / "b.onnx")]) == 0
    capsys.readouterr()
    assert main(["stats", str(tmp_path / "b.onnx"), "--activation-bytes", "2"]) == 0
    assert "peak live activations" in capsys.readouterr().out
    assert main(["diff", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")]) == 0
    assert "Totals:" in capsys.readouterr().out


def test_build_requires_an_output_directory(capsys):
    assert main(["build", "denoiser"]) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "-o/--out" in err[0] and "neodragon-npu build -h" in err[0]


def test_corrupt_model_and_unknown_pass_in_a_pipeline_file(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    assert main(["stats", str(bad)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "bad.onnx" in err and ("not a readable ONNX model" in err or "empty" in err)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('[[passes]]\nname = "make_it_fast"\n')
    assert main(["apply", str(pipeline), "denoiser:tiny:0", "--out", str(tmp_path / "o.onnx")]) == EXIT_ERROR
    assert "unknown pass 'make_it_fast'" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_a_terminated_build_leaves_nothing_behind(tmp_path):
    """SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: the staging directory is removed
    and the worker process stopped; the exit status says it was interrupted. Finished
    steps stay in the step cache for the next build."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "build"
    proc = subprocess.Popen(
        [sys.executable, "-m", "neodragon_npu.tools.cli", "build", "denoiser", "--all-stages", "--config", "tiny", "--out", str(out)],
        cwd=os.getcwd(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".build.partial-*/*.npz")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert "neodragon-npu: interrupted" in err
    # the steps it finished stay in the cache beside the output, whole; nothing else remains
    assert [p.name for p in tmp_path.iterdir()] in ([], ["build.cache"])
    assert not list(tmp_path.glob("build.cache/*/.tmp-*"))


def test_sigterm_inside_exec_of_a_string_still_exits_130(tmp_path):
    """CPython run with -m exits by SIGINT (status -2) once a KeyboardInterrupt has passed
    through `exec` of a string, even when the program handled it; dataclasses and torch run
    such code while importing. So SIGTERM must not become a KeyboardInterrupt, or the test
    above fails whenever the signal lands in one of those imports."""
    import os
    import subprocess
    import sys

    (tmp_path / "killed_in_exec.py").write_text(
        "import sys\n"
        "from tools import cli\n"
        "def killed_in_exec(args):\n"
        "    exec('import os, signal, time\\nos.kill(os.getpid(), signal.SIGTERM)\\ntime.sleep(30)')\n"
        "cli._cmd_targets = killed_in_exec\n"
        "sys.exit(cli.main(['targets']))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.getcwd()]))
    done = subprocess.run([sys.executable, "-m", "killed_in_exec"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 130, done.stderr
    assert "neodragon-npu: interrupted" in done.stderr


def test_first_blocks_16bit_sets_which_blocks_keep_16_bit_weights():
    from neodragon_npu.passes.pipelines import DENOISER_HIGH_PRECISION, first_blocks_patterns
    from neodragon_npu.tools.cli import build_options
    from neodragon_npu.tools.engine.options import plan_build

    def patterns(*argv):
        args = build_parser().parse_args(["build", "denoiser", "--out", "x", *argv])
        return plan_build(build_options(args)).precision.high_precision

    assert patterns() == DENOISER_HIGH_PRECISION
    four = patterns("--first-blocks-16bit", "4", "--high-precision", "/extra/*")
    assert set(four) - set(DENOISER_HIGH_PRECISION) == (set(first_blocks_patterns(4)) - set(first_blocks_patterns(2))) | {"/extra/*"}
    assert set(DENOISER_HIGH_PRECISION) <= set(four) and four[-1] == "/extra/*"
    none = patterns("--first-blocks-16bit", "0")
    assert not set(first_blocks_patterns(1)) & set(none) and set(none) < set(DENOISER_HIGH_PRECISION)
    assert patterns("--high-precision", "none") == ()


def test_an_error_is_one_line_and_says_when_debug_shows_more():
    from neodragon_npu.tools.cli import user_message

    assert user_message(ValueError("--seed must be positive")) == ("--seed must be positive", False)
    first, hidden = user_message(RuntimeError("[ONNXRuntimeError] : 1 : FAIL : bad node\n  at frame 1\n  at 2"))
    assert first == "RuntimeError: [ONNXRuntimeError] : 1 : FAIL : bad node" and hidden
    try:
        try:
            raise KeyError("inner")
        except KeyError as exc:
            raise ValueError("outer") from exc
    except ValueError as exc:
        assert user_message(exc) == ("outer", True)
    staged = OSError(f"cannot write /data/runs/.sr.partial-{12345}-k2j3h_x/model.onnx")
    assert user_message(staged)[0] == "OSError: cannot write /data/runs/sr/model.onnx"
    import errno

    full = OSError(errno.ENOSPC, "No space left on device", "/data/runs/.sr.partial-77-abc/p.onnx")
    first, _ = user_message(full)
    assert first.startswith("the disk is full while writing /data/runs/sr/p.onnx; free some space")
    noted = ValueError("shape mismatch")
    noted.add_note("(in pass fold_constants)")
    assert user_message(noted)[0] == "shape mismatch (in pass fold_constants)"


def test_a_library_error_prints_the_debug_hint_and_debug_prints_the_traceback(tmp_path, capsys, monkeypatch):
    from neodragon_npu.tools import cli

    def broken(args):
        raise RuntimeError("deep inside a library\nwith a second line")

    monkeypatch.setattr(cli, "_cmd_targets", broken)
    assert main(["targets"]) == EXIT_ERROR
    err = capsys.readouterr().err.splitlines()
    assert err == ["neodragon-npu: error: RuntimeError: deep inside a library",
                   "neodragon-npu: (run again with --debug for the full error and traceback)"]
    with pytest.raises(RuntimeError, match="second line"):
        main(["targets", "--debug"])  # a global flag after the subcommand


def test_global_flags_work_before_and_after_the_subcommand(capsys):
    parser = build_parser()
    for argv in (["-q", "--debug", "targets"], ["targets", "-q", "--debug"]):
        args = parser.parse_args(argv)
        assert args.quiet and args.debug and args.verbose == 0
    assert parser.parse_args(["targets", "-vv"]).verbose == 2
    assert parser.parse_args(["-v", "targets"]).verbose == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["--version"])
    assert "neodragon-npu" in capsys.readouterr().out


def test_every_subcommand_has_an_example_and_shows_its_defaults():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) >= {"build", "emit", "importance", "bench", "verify", "report", "apply", "diff", "stats",
                             "passes", "targets", "cache", "compare-builds"}
    for name, sub in commands.items():
        assert (sub.epilog or "").startswith(f"example: neodragon-npu {name}"), name
    help_text = commands["verify"].format_help()
    assert "(default: 2)" in help_text  # --prompts
    assert "(default: sm8750)" in commands["emit"].format_help()


def test_emit_takes_the_same_target_list_as_build(tmp_path, capsys):
    from neodragon_npu.tools.engine.artifacts import write_manifest

    build_dir = tmp_path / "b"
    build_dir.mkdir()
    (build_dir / "m_qdq.onnx").write_text("x")
    write_manifest(build_dir, {"pipeline": "quicksrnet", "qdq_model": "m_qdq.onnx", "graphs": [{"name": "x2"}]})
    assert main(["emit", str(build_dir), "--hub", "--dry-run", "--target", "sm8750,x-elite"]) == 0
    out = capsys.readouterr().out
    assert "Samsung Galaxy S25 (Family)" in out and "Snapdragon X Elite CRD" in out
