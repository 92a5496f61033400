"""``neodragon-npu``: build, transform, inspect and compare NPU graphs.

Only this module configures logging. Every user error ends as one line on stderr and a
non-zero exit status; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from neodragon_npu.graphs.targets import DEFAULT_TARGET, TARGETS

EXIT_ERROR = 2
EXIT_CHECK_FAILED = 3

_NOISY_LOGGERS = ("onnxscript", "onnx_ir", "Quant", "Utils", "aimet_onnx", "torch.onnx")


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    ours = logging.getLogger("neodragon_npu")
    ours.handlers[:] = [handler]
    ours.setLevel(level)
    ours.propagate = False
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR if verbosity <= 0 else logging.INFO)


def _parse_bytes(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size (e.g. 768M, 1G, 500000)") from None


def _high_precision(args: argparse.Namespace) -> tuple[str, ...]:
    from neodragon_npu.passes.pipelines import FIRST_BLOCKS_AT_16_BIT, denoiser_high_precision

    if args.high_precision == ["none"]:
        if args.first_blocks_16bit is not None:
            raise ValueError("--high-precision none quantizes every weight to 8 bit: leave out --first-blocks-16bit")
        return ()
    first = FIRST_BLOCKS_AT_16_BIT if args.first_blocks_16bit is None else args.first_blocks_16bit
    return denoiser_high_precision(first) + tuple(args.high_precision or ())


def _cmd_build_all_stages(args: argparse.Namespace) -> int:
    from neodragon_npu.tools.engine.single import BuildCheckError
    from neodragon_npu.tools.engine.family import AllStagesOptions, build_denoiser_stages

    opts = AllStagesOptions(
        config=args.config,
        targets=tuple(args.target.split(",")),
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        seed=args.seed,
        calibration_samples=args.calibration_samples,
        check_prompts=args.check_prompts,
        check_samples=args.check_samples,
        max_partition_weight_bytes=_parse_bytes(args.partition_budget),
        kv_bits=args.kv_bits,
        weight_rounding=args.weight_rounding,
        gptq_target=args.gptq_target,
        high_precision=_high_precision(args),
        remove_blocks=args.remove_blocks,
        importance=Path(args.importance) if args.importance else None,
        skip_passes=tuple(args.skip_pass or ()),
        verify_htp=args.verify_htp,
        exporter=args.exporter,
        verify_each_pass=args.verify_each_pass,
        dump_dir=Path(args.dump_dir) if args.dump_dir else None,
    )
    try:
        build_denoiser_stages(opts, args.out)
    except BuildCheckError as exc:
        print(f"neodragon-npu: check failed: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    print((Path(args.out) / "report.txt").read_text(), end="")
    print(f"build written to {args.out}")
    return 0


def _cmd_emit(args: argparse.Namespace) -> int:
    from neodragon_npu.tools.engine.hub import plan_hub_jobs, submit_hub_jobs

    if not args.hub:
        raise ValueError("emit needs a destination: --hub (Qualcomm AI Hub)")
    requests = plan_hub_jobs(args.build, args.target, profile=args.profile, link=not args.no_link)
    for r in requests:
        print(f"  {r.describe()}")
    if args.dry_run:
        print(f"{len(requests)} request(s) prepared; --dry-run: nothing submitted")
        return 0
    jobs = submit_hub_jobs(requests)
    print(f"submitted {len(jobs)} job(s): {', '.join(jobs)}")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from neodragon_npu.tools.engine.single import BuildCheckError, DenoiserBuildOptions, build_denoiser_stage

    if args.pipeline != "denoiser":
        raise ValueError(f"unknown pipeline {args.pipeline!r}; available: denoiser")
    if args.all_stages:
        return _cmd_build_all_stages(args)
    opts = DenoiserBuildOptions(
        config=args.config,
        stage=args.stage,
        target=args.target,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        seed=args.seed,
        calibration_prompts=args.calibration_prompts,
        check_prompts=args.check_prompts,
        exporter=args.exporter,
        until=args.until,
        remove_blocks=args.remove_blocks,
        importance=Path(args.importance) if args.importance else None,
        skip_passes=tuple(args.skip_pass or ()),
        kv_bits=args.kv_bits,
        weight_rounding=args.weight_rounding,
        high_precision=_high_precision(args),
        verify_each_pass=args.verify_each_pass,
        dump_dir=Path(args.dump_dir) if args.dump_dir else None,
    )
    try:
        result = build_denoiser_stage(opts, args.out)
    except BuildCheckError as exc:
        print(f"neodragon-npu: check failed: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    print((Path(args.out) / "report.txt").read_text(), end="")
    print(f"build written to {args.out}")
    if result.sqnr_db is not None:
        print(f"HTP simulator vs fp32: {result.sqnr_db:.2f} dB SQNR")
    return 0


def _cmd_importance(args: argparse.Namespace) -> int:
    from neodragon_npu.tools.engine.importance import run_importance

    data = run_importance(
        args.config,
        args.out,
        prompts=args.prompts,
        samples_per_stage=args.samples_per_stage,
        checkpoint=args.checkpoint,
        seed=args.seed,
    )
    print(data["table"])
    print(f"least important first: {data['ranking_least_important_first']}")
    print(f"{data['samples_per_stage']} samples per stage in {data['seconds']} s, peak RSS {data['peak_rss_bytes'] / 1e9:.2f} GB")
    print(f"wrote {Path(args.out) / 'importance.json'}, bi_image.png, bi_text.png")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from neodragon_npu.tools.engine.bench import fidelity_benchmark, format_fidelity

    if args.benchmark != "fidelity":
        raise ValueError(f"unknown benchmark {args.benchmark!r}; available: fidelity")
    results = fidelity_benchmark(
        args.config,
        variants=args.variant,
        target=args.target,
        calibration_samples=args.calibration_samples,
        check_samples=args.check_samples,
        work_dir=args.work_dir,
    )
    print(format_fidelity(args.config, results))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from neodragon_npu.tools.engine.verify_build import format_verify, read_build, verify_build

    build, manifest = read_build(args.build)
    result = verify_build(build, prompts=args.prompts, calls_per_prompt=args.calls_per_prompt,
                          float_chain=args.float_chain, per_partition=args.per_partition, first_seed=args.first_seed)
    print(format_verify(build, manifest, result), end="")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(result.as_json(), indent=1) + "\n")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from neodragon_npu.tools.engine.stage_report import format_stage_report, report_json, stage_report

    if args.pipeline != "denoiser":
        raise ValueError(f"unknown pipeline {args.pipeline!r}; available: denoiser")
    results = stage_report(
        args.config, args.stages, target=args.target, compile=args.compile, work_dir=args.work_dir, seed=args.seed
    )
    print(format_stage_report(args.config, results))
    if args.json:
        Path(args.json).write_text(report_json(results) + "\n")
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    from neodragon_npu.passes.registry import load_pipeline_file
    from neodragon_npu.tools.engine.apply import apply_pipeline

    passes = load_pipeline_file(args.pipeline_file)
    result = apply_pipeline(
        passes,
        args.model,
        args.out,
        verify_each_pass=args.verify_each_pass,
        dump_dir=args.dump_dir,
    )
    for r in result.records:
        print(f"{r.name:<28} {'modified' if r.modified else 'no change':<10} {r.seconds:7.2f} s")
    print(f"wrote {result.output}")
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    from neodragon_npu.graphs import onnx_io
    from neodragon_npu.graphs.diff import diff_onnx, format_diff

    print(format_diff(diff_onnx(onnx_io.load(args.a), onnx_io.load(args.b)), limit=args.limit))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from neodragon_npu.graphs import onnx_io
    from neodragon_npu.graphs.stats import format_stats, onnx_stats

    for path in args.models:
        stats = onnx_stats(onnx_io.load(path), activation_bytes=args.activation_bytes)
        print(format_stats(stats, f"{path}:", top_ops=args.top_ops))
    return 0


def _cmd_passes(args: argparse.Namespace) -> int:
    import inspect

    from neodragon_npu.passes.registry import PASSES, pass_options

    for name, cls in PASSES.items():
        print(f"{name:<28} [{cls.IR:<4}] {cls.summary()}")
        if args.verbose_options:
            for opt, default in pass_options(cls).items():
                shown = "required" if default is inspect.Parameter.empty else f"default {default!r}"
                print(f"{'':<36}--{opt} ({shown})")
    return 0


def _cmd_targets(_args: argparse.Namespace) -> int:
    for t in TARGETS.values():
        print(f"{t.name:<10} {t.description:<56} soc_model {t.soc_model:<3} htp v{t.htp_arch}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neodragon-npu",
        description="Compile Neodragon PyTorch modules into verified Hexagon NPU binaries.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build a named pipeline into an output directory")
    b.add_argument("pipeline", help="pipeline name (denoiser)")
    b.add_argument("--config", default="tiny", help="model config: tiny, neodragon, baseline")
    b.add_argument("--stage", type=int, default=2, help="pyramid stage (0, 1, 2)")
    b.add_argument(
        "--target", default=DEFAULT_TARGET, help=f"target SoC ({', '.join(TARGETS)}); with --all-stages a comma list"
    )
    b.add_argument("--all-stages", action="store_true", help="all three stage graphs, partitioned, shared weights")
    b.add_argument("--calibration-samples", type=int, default=8, help="--all-stages: calibration samples per stage")
    b.add_argument("--partition-budget", default="768M", help="--all-stages: fp32 weight bytes per partition")
    b.add_argument("--check-samples", type=int, default=2, help="--all-stages: check calls per stage")
    b.add_argument("--kv-bits", type=int, default=16, choices=(8, 16), help="bits of K and V in attention")
    b.add_argument(
        "--weight-rounding", default="gptq", choices=("gptq", "nearest"),
        help="int8 weight rounding: gptq uses the calibration activations (default), nearest does not",
    )
    b.add_argument(
        "--gptq-target", default="quantized", choices=("quantized", "float"),
        help="--all-stages: GPTQ aims each layer at its float weights on the inputs of the chain with "
        "quantized weights (plain GPTQ, default) or at the float chain's layer output (asymmetric; "
        "overfits on few samples)",
    )
    b.add_argument(
        "--high-precision", action="append",
        help="node or weight name pattern whose weights stay 16-bit, added to the default (embedders, "
        "adaLN, first and last layers, the first blocks, the ContextAdapter: passes/pipelines.py); "
        "'none' quantizes every weight to 8 bit",
    )
    b.add_argument(
        "--first-blocks-16bit", type=int, metavar="N",
        help="the first N MMDiT blocks keep 16-bit weights (default 2; a full-size block costs 57 MB "
        "per target; 4 gave 1.3-1.6 dB more on the full-size build)",
    )
    b.add_argument("--skip-pass", action="append", help="leave a pass out (ablation); repeatable")
    b.add_argument(
        "--verify-htp", action=argparse.BooleanOptionalAction, default=None,
        help="--all-stages: run the chained binaries in the HTP simulator (default: small models only)",
    )
    b.add_argument("--out", required=True, help="output directory (new, empty, or a previous build)")
    b.add_argument("--checkpoint", help="folder holding diffusion_transformer_320p/ and context_adapter/")
    b.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights")
    b.add_argument("--calibration-prompts", type=int, default=8, help="prompts for calibration")
    b.add_argument("--check-prompts", type=int, default=2, help="held-out prompts for the check")
    b.add_argument("--until", default="verify", choices=("export", "quantize", "compile", "verify"))
    b.add_argument("--exporter", default="legacy", choices=("legacy", "dynamo"))
    b.add_argument("--remove-blocks", help="blocks to remove first: 3,7,9 or count=N or threshold=T")
    b.add_argument("--importance", help="importance.json from `neodragon-npu importance` (for count/threshold)")
    b.add_argument("--verify-each-pass", action="store_true", help="verify the graph after every pass")
    b.add_argument("--dump-dir", help="write the graph after every pass here")
    b.set_defaults(func=_cmd_build)

    e = sub.add_parser("emit", help="send a build's graphs to Qualcomm AI Hub")
    e.add_argument("build", help="a build directory (neodragon-npu build ... --all-stages or single stage)")
    e.add_argument("--hub", action="store_true", help="prepare and submit AI Hub jobs")
    e.add_argument("--target", default=DEFAULT_TARGET)
    e.add_argument("--profile", action="store_true", help="also profile on the device")
    e.add_argument("--no-link", action="store_true", help="do not link the stage graphs into shared binaries")
    e.add_argument("--dry-run", action="store_true", help="print the requests, submit nothing")
    e.set_defaults(func=_cmd_emit)

    im = sub.add_parser("importance", help="score MMDiT blocks (BI_image, BI_text) on pipeline inputs")
    im.add_argument("--config", default="tiny")
    im.add_argument("--out", required=True, help="output directory")
    im.add_argument("--prompts", type=int, default=1)
    im.add_argument("--samples-per-stage", type=int, default=4, help="calls per stage and prompt (units)")
    im.add_argument("--checkpoint", help="folder holding diffusion_transformer_320p/ and context_adapter/")
    im.add_argument("--seed", type=int, default=0)
    im.set_defaults(func=_cmd_importance)

    be = sub.add_parser("bench", help="benchmarks that print figures (fidelity)")
    be.add_argument("benchmark", help="fidelity")
    be.add_argument("--config", default="neodragon-2block")
    be.add_argument(
        "--variant", action="append",
        help="'all fixes', 'no adaLN split', '8-bit K/V', 'int8 first blocks', 'int8 blocks, no adaLN split', "
             "'int8 blocks, 8-bit K/V', 'nearest rounding' or 'float-target GPTQ'; repeatable (default: all)",
    )
    be.add_argument("--target", default=DEFAULT_TARGET)
    be.add_argument("--calibration-samples", type=int, default=8)
    be.add_argument("--check-samples", type=int, default=1)
    be.add_argument("--work-dir")
    be.set_defaults(func=_cmd_bench)

    v = sub.add_parser("verify", help="measure an all-stages build on fresh prompts (aimet simulation, CPU)")
    v.add_argument("build", help="a build directory (neodragon-npu build denoiser --all-stages)")
    v.add_argument("--prompts", type=int, default=2, help="fresh prompts (seeds 3000+)")
    v.add_argument("--first-seed", type=int, help="the first prompt's seed (default 3000; one prompt: --prompts 1)")
    v.add_argument("--calls-per-prompt", type=int, help="units per prompt (default: every unit)")
    v.add_argument("--float-chain", action="store_true", help="also chain the float partitions (the build did)")
    v.add_argument("--per-partition", action="store_true",
                   help="also measure each partition alone and the chain up to it, against the float chain")
    v.add_argument("--json", help="also write the figures to this JSON file")
    v.set_defaults(func=_cmd_verify)

    r = sub.add_parser("report", help="stage graphs before and after the stage-graph passes")
    r.add_argument("pipeline", help="pipeline name (denoiser)")
    r.add_argument("--config", default="tiny")
    r.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--target", default=DEFAULT_TARGET)
    r.add_argument("--compile", action="store_true", help="also quantize and build the context binaries")
    r.add_argument("--work-dir", help="keep the builds here (default: a temporary directory)")
    r.add_argument("--json", help="also write the figures to this JSON file")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=_cmd_report)

    a = sub.add_parser("apply", help="run a pipeline file (ordered passes) on a model")
    a.add_argument("pipeline_file", help="TOML or JSON file with [[passes]] name/options")
    a.add_argument("model", help="an .onnx file or denoiser:<config>:<stage>")
    a.add_argument("--out", required=True, help="output .onnx file")
    a.add_argument("--verify-each-pass", action="store_true")
    a.add_argument("--dump-dir")
    a.set_defaults(func=_cmd_apply)

    d = sub.add_parser("diff", help="compare two ONNX graphs")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--limit", type=int, default=20, help="rows shown per list")
    d.set_defaults(func=_cmd_diff)

    s = sub.add_parser("stats", help="graph statistics of ONNX models")
    s.add_argument("models", nargs="+")
    s.add_argument("--activation-bytes", type=int, help="price float activations at N bytes (2 for A16)")
    s.add_argument("--top-ops", type=int, default=8)
    s.set_defaults(func=_cmd_stats)

    p = sub.add_parser("passes", help="list passes")
    p.add_argument("--options", dest="verbose_options", action="store_true", help="show options")
    p.set_defaults(func=_cmd_passes)

    t = sub.add_parser("targets", help="list targets")
    t.set_defaults(func=_cmd_targets)
    return parser


class Terminated(BaseException):
    """Raised by the SIGTERM handler. It unwinds like Ctrl-C (staging directories removed,
    workers stopped) but is not a KeyboardInterrupt: under `python -m`, CPython remembers a
    KeyboardInterrupt that passed through `exec` of a string (dataclasses and torch do that
    while importing) and exits by SIGINT even after we handled it, not with our status 130."""


def _terminated(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(-1 if args.quiet else args.verbose)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return args.func(args)
    except (KeyboardInterrupt, Terminated):
        print("neodragon-npu: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user; --debug for the traceback
        if args.debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"neodragon-npu: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
