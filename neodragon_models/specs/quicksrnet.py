"""QuickSRNet 2x as a spec: one W8A16 graph, 320x512 -> 640x1024, AdaRound weights."""

from __future__ import annotations

import torch

from neodragon_npu.neodragon_models.quicksrnet import (
    QUICKSRNET_CONFIGS, QuickSRNet, build_quicksrnet, count_parameters, get_quicksrnet_config, read_checkpoint,
    synthetic_frames,
)
from neodragon_npu.neodragon_models.spec import (
    GraphSpec, LoadOptions, ModelSpec, SamplePlan, Samples, fp32_weight_bytes, load_description, meta_shapes,
)
from neodragon_npu.neodragon_models.weights import check_shapes
from neodragon_npu.passes import pipelines

CALIBRATION, CHECK = 16, 4  # frames


def _graphs(config: str) -> list[GraphSpec]:
    return [GraphSpec(
        name="x2", module=lambda model: model,
        example_inputs=lambda model: {"frame": synthetic_frames(1, model.config.height, model.config.width, 0)},
        input_names=("frame",), output_names=("upscaled",),
        fx_passes=lambda model, target, pipeline: pipelines.cleanup_fx(),
        onnx_passes=lambda pipeline: pipelines.cleanup_onnx(),
        expected_qnn_ops={"DepthToSpace": 1},  # PixelShuffle as one op, no reshape/transpose pair
    )]


def _samples(model, graphs, plan: SamplePlan) -> Samples:
    """Calibration frames (seed 1000) and check frames (from the plan's check seed) with
    the float model's output as the reference."""
    h, w = model.config.height, model.config.width
    calib = synthetic_frames(plan.calibration or CALIBRATION, h, w, seed=1000).numpy()
    frames = synthetic_frames(plan.check or CHECK, h, w, seed=plan.first_check_seed)
    check, refs = frames.numpy(), model(frames).numpy()
    return Samples(
        calibration={"x2": [{"frame": f[None]} for f in calib]},
        check={"x2": [{"frame": f[None], "upscaled_fp32": r[None]} for f, r in zip(check, refs)]},
        check_labels={"x2": [f"frame {i}" for i in range(len(check))]},
    )


def _weight_shapes(opts: LoadOptions) -> dict[str, tuple[int, ...]]:
    """The model's weights (meta device); a checkpoint is read (it is small) and matched."""
    with torch.device("meta"):
        shapes = meta_shapes(QuickSRNet(get_quicksrnet_config(opts.config)))
    if opts.checkpoint is not None:
        state = read_checkpoint(opts.checkpoint)
        check_shapes(shapes, {k: tuple(v.shape) for k, v in state.items()}, str(opts.checkpoint))
    return shapes


QUICKSRNET = ModelSpec(
    name="quicksrnet",
    summary="QuickSRNet 2x super-resolution (small / medium / large): W8A16 with AdaRound",
    configs=lambda: tuple(QUICKSRNET_CONFIGS), default_config="small",
    load=lambda o: build_quicksrnet(get_quicksrnet_config(o.config), checkpoint=o.checkpoint, seed=o.seed),
    graphs=_graphs, samples=_samples,
    # AdaRound learns each layer's rounding on 48x48 crops: a conv sees local statistics only
    precision=lambda options: pipelines.W8A16(rounding="adaround", adaround_crop=(48, 48)),
    describe=lambda model, o: load_description(o, params=count_parameters(model.config)),
    weight_bytes=fp32_weight_bytes,
    min_sqnr_db=40.0,
    checkpoint_help="aimet-model-zoo's quicksrnet_<variant>_2x_checkpoint_float32.pth.tar",
    reference_note="fp32 PyTorch QuickSRNet",
    weight_shapes=_weight_shapes,
)
