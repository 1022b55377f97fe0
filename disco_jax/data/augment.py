"""Device-side photometric augmentation (MoCo-v2 "aug-plus") and normalisation, in pure JAX.

The host pipeline only crops and flips (uint8). Colour jitter, grayscale, blur and the ImageNet
normalisation run here, inside the jitted train step: on the host they cost ~30x the crop
(perf.md §5.1), on the accelerator well under 1% of a step.

Semantics follow torchvision, which MoCo-v2 uses (methods.md §1):
ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8 (the four ops in a random order per example),
RandomGrayscale(p=0.2), GaussianBlur(sigma in [0.1, 2]) with p=0.5, then Normalize.
Every example draws its own randomness. All maths is float32 on the [0, 1] scale.

Beyond MoCo-v2: solarisation (BYOL, `solarize_p`, off by default) after the blur, as
deepmind-research/byol `augmentations.py` orders them; per-view settings (`view2`: overrides
for the second view, which a method asks for with `view=2`; empty by default, so both views
share one augmentation); the normalisation statistics (`mean`/`std`, ImageNet's by default;
CIFAR recipes pass their own).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from disco_jax.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# winycg/MCL and L-MCL main_cifar.py: transforms.Normalize of CIFAR-100.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma

# Colour-jitter op ids, in torchvision's order.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3


def _gray(x: jax.Array) -> jax.Array:
    """HxWx3 -> HxWx1 luma."""
    return x @ jnp.asarray(GRAY_WEIGHTS, jnp.float32)[:, None]


def _normalize_unit(x: jax.Array, out_dtype, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> jax.Array:
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return ((x - mean) / std).astype(out_dtype)


def _to_unit(images_uint8: jax.Array) -> jax.Array:
    return images_uint8.astype(jnp.float32) / 255.0


def normalize(images_uint8: jax.Array, out_dtype=jnp.float32,
              mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> jax.Array:
    """Eval path: uint8 NHWC -> (x / 255 - mean) / std as `out_dtype` (ImageNet's statistics
    unless the run's `data.mean` / `data.std` are passed)."""
    return _normalize_unit(_to_unit(images_uint8), out_dtype, mean, std)


def check_stats(mean: Any, std: Any, where: str = "data") -> None:
    """`mean` / `std`: three numbers each (RGB), every std positive."""
    for name, value in (("mean", mean), ("std", std)):
        if not isinstance(value, Sequence) or len(value) != 3 or not all(
                isinstance(v, (int, float)) for v in value):
            raise ConfigError(f"{where}.{name} must be three numbers (R, G, B), got {value!r}")
    if min(std) <= 0:
        raise ConfigError(f"{where}.std must be positive, got {tuple(std)!r}")


# ---------------------------------------------------------------------------------------------
# Colour jitter (single image, HxWx3 float in [0, 1])


def _blend_op(x: jax.Array, op: jax.Array, factor: jax.Array) -> jax.Array:
    """Brightness, contrast or saturation, picked by `op` (a traced int).

    All three are torchvision's `_blend(img, other, factor)`:
    clip(factor * img + (1 - factor) * other). They differ only in `other`: black, the mean
    luma, or the per-pixel luma. So a data-dependent choice costs one blend, not three.
    """
    gray = _gray(x)
    other = jnp.where(op == _BRIGHTNESS, 0.0, jnp.where(op == _CONTRAST, jnp.mean(gray), gray))
    return jnp.clip(factor * x + (1.0 - factor) * other, 0.0, 1.0)


def _rgb_to_hsv(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    # torchvision.transforms.functional_tensor._rgb2hsv
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc = jnp.max(x, axis=-1)
    minc = jnp.min(x, axis=-1)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / jnp.where(eqc, 1.0, maxc)
    cr_div = jnp.where(eqc, 1.0, cr)
    rc = (maxc - r) / cr_div
    gc = (maxc - g) / cr_div
    bc = (maxc - b) / cr_div
    hr = jnp.where(maxc == r, bc - gc, 0.0)
    hg = jnp.where((maxc == g) & (maxc != r), 2.0 + rc - bc, 0.0)
    hb = jnp.where((maxc != g) & (maxc != r), 4.0 + gc - rc, 0.0)
    h = jnp.mod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h: jax.Array, s: jax.Array, v: jax.Array) -> jax.Array:
    # torchvision.transforms.functional_tensor._hsv2rgb
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.astype(jnp.int32) % 6
    p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
    q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
    t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    r = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [v, q, p, p, t], v)
    g = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [t, v, v, q, p], p)
    b = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [p, p, t, v, v], q)
    return jnp.stack([r, g, b], axis=-1)


def _adjust_hue(x: jax.Array, shift: jax.Array) -> jax.Array:
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb(jnp.mod(h + shift, 1.0), s, v)


def _color_jitter(
    key: jax.Array, x: jax.Array, brightness: float, contrast: float, saturation: float, hue: float
) -> jax.Array:
    """torchvision ColorJitter on one image: all four factors drawn, ops in a random order.

    The hue op (an HSV round trip) is the costly one, so it runs once rather than at all four
    positions. The three blend ops run as prefix states s_0..s_3. Hue applies to s_p, p being
    its position in the order. The blend ops after position p then apply to the result.
    """
    k_order, k_b, k_c, k_s, k_h = jax.random.split(key, 5)

    def factor(k: jax.Array, amount: float) -> jax.Array:
        return jax.random.uniform(k, (), jnp.float32, max(0.0, 1.0 - amount), 1.0 + amount)

    factors = jnp.stack([factor(k_b, brightness), factor(k_c, contrast), factor(k_s, saturation)])
    shift = jax.random.uniform(k_h, (), jnp.float32, -hue, hue)

    order = jax.random.permutation(k_order, 4)
    hue_pos = jnp.argmax(order == _HUE)
    # The three blend ops in their relative order: stable-sort hue to the end and drop it.
    blend_ops = order[jnp.argsort(jnp.where(order == _HUE, 4, jnp.arange(4)))][:3]

    prefixes = [x]
    for j in range(3):
        prefixes.append(_blend_op(prefixes[-1], blend_ops[j], factors[blend_ops[j]]))
    y = _adjust_hue(jnp.stack(prefixes)[hue_pos], shift)
    for j in range(3):
        # Blend op j comes after hue iff j >= hue_pos (it sits at position j or j + 1).
        y = jnp.where(j >= hue_pos, _blend_op(y, blend_ops[j], factors[blend_ops[j]]), y)
    return y


# ---------------------------------------------------------------------------------------------
# Gaussian blur


def blur_kernel_size(side: int) -> int:
    """Odd kernel ~10% of the image side: 23 px at 224 (MoCo-v2), at least 3."""
    return max(3, int(0.1 * side) // 2 * 2 + 1)


def _gaussian_blur(x: jax.Array, sigma: jax.Array) -> jax.Array:
    """Separable Gaussian blur of one HxWxC image as a sum of shifted slices.

    The kernel size is static (it depends on the image shape only), the per-example sigma is
    traced, so vmap over a batch turns each tap into one fused multiply-add over the batch.
    """
    height, width = x.shape[0], x.shape[1]
    size = blur_kernel_size(min(height, width))
    radius = size // 2
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    weights = jnp.exp(-0.5 * jnp.square(taps / sigma))
    weights = weights / jnp.sum(weights)
    # torchvision pads with reflection; tiny images (side <= radius) cannot reflect.
    mode = "reflect" if min(height, width) > radius else "edge"

    padded = jnp.pad(x, ((radius, radius), (0, 0), (0, 0)), mode=mode)
    x = sum(weights[k] * padded[k : k + height] for k in range(size))
    padded = jnp.pad(x, ((0, 0), (radius, radius), (0, 0)), mode=mode)
    return sum(weights[k] * padded[:, k : k + width] for k in range(size))


# ---------------------------------------------------------------------------------------------
# Solarisation


def solarize(x: jax.Array, threshold: float = 0.5) -> jax.Array:
    """BYOL's `_solarize_single_image`: values at or above `threshold` become 1 - x."""
    return jnp.where(x < threshold, x, 1.0 - x)


# ---------------------------------------------------------------------------------------------

# The per-view settings `mocov2_augment` takes (and `view2` may override).
OPTIONS = ("jitter_p", "brightness", "contrast", "saturation", "hue", "gray_p", "blur_p",
           "blur_sigma", "solarize_p", "solarize_threshold")
_PROBABILITIES = ("jitter_p", "gray_p", "blur_p", "solarize_p")


def validate(cfg: Mapping[str, Any]) -> None:
    """The `augment` config block (and its `view2` overrides): one-line ConfigErrors."""
    view2 = dict(cfg.get("view2", None) or {})
    bad = sorted(set(view2) - set(OPTIONS))
    if bad:
        raise ConfigError(f"augment.view2.{bad[0]} is not an augmentation option; valid:"
                          f" {', '.join(OPTIONS)}")
    for where, settings in (("augment", cfg), ("augment.view2", view2)):
        for name in _PROBABILITIES:
            if name in settings and not 0.0 <= float(settings[name]) <= 1.0:
                raise ConfigError(f"{where}.{name} must be a probability in [0, 1], got"
                                  f" {settings[name]!r}")
        sigma = settings.get("blur_sigma", None)
        if sigma is not None and not (len(sigma) == 2 and 0 < sigma[0] <= sigma[1]):
            raise ConfigError(f"{where}.blur_sigma must be (min, max) with 0 < min <= max, got"
                              f" {sigma!r}")


def mocov2_augment(
    rng: jax.Array,
    images_uint8: jax.Array,
    *,
    jitter_p: float = 0.8,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    gray_p: float = 0.2,
    blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    solarize_p: float = 0.0,
    solarize_threshold: float = 0.5,
    view: int = 1,
    view2: Mapping[str, Any] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    out_dtype=jnp.float32,
) -> jax.Array:
    """MoCo-v2 photometric augmentation of uint8 NHWC (RGB) crops -> normalised `out_dtype`.

    `view=2` applies the `view2` overrides (any of `OPTIONS`) on top of the other settings:
    BYOL's second view, e.g. view2={"blur_p": 0.1, "solarize_p": 0.2}. Each example gets its
    own key. Each op is computed for every example and selected with `where`: cheaper on an
    accelerator than branching, and it keeps the function jittable.
    """
    if images_uint8.ndim != 4 or images_uint8.shape[-1] != 3:
        raise ValueError(f"expected uint8 NHWC RGB images, got shape {images_uint8.shape}")
    if view not in (1, 2):
        raise ValueError(f"view must be 1 or 2, got {view!r}")
    s = {"jitter_p": jitter_p, "brightness": brightness, "contrast": contrast,
         "saturation": saturation, "hue": hue, "gray_p": gray_p, "blur_p": blur_p,
         "blur_sigma": blur_sigma, "solarize_p": solarize_p,
         "solarize_threshold": solarize_threshold}
    if view == 2 and view2:
        bad = sorted(set(view2) - set(OPTIONS))
        if bad:
            raise ValueError(f"view2 overrides unknown augmentation options {bad}")
        s.update(view2)

    def one(key: jax.Array, image: jax.Array) -> jax.Array:
        k_jit, k_jit_p, k_gray_p, k_blur, k_blur_p = jax.random.split(key, 5)
        x = _to_unit(image)
        if s["jitter_p"] > 0:
            jittered = _color_jitter(k_jit, x, s["brightness"], s["contrast"],
                                     s["saturation"], s["hue"])
            x = jnp.where(jax.random.uniform(k_jit_p) < s["jitter_p"], jittered, x)
        if s["gray_p"] > 0:
            gray = jnp.broadcast_to(_gray(x), x.shape)
            x = jnp.where(jax.random.uniform(k_gray_p) < s["gray_p"], gray, x)
        if s["blur_p"] > 0:
            lo, hi = s["blur_sigma"]
            sigma = jax.random.uniform(k_blur, (), jnp.float32, lo, hi)
            x = jnp.where(jax.random.uniform(k_blur_p) < s["blur_p"],
                          _gaussian_blur(x, sigma), x)
        if s["solarize_p"] > 0:
            # Its own key (folded in), so the draws above stay those of the MoCo-v2 path.
            k_sol = jax.random.fold_in(key, 5)
            x = jnp.where(jax.random.uniform(k_sol) < s["solarize_p"],
                          solarize(x, s["solarize_threshold"]), x)
        return x

    keys = jax.random.split(rng, images_uint8.shape[0])
    return _normalize_unit(jax.vmap(one)(keys, images_uint8), out_dtype, mean, std)


__all__ = ["mocov2_augment", "normalize", "solarize", "validate", "check_stats", "OPTIONS",
           "blur_kernel_size", "IMAGENET_MEAN", "IMAGENET_STD"]
