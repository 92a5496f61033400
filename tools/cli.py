"""``neodragon-npu``: build, transform, inspect and compare NPU graphs.

Only this module configures logging. Every user error ends as one line on stderr and a
non-zero exit status; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
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


def _graph_selection(args: argparse.Namespace, spec) -> tuple[tuple[str, ...], bool]:
    """The graphs asked for (``--graph``, or the model's own flag: the denoiser's ``--stage``)
    and whether as a family (``--all-graphs`` / ``--all-stages``)."""
    graphs = tuple(args.graph or ())
    family = bool(args.all_graphs)
    own, own_all = spec.graph_flags
    for flag, value in (("stage", args.stage), ("all-stages", args.all_stages)):
        if value and flag not in (own, own_all):
            raise ValueError(f"--{flag} is not an option of {spec.name}; choose its graphs with --graph / --all-graphs")
    graphs += tuple(args.stage or ())
    family = family or bool(args.all_stages)
    return graphs, family


def build_options(args: argparse.Namespace) -> "BuildOptions":
    """The command line's build options, model options included (only those given)."""
    from neodragon_npu.neodragon_models.specs import get_model
    from neodragon_npu.tools.engine.options import BuildOptions

    spec = get_model(args.model)
    graphs, family = _graph_selection(args, spec)
    high = args.high_precision or []
    high_precision, extra = (None, tuple(high))
    if "none" in high:
        if high != ["none"]:
            raise ValueError("--high-precision none keeps no weight at 16 bit: give it alone")
        high_precision, extra = (), ()
    model_options = {name: getattr(args, name) for name in _model_option_names()
                     if getattr(args, name, None) is not None}
    return BuildOptions(
        model=args.model,
        config=args.config,
        graphs=graphs,
        family=family,
        targets=tuple(_targets(args.target)),
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        seed=args.seed,
        calibration_samples=args.calibration_samples,
        check_samples=args.check_samples,
        exporter=args.exporter,
        until=args.until,
        fx_pipeline=args.pipeline,
        skip_passes=tuple(args.skip_pass or ()),
        precision=args.precision,
        kv_bits=args.kv_bits,
        weight_rounding=args.weight_rounding,
        auto_16bit_db=args.auto_16bit_db,
        high_precision=high_precision,
        extra_high_precision=extra,
        adaround_iterations=args.adaround_iterations,
        partition_budget=_parse_bytes(args.partition_budget) if args.partition_budget else None,
        partition_activations=_parse_bytes(args.partition_activations) if args.partition_activations else None,
        gptq_samples=args.gptq_samples,
        gptq_target=args.gptq_target,
        verify_htp=args.verify_htp,
        layer_report=args.layer_report,
        verify_each_pass=args.verify_each_pass,
        dump_dir=Path(args.dump_dir) if args.dump_dir else None,
        min_sqnr_db=args.min_sqnr_db,
        model_options=model_options,
        cache=not args.no_cache,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        force=args.force,
    )


def _model_option_names() -> list[str]:
    from neodragon_npu.neodragon_models.specs import MODELS

    return list(dict.fromkeys(o.name for spec in MODELS.values() for o in spec.options))


def _check_writable(path: str | None, flag: str) -> None:
    """Refuse, before any work, an output file that cannot be written: its folder missing or
    read-only, or a directory in its place."""
    if path is None:
        return
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name")
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ValueError(f"{flag} {path} cannot be written (permission denied)")


def _targets(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# what `build neodragon` takes; any other build flag given is refused by name
_BUNDLE_FLAGS = {"model", "out", "force", "config", "target", "seed", "prompts", "no_cache", "cache_dir", "verbose",
                 "quiet", "debug"}


def _cmd_build_bundle(args: argparse.Namespace, parser_defaults: dict) -> int:
    from neodragon_npu.tools.engine.bundle import build_bundle
    from neodragon_npu.tools.engine.steps import BuildCheckError

    given = [k for k, v in vars(args).items() if k in parser_defaults and k not in _BUNDLE_FLAGS
             and v != parser_defaults[k]]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} does not apply to `build neodragon` (it builds every graph "
                         f"with each model's own options)")
    try:
        result = build_bundle(args.config or "neodragon", tuple(_targets(args.target)), args.out, seed=args.seed,
                              calibration_prompts=args.prompts, cache=not args.no_cache, cache_dir=args.cache_dir,
                              force=args.force)
    except BuildCheckError as exc:
        print(f"neodragon-npu: check failed: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    print((Path(args.out) / "report.txt").read_text(), end="")
    print(f"bundle written to {args.out} ({result.seconds:.0f} s, peak RSS {result.peak_rss_bytes / 1e9:.2f} GB)")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from neodragon_npu.tools.engine.build import build
    from neodragon_npu.tools.engine.steps import BuildCheckError

    if args.model == "neodragon":
        return _cmd_build_bundle(args, args.build_defaults)
    if args.prompts is not None:
        raise ValueError("--prompts applies to `build neodragon` (the bundle), not to one model's build")
    opts = build_options(args)
    out = Path(args.out).absolute()
    try:
        result = build(opts, args.out)  # messages name the directory as the user typed it
    except BuildCheckError as exc:
        print(f"neodragon-npu: check failed: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    print((out / "report.txt").read_text(), end="")
    print(f"build written to {args.out}")
    sqnr = getattr(result, "sqnr_db", None)
    if isinstance(sqnr, float):
        print(f"{result.manifest['verification']['device']} vs fp32: {sqnr:.2f} dB SQNR")
    return 0


def _cmd_emit(args: argparse.Namespace) -> int:
    from neodragon_npu.tools.engine.hub import plan_hub_jobs, submit_hub_jobs

    if not args.hub:
        raise ValueError("emit needs a destination: --hub (Qualcomm AI Hub)")
    targets = _targets(args.target)
    if not targets or len(set(targets)) != len(targets):
        raise ValueError(f"--target {args.target}: give each target once, as a comma list")
    requests = [r for t in targets for r in plan_hub_jobs(args.build, t, profile=args.profile, link=not args.no_link)]
    for r in requests:
        print(f"  {r.describe()}")
    if args.dry_run:
        print(f"{len(requests)} request(s) prepared; --dry-run: nothing submitted")
        return 0
    jobs = submit_hub_jobs(requests)
    print(f"submitted {len(jobs)} job(s): {', '.join(jobs)}")
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
        force=args.force,
    )
    print(data["table"])
    print(f"least important first: {data['ranking_least_important_first']}")
    print(f"{data['samples_per_stage']} samples per stage in {data['seconds']} s, peak RSS {data['peak_rss_bytes'] / 1e9:.2f} GB")
    print(f"wrote {Path(args.out) / 'importance.json'}, bi_image.png, bi_text.png")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from neodragon_npu.tools.engine.bench import fidelity_benchmark, format_fidelity

    if args.benchmark == "rebuild":
        from neodragon_npu.tools.engine.bench import format_rebuild, rebuild_benchmark

        config = args.config if args.config != "neodragon-2block" else "tiny"
        print(format_rebuild(args.model, config, rebuild_benchmark(args.model, config, args.work_dir)))
        return 0
    if args.benchmark == "htp-activation":
        from neodragon_npu.tools.engine.bench_activation import activation_benchmark, format_activation

        c, h, w = args.channels, args.height, args.width
        result = activation_benchmark(c, h, w, target=args.target, run=not args.compile_only, work_dir=args.work_dir)
        print(format_activation(c, h, w, args.target, result))
        return 0
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

    _check_writable(args.json, "--json")
    build, manifest = read_build(args.build)
    result = verify_build(build, prompts=args.prompts, calls_per_prompt=args.calls_per_prompt,
                          float_chain=args.float_chain, per_partition=args.per_partition, first_seed=args.first_seed,
                          htp_partition=args.htp_partition)
    print(format_verify(build, manifest, result), end="")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(result.as_json(), indent=1) + "\n")
    return 0


def _cmd_verify_stream(args: argparse.Namespace) -> int:
    from neodragon_npu.tools.engine.stream_check import check_stream, format_stream

    _check_writable(args.json, "--json")
    result = check_stream(args.first, args.next, videos=args.videos, first_seed=args.first_seed,
                          runtime=args.runtime)
    print(format_stream(result), end="")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(result.as_json(), indent=1) + "\n")
    return 0


def _cmd_first_frame(args: argparse.Namespace) -> int:
    from neodragon_npu.tools.engine.first_frame import first_frame, format_first_frame, write_json

    _check_writable(args.json, "--json")
    _check_writable(args.out, "-o")
    result = first_frame(args.prompt, args.unet, args.decoder, args.out, runtime=args.runtime, seed=args.seed)
    print(format_first_frame(result), end="")
    if args.json:
        write_json(result, args.json)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from neodragon_npu.tools.engine.generate import format_generate, generate, write_json

    _check_writable(args.json, "--json")
    _check_writable(args.out, "-o")
    result = generate(args.prompt, args.bundle, args.out, runtime=args.runtime, target=args.target, seed=args.seed,
                      compare_float=args.compare_float, arch=args.htp_arch)
    print(format_generate(result), end="")
    if args.json:
        write_json(result, args.json)
    return 0


def _cmd_validate_bundle(args: argparse.Namespace) -> int:
    from neodragon_npu.tools.runtime.bundle import open_bundle

    bundle = open_bundle(args.bundle, target=args.target, runtime=args.runtime)
    graphs = bundle.manifest["graphs"]
    print(f"{args.bundle}: a valid {bundle.manifest['format']} bundle ({bundle.manifest['system']['name']} system, "
          f"{len(graphs)} graphs, targets {', '.join(t['name'] for t in bundle.manifest['targets'])}); every file "
          f"the {args.runtime} runtime loads is present")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from neodragon_npu.tools.engine.stage_report import format_stage_report, report_json, stage_report

    _check_writable(args.json, "--json")
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
        if args.explain:
            for note in r.notes:
                print(f"    {note}")
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
            defaults = pass_options(cls)
            for opt, spec in cls.OPTIONS.items():
                default = defaults[opt]
                shown = "required" if default is inspect.Parameter.empty else f"default {default!r}"
                print(f"{'':<4}{opt} ({spec.describe()}; {shown}): {spec.help}")
            for opt in cls.ENGINE_OPTIONS:
                print(f"{'':<4}{opt} (set by the build engine)")
    return 0


def _cmd_compare_builds(args: argparse.Namespace) -> int:
    from neodragon_npu.tools.engine.compare import compare_builds

    differences, report = compare_builds(args.a, args.b)
    print(report)
    return 0 if not differences else 1


def _cmd_cache(args: argparse.Namespace) -> int:
    from neodragon_npu.tools.engine import cache

    root = Path(args.path)
    if not cache.is_cache(root) and cache.is_cache(cache.default_cache_dir(root)):
        root = cache.default_cache_dir(root)
    if not cache.is_cache(root):
        raise ValueError(f"{args.path} is neither a step cache nor a build directory with one beside it")
    if args.action == "info":
        print(cache.describe(root))
    else:
        print(f"removed {cache.clean(root) / 1e9:.2f} GB from {root}")
    return 0


def _cmd_targets(_args: argparse.Namespace) -> int:
    for t in TARGETS.values():
        print(f"{t.name:<10} {t.description:<56} soc_model {t.soc_model:<3} htp v{t.htp_arch}")
    return 0


def _runtime_flag(p: argparse.ArgumentParser, lead: str = "") -> None:
    p.add_argument("--runtime", choices=("htp", "cpu-qdq"), default="htp",
                   help=f"{lead}the HTP through the QNN EP (here its x86 simulator, from the context binaries), or the "
                        f"deployed QDQ / FP16 graphs on the CPU")


def _add_build(command) -> None:
    from neodragon_npu.neodragon_models.specs import MODELS

    models = "; ".join(f"{name}: {spec.summary}" for name, spec in MODELS.items())
    b = command("build", "neodragon-npu build quicksrnet --config small -o build/sr",
                help="build a model's graphs into verified context binaries", description=f"Models: {models}.")
    b.add_argument("model", help=f"model ({', '.join(MODELS)}), or neodragon: every graph of the system in one "
                                 f"bundle (--config neodragon or tiny)")
    b.add_argument("-o", "--out", required=True, help="output directory (new, empty, or a previous build)")
    b.add_argument("--force", action="store_true", help="write into a directory that holds no build of this tool "
                   "(files it did not write are kept)")
    b.add_argument("--config", help="model config (default: the model's; e.g. tiny, neodragon, small, large)")
    b.add_argument("--target", default=DEFAULT_TARGET, help=f"target SoCs, a comma list ({', '.join(TARGETS)}; "
                   f"default {DEFAULT_TARGET})")
    g = b.add_argument_group("graphs (a single graph, or a family of graphs sharing weights)")
    g.add_argument("--graph", action="append", help="a graph by name or key (default: the model's main graph)")
    g.add_argument("--all-graphs", action="store_true", help="every graph as a family: partitioned, shared weights")
    g.add_argument("--stage", action="append", help="denoiser: a pyramid stage (0, 1, 2; default 2); repeatable")
    g.add_argument("--all-stages", action="store_true", help="denoiser: the three stage graphs as a family")
    b.add_argument("--checkpoint", help="the released weights (denoiser: a folder holding "
                   "diffusion_transformer_320p/ and context_adapter/; quicksrnet: the zoo's .pth.tar)")
    b.add_argument("--seed", type=_at_least(0), default=0, help="seed of the synthetic weights (default 0)")
    b.add_argument("--calibration-samples", type=_at_least(1), help="calibration samples per graph (default: the "
                   "model's)")
    b.add_argument("--check-samples", type=_at_least(1), help="held-out check samples per graph (default: the model's)")
    b.add_argument("--until", default="verify", choices=("export", "quantize", "compile", "verify"),
                   help="stop after this step (default verify)")
    b.add_argument("--exporter", choices=("legacy", "dynamo"),
                   help="ONNX exporter (default: the model's)")
    b.add_argument("--pipeline", default="optimized", help="named pass pipeline: optimized (default), or the "
                   "denoiser's baseline (static shapes only)")
    b.add_argument("--skip-pass", action="append", help="leave a pass out (ablation); repeatable")
    q = b.add_argument_group("precision")
    q.add_argument("--precision", choices=("w8a16", "fp16"), help="default: the model's (w8a16 for these models)")
    q.add_argument("--kv-bits", type=int, choices=(8, 16), help="bits of K and V in attention (default 16)")
    q.add_argument("--weight-rounding", choices=("gptq", "adaround", "nearest"),
                   help="int8 weight rounding (default: the model's; denoiser gptq, quicksrnet adaround)")
    q.add_argument("--adaround-iterations", type=_at_least(1), help="AdaRound optimizer steps per layer (default 10000)")
    q.add_argument("--high-precision", action="append", metavar="PATTERN",
                   help="fnmatch pattern of a node's name, a weight's name or the module path the node was "
                   "exported from (e.g. 'unet.*attn2.to_*'), whose weights stay 16-bit, added to the model's "
                   "(passes/pipelines.py); a pattern that picks no weight is refused; 'none' keeps no weight "
                   "at 16 bit")
    q.add_argument("--auto-16bit", dest="auto_16bit_db", type=float, metavar="DB",
                   help="also keep at 16 bit the fewest weights, chosen by their measured int8 noise, that "
                   "bring the int8 rest's predicted SQNR to DB (default: the model's; 0 turns it off)")
    b.add_argument("--verify-htp", action=argparse.BooleanOptionalAction, default=None,
                   help="check the binaries in the HTP simulator; --no-verify-htp checks the deployed graph on the "
                   "CPU instead (default: single graphs, and families of small models)")
    f = b.add_argument_group("family builds (--all-graphs / --all-stages)")
    f.add_argument("--partition-budget", help="fp32 weight bytes per partition (default 768M)")
    f.add_argument("--partition-activations",
                   help="bytes the ops of one partition write per call, at 16 bit (default 3G)")
    f.add_argument("--gptq-samples", type=_at_least(1), help="calibration calls per graph feeding GPTQ (default 2)")
    f.add_argument("--gptq-target", choices=("quantized", "float"),
                   help="GPTQ aims at the float weights on the quantized chain's inputs (quantized, default) "
                   "or at the float chain's layer outputs (float)")
    f.add_argument("--layer-report", action=argparse.BooleanOptionalAction, default=None,
                   help="the per-layer SQNR report (default: small models only)")
    m = b.add_argument_group("model options")
    seen = set()
    for spec in MODELS.values():
        for option in spec.options:
            if option.name in seen:
                continue
            seen.add(option.name)
            m.add_argument(f"--{option.name.replace('_', '-')}", dest=option.name, type=option.type,
                           help=f"{spec.name}: {option.help}")
    b.add_argument("--min-sqnr-db", type=float, help="fail the build below this SQNR (default: the model's)")
    b.add_argument("--verify-each-pass", action="store_true", help="verify the graph after every pass")
    b.add_argument("--dump-dir", help="write the graph after every pass here")
    k = b.add_argument_group("step cache (each step's outputs, reused when nothing they depend on changed)")
    k.add_argument("--cache-dir", help="where (default: OUT.cache beside the output directory)")
    k.add_argument("--no-cache", action="store_true", help="run every step and keep nothing for later builds")
    n = b.add_argument_group("the whole system (build neodragon)")
    n.add_argument("--prompts", type=_at_least(1), help="calibration prompts the float pipeline runs (default: the "
                   "system's)")
    b.set_defaults(func=_cmd_build)
    b.set_defaults(build_defaults={a.dest: a.default for a in b._actions if a.dest not in ("help",)})


class _Formatter(argparse.HelpFormatter):
    """Shows each option's default, unless its help already names it or it has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default in (None, False, argparse.SUPPRESS) or action.required
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def _at_least(minimum: int):
    """An argparse type: a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    parse.__name__ = f"whole number >= {minimum}"
    return parse


def _global_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """-v, -q and --debug, on the main parser and (so they work after the subcommand too)
    on every subcommand; a subcommand leaves them as the main parser set them unless given."""
    keep = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("-v", "--verbose", action="count", help="more log output", **({"default": 0} if top else keep))
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results", **keep)
    parser.add_argument("--debug", action="store_true", help="show the full error and traceback on errors", **keep)


class UsageError(ValueError):
    """A command line argparse refused (unknown flag, bad choice, missing argument)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a refused command line is one line, not usage text and an exit."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} -h)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="neodragon-npu",
        description="Compile Neodragon PyTorch modules into verified Hexagon NPU binaries.",
        formatter_class=_Formatter,
        epilog="example: neodragon-npu build quicksrnet --config small -o build/sr",
    )
    _global_flags(parser, top=True)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, example: str, **kwargs) -> argparse.ArgumentParser:
        p = sub.add_parser(name, formatter_class=_Formatter, epilog=f"example: {example}", **kwargs)
        _global_flags(p, top=False)
        return p

    _add_build(command)

    e = command("emit", "neodragon-npu emit build/stages --hub --target sm8750,x-elite --dry-run",
                help="send a build's graphs to Qualcomm AI Hub")
    e.add_argument("build", help="a build directory")
    e.add_argument("--hub", action="store_true", help="prepare and submit AI Hub jobs")
    e.add_argument("--target", default=DEFAULT_TARGET, help=f"target SoCs, a comma list ({', '.join(TARGETS)})")
    e.add_argument("--profile", action="store_true", help="also profile on the device")
    e.add_argument("--no-link", action="store_true", help="do not link a family's graphs into shared binaries")
    e.add_argument("--dry-run", action="store_true", help="print the requests, submit nothing")
    e.set_defaults(func=_cmd_emit)

    im = command("importance", "neodragon-npu importance --config tiny -o build/importance",
                 help="score MMDiT blocks (BI_image, BI_text) on pipeline inputs")
    im.add_argument("--config", default="tiny", help="denoiser config")
    im.add_argument("-o", "--out", required=True, help="output directory (new, empty, or a previous importance run)")
    im.add_argument("--prompts", type=_at_least(1), default=1, help="prompts scored")
    im.add_argument("--samples-per-stage", type=_at_least(1), default=4, help="calls per stage and prompt (units)")
    im.add_argument("--checkpoint", help="folder holding diffusion_transformer_320p/ and context_adapter/")
    im.add_argument("--seed", type=_at_least(0), default=0, help="seed of the synthetic weights")
    im.add_argument("--force", action="store_true", help="write into a directory that holds no importance run "
                    "(files this tool did not write are kept)")
    im.set_defaults(func=_cmd_importance)

    be = command("bench", "neodragon-npu bench rebuild --config tiny",
                 help="benchmarks that print figures (fidelity, rebuild, htp-activation)")
    be.add_argument("benchmark", choices=("fidelity", "rebuild", "htp-activation"),
                    help="fidelity: SQNR with each fix left out; rebuild: an unchanged second build; "
                         "htp-activation: whether one large 16-bit activation compiles and runs on the HTP")
    be.add_argument("--config", default="neodragon-2block", help="default neodragon-2block (fidelity), tiny (rebuild)")
    be.add_argument("--model", default="denoiser", help="rebuild: the model")
    be.add_argument(
        "--variant", action="append",
        help="'all fixes', 'no adaLN split', '8-bit K/V', 'int8 first blocks', 'int8 blocks, no adaLN split', "
             "'int8 blocks, 8-bit K/V', 'nearest rounding' or 'float-target GPTQ'; repeatable (default: all)",
    )
    be.add_argument("--target", default=DEFAULT_TARGET, help="target SoC")
    be.add_argument("--calibration-samples", type=_at_least(1), default=8, help="calibration samples per graph")
    be.add_argument("--check-samples", type=_at_least(1), default=1, help="check samples per graph")
    be.add_argument("--work-dir", help="keep the builds here (default: a temporary directory)")
    be.add_argument("--channels", type=_at_least(1), default=256,
                    help="htp-activation: channels of the large activation (default 256, the SDXL VAE decoder's)")
    be.add_argument("--height", type=_at_least(1), default=640, help="htp-activation: height (default 640)")
    be.add_argument("--width", type=_at_least(1), default=1024, help="htp-activation: width (default 1024)")
    be.add_argument("--compile-only", action="store_true", help="htp-activation: compile, do not run")
    be.set_defaults(func=_cmd_bench)

    v = command("verify", "neodragon-npu verify build/stages --prompts 2 --json verify.json",
                help="measure a family build on fresh samples (aimet simulation, CPU)")
    v.add_argument("build", help="a family build directory (build ... --all-stages / --all-graphs)")
    v.add_argument("--prompts", type=_at_least(1), default=2, help="fresh prompts (denoiser) or samples, seeds 3000+")
    v.add_argument("--first-seed", type=_at_least(0), help="the first prompt's seed (default 3000; one prompt: "
                   "--prompts 1)")
    v.add_argument("--calls-per-prompt", type=_at_least(1), help="units per prompt (default: every unit)")
    v.add_argument("--float-chain", action="store_true", help="also chain the float partitions (the build did)")
    v.add_argument("--per-partition", action="store_true",
                   help="also measure each partition alone and the chain up to it, against the float chain")
    v.add_argument("--htp-partition", type=_at_least(0), metavar="K",
                   help="also compile partition K (from 0) for the build's first target and run it in the HTP "
                        "simulator beside its QDQ graph (implies --per-partition)")
    v.add_argument("--json", help="also write the figures to this JSON file")
    v.set_defaults(func=_cmd_verify)

    vs = command("verify-stream", "neodragon-npu verify-stream build/dec-first build/dec-next --videos 2",
                 help="decode videos through a streaming decoder's compiled graphs, state handed on")
    vs.add_argument("first", help="a vae-decoder build of the first graph (--graph first)")
    vs.add_argument("next", help="a vae-decoder build of the next graph (--graph next), same model and target")
    vs.add_argument("--videos", type=_at_least(1), default=1, help="synthetic latent videos (seeds 3000+)")
    vs.add_argument("--first-seed", type=_at_least(0), default=3000, help="the first video's seed")
    _runtime_flag(vs)
    vs.add_argument("--json", help="also write the figures to this JSON file")
    vs.set_defaults(func=_cmd_verify_stream)

    ff = command("first-frame", 'neodragon-npu first-frame "a red fox" --unet build/unet --decoder build/vae -o fox.png',
                 help="SSD-1B's first frame through compiled UNet and decoder builds, the float loop beside it")
    ff.add_argument("prompt", help="the prompt (no tokenizer here: it picks seeded synthetic token ids)")
    ff.add_argument("--unet", required=True, help="an ssd1b-unet build")
    ff.add_argument("--decoder", required=True, help="an ssd1b-vae-decoder build of the same model and target")
    ff.add_argument("-o", "--out", required=True, help="the PNG to write (the float loop's goes beside it, -float)")
    _runtime_flag(ff)
    ff.add_argument("--seed", type=_at_least(0), help="the noise seed (default: from the prompt)")
    ff.add_argument("--json", help="also write the figures to this JSON file")
    ff.set_defaults(func=_cmd_first_frame)

    gen = command("generate", 'neodragon-npu generate "a red fox in the snow" --bundle build/bundle -o fox.mp4',
                  help="a prompt to a video through a bundle's graphs (onnxruntime and numpy)")
    gen.add_argument("prompt", help="the prompt (the released modifier is appended)")
    gen.add_argument("--bundle", required=True, help="a bundle (build neodragon)")
    gen.add_argument("-o", "--out", required=True, help="the video to write (.mp4; a .gif where there is no ffmpeg); "
                     "the contact sheet and first frame go beside it")
    _runtime_flag(gen)
    gen.add_argument("--target", help="which of the bundle's targets (default: its first)")
    gen.add_argument("--htp-arch", type=_at_least(1), help="the device's HTP arch (e.g. 79): a bundle built for "
                     "another is refused")
    gen.add_argument("--seed", type=_at_least(0), help="the noise seed (default: from the prompt)")
    gen.add_argument("--compare-float", action="store_true",
                     help="also run the float pipeline; write its video and the PSNR of every frame")
    gen.add_argument("--json", help="also write the figures to this JSON file")
    gen.set_defaults(func=_cmd_generate)

    vb = command("validate-bundle", "neodragon-npu validate-bundle build/bundle",
                 help="check a bundle's manifest against its schema and its files")
    vb.add_argument("bundle", help="a bundle directory")
    vb.add_argument("--target", help="the target to check for (default: the bundle's first)")
    _runtime_flag(vb, "the runtime whose files to check: ")
    vb.set_defaults(func=_cmd_validate_bundle)

    r = command("report", "neodragon-npu report denoiser --config tiny --stages 0 2",
                help="stage graphs before and after the stage-graph passes")
    r.add_argument("pipeline", choices=("denoiser",), help="pipeline name")
    r.add_argument("--config", default="tiny", help="denoiser config")
    r.add_argument("--stages", type=_at_least(0), nargs="+", default=[0, 1, 2], help="pyramid stages")
    r.add_argument("--target", default=DEFAULT_TARGET, help="target SoC")
    r.add_argument("--compile", action="store_true", help="also quantize and build the context binaries")
    r.add_argument("--work-dir", help="keep the builds here (default: a temporary directory)")
    r.add_argument("--json", help="also write the figures to this JSON file")
    r.add_argument("--seed", type=_at_least(0), default=0, help="seed of the synthetic weights")
    r.set_defaults(func=_cmd_report)

    a = command("apply", "neodragon-npu apply my.toml denoiser:tiny:2 -o a.onnx --explain",
                help="run a pipeline file (ordered passes) on a model")
    a.add_argument("pipeline_file", help="TOML or JSON file with [[passes]] name/options (see passes --options)")
    a.add_argument("model", help="an .onnx file or <model>:<config>:<graph> (e.g. denoiser:tiny:2, quicksrnet:small:x2)")
    a.add_argument("-o", "--out", required=True, help="output .onnx file")
    a.add_argument("--explain", action="store_true", help="say why each pass left each site alone")
    a.add_argument("--verify-each-pass", action="store_true", help="verify the graph after every pass")
    a.add_argument("--dump-dir", help="write the graph after every pass here")
    a.set_defaults(func=_cmd_apply)

    d = command("diff", "neodragon-npu diff before.onnx after.onnx", help="compare two ONNX graphs")
    d.add_argument("a", help="an .onnx file")
    d.add_argument("b", help="an .onnx file")
    d.add_argument("--limit", type=_at_least(1), default=20, help="rows shown per list")
    d.set_defaults(func=_cmd_diff)

    s = command("stats", "neodragon-npu stats build/sr/*.onnx --activation-bytes 2",
                help="graph statistics of ONNX models")
    s.add_argument("models", nargs="+", help=".onnx files")
    s.add_argument("--activation-bytes", type=int, choices=(1, 2, 4),
                   help="price float activations at N bytes (2 for A16)")
    s.add_argument("--top-ops", type=_at_least(1), default=8, help="op types listed")
    s.set_defaults(func=_cmd_stats)

    p = command("passes", "neodragon-npu passes --options", help="list the passes a pipeline file or apply can name")
    p.add_argument("--options", dest="verbose_options", action="store_true",
                   help="show each pass's options: type, range, default and meaning")
    p.set_defaults(func=_cmd_passes)

    t = command("targets", "neodragon-npu targets", help="list targets")
    t.set_defaults(func=_cmd_targets)

    ca = command("cache", "neodragon-npu cache clean build/sr", help="size of a build's step cache, or empty it")
    ca.add_argument("action", choices=("info", "clean"), help="info: sizes per step; clean: remove every entry")
    ca.add_argument("path", help="the cache directory, or the build directory it belongs to (OUT for OUT.cache)")
    ca.set_defaults(func=_cmd_cache)

    c = command("compare-builds", "neodragon-npu compare-builds build/a build/b",
                help="compare two build directories file by file, timings aside")
    c.add_argument("a", help="a build directory")
    c.add_argument("b", help="a build directory")
    c.set_defaults(func=_cmd_compare_builds)
    return parser


class Terminated(BaseException):
    """Raised by the SIGTERM handler. It unwinds like Ctrl-C (staging directories removed,
    workers stopped) but is not a KeyboardInterrupt: under `python -m`, CPython remembers a
    KeyboardInterrupt that passed through `exec` of a string (dataclasses and torch do that
    while importing) and exits by SIGINT even after we handled it, not with our status 130."""


_STAGING = re.compile(r"\.(?P<name>[^/\s'\"]+)\.(?:partial|old)-\d+(?:-[A-Za-z0-9_]+)?")
# Our own errors (these types, and every exception class of this package) say what was wrong
# and how to fix it; anything else is a library's, whose first line may not.
_OURS = (ValueError, LookupError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)


def user_message(exc: BaseException) -> tuple[str, bool]:
    """The one line a user sees for ``exc``, and whether more of it is hidden (shown with
    --debug): the rest of a multi-line message, the error it came from, or the traceback of
    a library's error. A hidden staging directory is named as the output it becomes."""
    text = str(exc).strip() or type(exc).__name__
    first, _, rest = text.partition("\n")
    ours = isinstance(exc, _OURS) or type(exc).__module__.startswith("neodragon_npu.")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" while writing {exc.filename}" if exc.filename else ""
        first, ours = (f"the disk is full{where}; free some space or choose another -o / --cache-dir "
                       "(a rerun resumes from the finished steps in the cache)"), True
    elif not ours and not first.startswith(type(exc).__name__):
        first = f"{type(exc).__name__}: {first}"
    notes = [n for n in getattr(exc, "__notes__", ()) if "\n" not in n]
    if notes:
        first += " " + " ".join(notes)
    first = _STAGING.sub(lambda m: m.group("name"), first)
    chained = exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__)
    return first, bool(rest.strip()) or chained or not ours


def _terminated(signum, frame):
    raise Terminated


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("neodragon-npu")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"neodragon-npu: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
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
        message, hidden = user_message(exc)
        print(f"neodragon-npu: error: {message}", file=sys.stderr)
        if hidden:
            print("neodragon-npu: (run again with --debug for the full error and traceback)", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
