"""The bundle manifest's JSON Schema (format ``neodragon-bundle/1``), described field by field
in docs/bundle.md. ``neodragon-npu validate-bundle DIR`` and :func:`..bundle.open_bundle`
check a manifest against it."""

from __future__ import annotations

_TENSOR = {
    "type": "object", "required": ["name", "shape", "dtype"],
    "properties": {"name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
                   "dtype": {"type": "string"}},
}
_BINARIES = {
    "type": "object", "minProperties": 1,
    "additionalProperties": {"type": "object", "required": ["epcontext_model", "binary"],
                             "properties": {"epcontext_model": {"type": "string"}, "binary": {"type": "string"}}},
}
_FIDELITY = {
    "type": "object", "required": ["reference", "threshold_db", "passed"],
    "properties": {"reference": {"type": "string"}, "threshold_db": {"type": "number"}, "passed": {"type": "boolean"},
                   "sqnr_db": {"type": "number"}, "htp_simulator": {"type": "number"}, "w8a16_cpu": {"type": "number"}},
    "anyOf": [{"required": ["sqnr_db"]}, {"required": ["htp_simulator"]}, {"required": ["w8a16_cpu"]}],
}
_GRAPH = {
    "type": "object",
    "required": ["model", "config", "build", "phase", "place", "kind", "precision", "inputs", "outputs", "fidelity"],
    "properties": {
        "model": {"type": "string"}, "config": {"type": "string"}, "build": {"type": "string"},
        "phase": {"enum": ["text", "first_frame", "encode", "denoise", "decode", "upscale"]},
        "place": {"type": "string"},
        "kind": {"enum": ["single", "family"]},
        "precision": {"enum": ["w8a16", "fp16"]},
        "inputs": {"type": "array", "minItems": 1, "items": _TENSOR},
        "outputs": {"type": "array", "minItems": 1, "items": _TENSOR},
        "fidelity": _FIDELITY,
        "quantization": {"type": ["object", "null"]},
        "deployed_model": {"type": "string"}, "encodings": {"type": "string"}, "binaries": _BINARIES,
        "partitions": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["index", "qdq_model", "encodings", "binaries"],
            "properties": {"index": {"type": "integer"}, "qdq_model": {"type": "string"},
                           "encodings": {"type": "string"}, "binaries": _BINARIES,
                           "simulator_model": {"type": "string"}}}},
    },
    "allOf": [
        {"if": {"properties": {"kind": {"const": "single"}}}, "then": {"required": ["deployed_model", "binaries"]}},
        {"if": {"properties": {"kind": {"const": "family"}}}, "then": {"required": ["partitions"]}},
        {"if": {"properties": {"precision": {"const": "w8a16"}, "kind": {"const": "single"}}},
         "then": {"required": ["encodings"]}},
    ],
}
_POINT = {"type": "object", "required": ["shift", "scale"],
          "properties": {"shift": {"type": "number"}, "scale": {"type": "number"}}}
_TOKENIZER = {
    "type": "object", "required": ["kind", "max_length", "eos_id", "pad_id", "word_ids"],
    "properties": {"kind": {"enum": ["clip", "t5"]}, "max_length": {"type": "integer", "minimum": 2},
                   "eos_id": {"type": "integer"}, "pad_id": {"type": "integer"}, "bos_id": {"type": "integer"},
                   "word_ids": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}},
}
_LOOP = {
    "type": "object", "required": ["prompt_modifier", "tokenizers", "first_frame", "video", "decoder", "upscale"],
    "properties": {
        "prompt_modifier": {"type": "string"},
        "tokenizers": {"type": "object", "required": ["clip_l", "clip_g", "dt5"],
                       "additionalProperties": _TOKENIZER},
        "first_frame": {"type": "object", "required": ["latent_channels", "latent_size", "vae_scaling_factor",
                                                       "lcm_steps", "time_ids"],
                        "properties": {"lcm_steps": {"type": "array", "minItems": 1, "items": {
                            "type": "object",
                            "required": ["timestep", "alpha_cumprod", "alpha_cumprod_next", "c_skip", "c_out",
                                         "renoise"]}}}},
        "video": {"type": "object",
                  "required": ["frame_size", "latent_channels", "latent_size", "latent_frames", "frames_per_unit",
                               "denoised_units", "num_stages", "patch_size", "gamma", "mask_value",
                               "first_frame_latent", "video_latent", "stages", "calls"],
                  "properties": {
                      "first_frame_latent": _POINT, "video_latent": _POINT,
                      "stages": {"type": "array", "items": {
                          "type": "object", "required": ["stage", "latent_size", "timestep", "upsample"],
                          "properties": {"upsample": {"oneOf": [
                              {"type": "null"},
                              {"type": "object", "required": ["alpha", "beta"]}]}}}},
                      "calls": {"type": "object", "minProperties": 1, "propertyNames": {"pattern": r"^\d+,\d+$"},
                                "additionalProperties": {
                                    "type": "object", "required": ["clips", "pad_tokens", "output_tokens"],
                                    "properties": {"clips": {"type": "array", "minItems": 1, "items": {
                                        "type": "object",
                                        "required": ["level", "first_frame", "num_frames", "height", "width"]}}}}},
                  }},
        "decoder": {"type": "object", "required": ["state", "frames"],
                    "properties": {"state": {"type": "array", "items": {"type": "object",
                                                                        "required": ["name", "shape"]}}}},
        "upscale": {"type": "object", "required": ["scale", "input_size"]},
    },
}
MANIFEST_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Neodragon bundle manifest",
    "type": "object",
    "required": ["tool", "output", "format", "system", "targets", "graphs", "tables", "loop", "calibration", "build",
                 "files"],
    "properties": {
        "tool": {"const": "neodragon-npu"},
        "output": {"const": "bundle"},
        "format": {"const": "neodragon-bundle/1"},
        "host": {"type": "object"},
        "system": {"type": "object", "required": ["name", "configs", "seed", "weights"]},
        "targets": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "soc_model", "htp_arch"],
            "properties": {"name": {"type": "string"}, "soc_model": {"type": "integer"},
                           "htp_arch": {"type": "integer"}}}},
        "graphs": {"type": "object", "minProperties": 1, "additionalProperties": _GRAPH},
        "tables": {"type": "string"},
        "loop": _LOOP,
        "calibration": {"type": "object", "required": ["source", "prompts", "check_prompts"]},
        "build": {"type": "object", "required": ["seconds", "total_seconds", "peak_rss_bytes"]},
        "files": {"type": "array"},
    },
}
