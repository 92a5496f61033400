"""DT5 against an independent implementation: transformers' T5EncoderModel with the same
weights, for both feed-forward kinds; parameter counts against the released sizes."""

import dataclasses

import pytest
import torch

from neodragon_npu.neodragon_models.dt5 import DT5, count_parameters, get_dt5_config


def _seeded(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 1.0))


@pytest.mark.parametrize("ffn", ["gated-gelu", "relu"])
def test_dt5_matches_transformers_t5_encoder_with_the_same_weights(ffn):
    from transformers import T5Config
    from transformers import T5EncoderModel as HFT5EncoderModel

    cfg = dataclasses.replace(get_dt5_config("tiny"), feed_forward_proj=ffn)
    ours = DT5(cfg).eval()
    _seeded(ours, 3)
    hf = HFT5EncoderModel(T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, num_heads=cfg.num_heads,
        num_layers=cfg.num_layers, d_ff=cfg.d_ff, feed_forward_proj=cfg.feed_forward_proj,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        layer_norm_epsilon=cfg.layer_norm_epsilon, dropout_rate=0.0, is_encoder_decoder=False,
    )).eval()
    state = {k.removeprefix("encoder."): v for k, v in ours.state_dict().items() if k.startswith("encoder.")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(2, cfg.vocab_size, (2, cfg.max_length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 11:] = 0  # padded, as the tokenizer pads to max_length
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours.encoder(ids, mask)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        projected = ours(ids, mask)
    assert projected.shape == (2, cfg.max_length, cfg.project_out_dim)
    lin0, lin3 = ours.final_projection[0], ours.final_projection[3]
    torch.testing.assert_close(projected, lin3(torch.relu(lin0(ref))), rtol=1e-5, atol=1e-5)


def test_the_released_size_has_the_released_parameter_count():
    cfg = get_dt5_config("neodragon")
    with torch.device("meta"):
        model = DT5(cfg)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == count_parameters(cfg)
    # ../shared/neodragon-submodules.md 1: 24.7 M embedding + 85 M layers + 19.9 M projection
    assert 0.129e9 < counted < 0.130e9
    names = dict(model.named_parameters())
    assert tuple(names["encoder.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape) == (32, 12)
    assert tuple(names["encoder.encoder.block.11.layer.1.DenseReluDense.wi_0.weight"].shape) == (2048, 768)
    assert tuple(names["final_projection.3.weight"].shape) == (4096, 4096)
