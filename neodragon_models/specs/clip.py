"""CLIP-L and CLIP-G text encoders (``text_encoder``, ``text_encoder_2``) as specs: one FP16
graph each, token ids and the end-token one-hot -> projected pooled embedding and the
penultimate layer's hidden states.

One graph serves both pipelines: the video pipeline reads ``text_embeds``, SSD-1B's first
frame reads ``penultimate_hidden_states`` (SDXL's ``hidden_states[-2]``). The second output
costs one [1, 77, D] FP16 write and no extra compute (it is a value the graph computes
anyway), where a second graph would store the weights twice. If the released SSD-1B text
encoders differ from ``text_encoder(_2)``, build this spec once per folder
(``--checkpoint``).

The tokenizer stays on the host. The released tokenizer files are not here, so the samples
are synthetic token ids (seeded, no tokenizer): BOS, random ids, the end token, then the end
token again as padding (as CLIP-L's tokenizer pads), and the one-hot of the end position the
host feeds for pooling.
"""

from __future__ import annotations

import numpy as np
import torch

from neodragon_npu.neodragon_models.clip import (
    CLIP_CONFIGS, CLIPTextModelWithProjection, build_clip, count_parameters, end_onehot, get_clip_config,
    released_shapes,
)
from neodragon_npu.neodragon_models.spec import (
    GraphSpec, LoadOptions, ModelSpec, SamplePlan, Samples, Tracing, fp32_weight_bytes, load_description, meta_shapes,
)
from neodragon_npu.passes import pipelines
from neodragon_npu.passes.onnx.hoist_token_position import HoistTokenPositionPass

CALIBRATION, CHECK = 8, 4  # prompts
OUTPUTS = ("text_embeds", "penultimate_hidden_states")


def synthetic_token_ids(count: int, config, seed: int) -> np.ndarray:
    """Seeded stand-ins for tokenized prompts, no tokenizer: [count, L] int64 rows of BOS,
    random word ids of random length, the end token, and end-token padding."""
    rng = np.random.default_rng(seed)
    length, end = config.max_position_embeddings, config.end_token
    ids = np.full((count, length), end, dtype=np.int64)
    ids[:, 0] = config.bos_token_id
    for i in range(count):
        n = int(rng.integers(3, length - 1))  # words, then the end token
        ids[i, 1:n] = rng.integers(0, min(config.bos_token_id, end), n - 1)
    return ids


class _TokensToOutputs(torch.nn.Module):
    """The encoder as transformers runs it (pooling position from the ids); the ONNX pass
    ``hoist_token_position`` turns that position into the host's one-hot input."""

    def __init__(self, model: CLIPTextModelWithProjection) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        return self.model(input_ids)


def _example(model) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.from_numpy(synthetic_token_ids(1, model.config, 0))}


def _graphs(config: str) -> list[GraphSpec]:
    return [GraphSpec(
        name="encoder", module=_TokensToOutputs, example_inputs=_example,
        input_names=("input_ids",), output_names=OUTPUTS,
        fx_passes=lambda model, target, pipeline: pipelines.cleanup_fx(),
        # the end-token position becomes the host's one-hot: no ArgMax or data-dependent Gather
        onnx_passes=lambda pipeline: [*pipelines.encoder_onnx(), HoistTokenPositionPass(input_name="end_onehot")],
        tracing=Tracing(method="export"),
    )]


def _feeds(ids: np.ndarray, config) -> list[dict]:
    onehot = end_onehot(ids, config)
    return [{"input_ids": i[None], "end_onehot": o[None]} for i, o in zip(ids, onehot)]


def _samples(model, graphs, plan: SamplePlan) -> Samples:
    cfg = model.config
    calib = synthetic_token_ids(plan.calibration or CALIBRATION, cfg, 1000)
    ids = synthetic_token_ids(plan.check or CHECK, cfg, plan.first_check_seed)
    with torch.no_grad():
        embeds, hidden = (t.numpy() for t in model(torch.from_numpy(ids)))
    check = [feed | {"text_embeds_fp32": e[None], "penultimate_hidden_states_fp32": h[None]}
             for feed, e, h in zip(_feeds(ids, cfg), embeds, hidden)]
    return Samples(calibration={"encoder": _feeds(calib, cfg)}, check={"encoder": check},
                   check_labels={"encoder": [f"synthetic prompt {j}" for j in range(len(ids))]})


def _spec(variant: str, summary: str, folder: str) -> ModelSpec:
    def weight_shapes(opts: LoadOptions) -> dict[str, tuple[int, ...]]:
        if opts.checkpoint is not None:  # the folder's config and headers, matched to the modules
            return released_shapes(opts.checkpoint)
        with torch.device("meta"):
            return meta_shapes(CLIPTextModelWithProjection(get_clip_config(variant, opts.config)))

    return ModelSpec(
        name=variant,
        summary=summary,
        configs=lambda: tuple(CLIP_CONFIGS[variant]), default_config="tiny",
        load=lambda o: build_clip(get_clip_config(variant, o.config), checkpoint=o.checkpoint, seed=o.seed),
        graphs=_graphs, samples=_samples,
        precision=lambda options: pipelines.FP16(),
        describe=lambda model, o: load_description(o, params=count_parameters(model.config),
                                                   samples="synthetic token ids (no tokenizer)",
                                                   host_inputs={"end_onehot": "1 at each row's end-of-text token"}),
        weight_bytes=fp32_weight_bytes,
        min_sqnr_db=45.0,
        checkpoint_help=f"the released {folder} folder (config.json + safetensors)",
        reference_note=f"fp32 PyTorch {variant.upper()} text encoder",
        weight_shapes=weight_shapes,
    )


CLIP_L_SPEC = _spec("clip-l", "CLIP-L text encoder with projection: one FP16 graph (pooled + penultimate states)",
                    "text_encoder")
CLIP_G_SPEC = _spec("clip-g", "CLIP-G text encoder with projection: one FP16 graph (pooled + penultimate states)",
                    "text_encoder_2")
