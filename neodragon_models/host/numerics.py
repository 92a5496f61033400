"""The host arithmetic between Neodragon's graphs, in numpy only.

An app on a phone or a Snapdragon laptop runs these steps around the compiled graphs, so
nothing here imports torch: resizes (bilinear as ``torch.nn.functional.interpolate`` with
``align_corners=False`` and no antialias, nearest 2x, and a Lanczos-3 resize of 8-bit
images as the released pipeline's PIL resize), the pyramid's block noise, (un)patchify,
the attention mask rule, the VAE posterior's sample, and the LCM scheduler's step.
"""

from __future__ import annotations

import math

import numpy as np

# --- resizes -----------------------------------------------------------------------------


def _bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[out, in] weights of a half-pixel bilinear resize along one axis (torch's rule: the
    source coordinate clamped at 0, the right neighbour clamped at the edge)."""
    scale = size_in / size_out
    src = np.maximum((np.arange(size_out) + 0.5) * scale - 0.5, 0.0)
    left = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    right = np.minimum(left + 1, size_in - 1)
    frac = src - left
    m = np.zeros((size_out, size_in), dtype=np.float64)
    m[np.arange(size_out), left] += 1 - frac
    m[np.arange(size_out), right] += frac
    return m


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[..., H, W] -> [..., h, w], float32."""
    rows = _bilinear_matrix(x.shape[-2], size[0])
    cols = _bilinear_matrix(x.shape[-1], size[1])
    return (rows @ x.astype(np.float64) @ cols.T).astype(np.float32)


def upsample_nearest_2x(x: np.ndarray) -> np.ndarray:
    """[..., H, W] -> [..., 2H, 2W]."""
    return np.repeat(np.repeat(x, 2, axis=-2), 2, axis=-1)


def _lanczos_matrix(size_in: int, size_out: int, a: int = 3) -> np.ndarray:
    """[out, in] Lanczos-``a`` weights, widened by the scale when shrinking (antialiased,
    as PIL resamples), each row normalised."""
    scale = size_in / size_out
    support = a * max(scale, 1.0)
    m = np.zeros((size_out, size_in), dtype=np.float64)
    for i in range(size_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(math.floor(center - support)), 0), min(int(math.ceil(center + support)), size_in)
        j = np.arange(lo, hi)
        t = (j + 0.5 - center) / max(scale, 1.0)
        w = np.sinc(t) * np.sinc(t / a) * (np.abs(t) < a)
        m[i, lo:hi] = w / w.sum()
    return m


def resize_lanczos(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An 8-bit image [H, W, 3] -> [h, w, 3] uint8 (Lanczos-3, rounded and clipped)."""
    rows = _lanczos_matrix(pixels.shape[0], size[0])
    cols = _lanczos_matrix(pixels.shape[1], size[1])
    planes = pixels.astype(np.float64).transpose(2, 0, 1)  # [3, H, W]
    out = (rows @ planes @ cols.T).transpose(1, 2, 0)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


# --- images --------------------------------------------------------------------------------


def to_pixels(image: np.ndarray) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> [H, W, 3] uint8, rounded as diffusers' image processor does."""
    x = np.clip(image / 2 + 0.5, 0.0, 1.0)
    return (x.transpose(1, 2, 0) * 255).round().astype(np.uint8)


def from_pixels(pixels: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> [1, 3, H, W] float32 in [-1, 1] (the released ``x / 255 * 2 - 1``)."""
    return (pixels.astype(np.float32) / 255.0 * 2 - 1).transpose(2, 0, 1)[None]


# --- the pyramid ---------------------------------------------------------------------------


def block_noise(gamma: float, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise [B, C, T, H, W], unit variance, correlated within each 2x2 block:
    covariance (1 + gamma) I - gamma 11^T (Pyramid Flow's block noise)."""
    b, c, t, h, w = shape
    cov = np.eye(4) * (1 + gamma) - np.ones((4, 4)) * gamma
    chol = np.linalg.cholesky(cov)
    z = rng.standard_normal((b * c * t * (h // 2) * (w // 2), 4)) @ chol.T
    z = z.reshape(b, c, t, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 3, 5, 4, 6)
    return z.reshape(b, c, t, h, w).astype(np.float32)


def upsample_renoise(x: np.ndarray, alpha: float, beta: float, gamma: float, rng: np.random.Generator) -> np.ndarray:
    """Into the next stage: nearest 2x, then ``alpha x + beta block_noise``."""
    x = upsample_nearest_2x(x)
    return (alpha * x + beta * block_noise(gamma, x.shape, rng)).astype(np.float32)


def patchify(latent: np.ndarray, patch: int) -> np.ndarray:
    """[B, C, T, H, W] -> [B, T*(H/p)*(W/p), C*p*p], the patch in (c, kh, kw) order."""
    b, c, t, h, w = latent.shape
    x = latent.reshape(b, c, t, h // patch, patch, w // patch, patch).transpose(0, 2, 3, 5, 1, 4, 6)
    return x.reshape(b, t * (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: np.ndarray, patch: int, channels: int, t: int, h: int, w: int) -> np.ndarray:
    """[B, T*gh*gw, p*p*C] (the denoiser output's (p1, p2, c) order) -> [B, C, T, H, W]."""
    b = tokens.shape[0]
    x = tokens.reshape(b, t, h // patch, w // patch, patch, patch, channels).transpose(0, 6, 1, 2, 4, 3, 5)
    return x.reshape(b, channels, t, h, w)


def attention_bias(text_valid: np.ndarray, image_times: np.ndarray, pad_tokens: int, mask_value: float) -> np.ndarray:
    """The additive mask [1, 1, S, S] over [text ; pad ; image]: valid text and image form
    one group, padded text another, envelope padding a third; inside a group a query sees
    keys of its own or an earlier frame (text sits at frame 0). 0 where seen, ``mask_value``
    elsewhere."""
    text_len = text_valid.shape[-1]
    group = np.concatenate([(np.asarray(text_valid).reshape(-1) > 0).astype(np.int64),
                            np.full(pad_tokens, 2, dtype=np.int64), np.ones(len(image_times), dtype=np.int64)])
    times = np.concatenate([np.zeros(text_len + pad_tokens), np.asarray(image_times, dtype=np.float64)])
    allowed = (group[:, None] == group[None, :]) & (times[:, None] >= times[None, :])
    return np.where(allowed, 0.0, mask_value).astype(np.float32)[None, None]


# --- the VAE ------------------------------------------------------------------------------


def sample_posterior(moments: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mean + exp(logvar / 2) noise, logvar clamped to [-30, 20] (the released
    ``DiagonalGaussianDistribution.sample``); ``moments`` holds mean then logvar on axis 1."""
    mean, logvar = np.split(moments, 2, axis=1)
    noise = rng.standard_normal(mean.shape)
    return (mean + np.exp(0.5 * np.clip(logvar, -30.0, 20.0)) * noise).astype(np.float32)


# --- SDXL's LCM first frame ---------------------------------------------------------------

LCM_TIMESTEPS = (999, 749, 499, 249)
TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012  # scaled_linear
LCM_TIMESTEP_SCALING, LCM_SIGMA_DATA = 10.0, 0.5


def sinusoid(values: np.ndarray, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
             max_period: float = 10000.0) -> np.ndarray:
    """diffusers' ``get_timestep_embedding`` in numpy: [N] -> [N, dim] float32."""
    half = dim // 2
    exponent = -math.log(max_period) * np.arange(half, dtype=np.float32) / (half - freq_shift)
    args = np.asarray(values, dtype=np.float32)[:, None] * np.exp(exponent)[None, :]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = np.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)


def time_ids(height: int, width: int) -> np.ndarray:
    """SDXL's size conditions: original size, crop corner, target size."""
    return np.array([[height, width, 0, 0, height, width]], dtype=np.float32)


def alphas_cumprod() -> np.ndarray:
    betas = np.linspace(BETA_START ** 0.5, BETA_END ** 0.5, TRAIN_TIMESTEPS, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def lcm_coefficients(timesteps: tuple[int, ...] = LCM_TIMESTEPS) -> list[dict[str, float]]:
    """Per step, the numbers :func:`lcm_step` uses (the manifest writes them out)."""
    a = alphas_cumprod()
    out = []
    for step, t in enumerate(timesteps):
        last = step == len(timesteps) - 1
        scaled = t * LCM_TIMESTEP_SCALING
        out.append({"timestep": int(t), "alpha_cumprod": float(a[t]),
                    "alpha_cumprod_next": float(a[timesteps[step + 1]] if not last else a[0]),
                    "c_skip": LCM_SIGMA_DATA ** 2 / (scaled ** 2 + LCM_SIGMA_DATA ** 2),
                    "c_out": scaled / (scaled ** 2 + LCM_SIGMA_DATA ** 2) ** 0.5, "renoise": not last})
    return out


def lcm_step_with(coefficients: dict, eps: np.ndarray, latents: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
    """One LCM step (diffusers' LCMScheduler, epsilon prediction) from its coefficients: the
    boundary-condition denoised latent, re-noised to the next timestep with ``noise``
    unless it is the last step."""
    a_t = coefficients["alpha_cumprod"]
    x0 = (latents - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    denoised = coefficients["c_out"] * x0 + coefficients["c_skip"] * latents
    if not coefficients["renoise"]:
        return denoised.astype(np.float32)
    if noise is None:
        raise ValueError("an LCM step before the last needs fresh noise")
    a_next = coefficients["alpha_cumprod_next"]
    return (math.sqrt(a_next) * denoised + math.sqrt(1 - a_next) * noise).astype(np.float32)


def lcm_step(eps: np.ndarray, step: int, latents: np.ndarray, noise: np.ndarray | None,
             timesteps: tuple[int, ...] = LCM_TIMESTEPS) -> np.ndarray:
    """Step ``step`` of the LCM loop over ``timesteps``."""
    return lcm_step_with(lcm_coefficients(timesteps)[step], eps, latents, noise)
