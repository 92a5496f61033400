"""DT5 (``text_encoder_3``) as a spec: one FP16 graph, token ids and mask -> prompt embeddings.

The tokenizer stays on the host. The released tokenizer files are not here, so the samples
are synthetic token ids (seeded, no tokenizer): random ids, an EOS (1), then padding (0) to
the fixed length, with the mask the tokenizer would give.
"""

from __future__ import annotations

import numpy as np
import torch

from neodragon_npu.neodragon_models.dt5 import DT5, DT5_CONFIGS, build_dt5, count_parameters, get_dt5_config
from neodragon_npu.neodragon_models.spec import (
    GraphSpec, LoadOptions, ModelSpec, SamplePlan, Samples, Tracing, fp32_weight_bytes, load_description, meta_shapes,
)
from neodragon_npu.passes import pipelines

CALIBRATION, CHECK = 8, 4  # prompts
EOS, PAD = 1, 0


def synthetic_token_ids(count: int, vocab: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stand-ins for tokenized prompts, no tokenizer: ``count`` rows of random ids of
    random length, then EOS and padding; and their masks. int64 [count, length] each."""
    rng = np.random.default_rng(seed)
    ids = np.full((count, length), PAD, dtype=np.int64)
    mask = np.zeros((count, length), dtype=np.int64)
    for i in range(count):
        n = int(rng.integers(4, length))  # words, then EOS
        ids[i, :n] = rng.integers(2, vocab, n)
        ids[i, n] = EOS
        mask[i, : n + 1] = 1
    return ids, mask


def _example(model: DT5) -> dict[str, torch.Tensor]:
    ids, mask = synthetic_token_ids(1, model.config.vocab_size, model.config.max_length, 0)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def _graphs(config: str) -> list[GraphSpec]:
    return [GraphSpec(
        name="encoder", module=lambda model: model, example_inputs=_example,
        input_names=("input_ids", "attention_mask"), output_names=("prompt_embeds",),
        fx_passes=lambda model, target, pipeline: pipelines.cleanup_fx(),
        onnx_passes=lambda pipeline: pipelines.encoder_onnx(),
        # T5's norms branch on the weights' dtype and its position bias on the length
        tracing=Tracing(method="export"),
    )]


def _samples(model: DT5, graphs, plan: SamplePlan) -> Samples:
    cfg = model.config
    calib_ids, calib_mask = synthetic_token_ids(plan.calibration or CALIBRATION, cfg.vocab_size, cfg.max_length, 1000)
    ids, mask = synthetic_token_ids(plan.check or CHECK, cfg.vocab_size, cfg.max_length, plan.first_check_seed)
    with torch.no_grad():
        refs = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    return Samples(
        calibration={"encoder": [{"input_ids": i[None], "attention_mask": m[None]}
                                 for i, m in zip(calib_ids, calib_mask)]},
        check={"encoder": [{"input_ids": i[None], "attention_mask": m[None], "prompt_embeds_fp32": r[None]}
                           for i, m, r in zip(ids, mask, refs)]},
        check_labels={"encoder": [f"synthetic prompt {j}" for j in range(len(ids))]},
    )


def _weight_shapes(opts: LoadOptions) -> dict[str, tuple[int, ...]]:
    """The modules' weights (meta device); a checkpoint's config and tensor headers are read
    and matched."""
    config = get_dt5_config(opts.config)
    if opts.checkpoint is not None:
        import dataclasses

        from neodragon_npu.neodragon_models.dt5 import dt5_config_from_json
        from neodragon_npu.neodragon_models.weights import check_shapes, checkpoint_shapes, read_config

        released = dt5_config_from_json(read_config(opts.checkpoint), str(opts.checkpoint))
        config = dataclasses.replace(released, max_length=config.max_length)
    with torch.device("meta"):
        shapes = meta_shapes(DT5(config))
    if opts.checkpoint is not None:
        found = checkpoint_shapes(opts.checkpoint)
        found.pop("encoder.encoder.embed_tokens.weight", None)  # the tied copy: one parameter here
        check_shapes(shapes, found, str(opts.checkpoint))
    return shapes


DT5_SPEC = ModelSpec(
    name="dt5",
    summary="DT5 text encoder (T5 encoder + 768->4096->4096 projection): one FP16 graph",
    configs=lambda: tuple(DT5_CONFIGS), default_config="tiny",
    load=lambda o: build_dt5(get_dt5_config(o.config), checkpoint=o.checkpoint, seed=o.seed),
    graphs=_graphs, samples=_samples,
    precision=lambda options: pipelines.FP16(),
    describe=lambda model, o: load_description(o, params=count_parameters(model.config),
                                               samples="synthetic token ids (no tokenizer)"),
    weight_bytes=fp32_weight_bytes,
    min_sqnr_db=40.0,
    checkpoint_help="the released text_encoder_3 folder (config.json + safetensors)",
    reference_note="fp32 PyTorch DT5",
    weight_shapes=_weight_shapes,
)
