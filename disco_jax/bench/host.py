"""Host input-pipeline benchmark: our training streams against bare tf.data floors, same run.

    python -m disco_jax.bench.host --out DIR [--images N] [--threads N] [--seconds S]
    python -m disco_jax.bench --suite host --out DIR      # the driver calls `run(out_dir, args)`

It first makes `--images` ImageNet-like JPEGs (about 500x375: 1/f-spectrum noise, overlapping
textured shapes and sensor grain, so they compress like photographs; the JPEG quality is bisected
until the mean file is `--jpeg-kb`, ~110 KB like ImageNet's) and stores them as a TFDS dataset
(encoded JPEG `image`, `label`), which is how ImageNet reaches the pipeline. Every case below reads
that dataset through `sources.get_source`, i.e. the production TFDS reader, and then times
`--seconds` of steady state after `--warmup` batches of `--batch` source images:

* `train_2view`: `data.train_dataset(views=2)`, the two-view stream of DisCo / MoCo-v2 / BYOL /
  SimCLR (decode once, two torchvision RandomResizedCrops at scale (0.2, 1), flip, uint8).
* `floor_2view`: the bare floor of that stream: TFDS records, `tf.io.decode_jpeg`, two
  `tf.image.sample_distorted_bounding_box` crops + the same bilinear resize + flip
  + uint8, unordered parallel map, batch, prefetch. Nothing else (no shuffle, no stateless keys).
* `fused_2view`: the floor with `tf.image.decode_and_crop_jpeg` once per view instead of one full
  decode: whether fusing pays when two crops share an image.
* `train_1view`: `data.train_dataset(views=1)`, SEED's (and supervised / KD's) one-view stream.
  It decodes the whole JPEG and then crops (the default, as PIL in the official code).
* `train_1view_fused`: the same stream with `fused_decode=True` (`data.fused_decode`): each crop
  decodes only its window with `tf.image.decode_and_crop_jpeg`.
* `fused_1view`: the one-view floor with the fused `tf.image.decode_and_crop_jpeg`.
* `floor_1view`: the one-view floor with a full decode then a crop (isolates the fusion's gain).
* `device_augment`: the device half of the augmentation, `data.mocov2_augment` (colour jitter,
  grayscale, blur, normalise) jitted on `--aug-batch` uint8 crops on the first local device:
  ms per batch (median, p90 over the timed calls) and views/s. The train step runs it once per
  view, so a two-view step spends twice the per-view figure.

Rates are *source* images/s (a two-view image counts once) and per core over the cores the
pipeline may use: `len(os.sched_getaffinity(0))`, or `--threads` when smaller. `cpu_util` is
the process's CPU time over wall time times those cores: well under 1 means the pipeline did not
keep the cores busy (starved, or another job took them). `ratio_to_floor` divides a case's rate
by the rate of its `floor_case` measured in the same run (the floor of a one-view case is
`fused_1view`). The issue-13 targets (>= 300 source img/s per core two-view, >= 0.8 of the floor)
are reported in `targets` / `meets_target`, never asserted. Writes DIR/host_bench.json
(`{"records": [...], "setup": {...}}`) and prints a table; progress lines with ETAs go to stderr.

Options the driver's namespace may carry (each with the default shown by `--help` here):
images, seconds, host_warmup, threads, host_batch, host_image_size, jpeg_size, jpeg_kb,
aug_batch, aug_dtype (else the driver's `dtype`, else float32), antialias (False: every resize,
floors included, is plain bilinear, as `data.antialias=False`), steps (the most timed
device_augment calls), host_cases, host_data_dir (keep and reuse the JPEG dataset there; by
default it lives in a temporary directory removed at the end).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from disco_jax.errors import ConfigError

BENCH = "host"
SPLIT = "train"
DATASET_VERSION = "1.0.0"
SEED = 0
CROP_SCALE = (0.2, 1.0)  # MoCo-v2 / SEED RandomResizedCrop scale, the config default
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
FLIP_P = 0.5
TARGET_PER_CORE = 300.0  # issue 13: source img/s per core, two-view stream
TARGET_RATIO = 0.8  # issue 13: fraction of the floor measured beside it
PROGRESS_EVERY_S = 5.0
AUG_WARMUP_CALLS = 2  # after the compile: the first executions' one-off costs stay untimed

# name -> views, the floor a ratio is taken against, one line for the table.
CASES: dict[str, dict[str, Any]] = {
    "floor_2view": {"views": 2, "floor": None,
                    "what": "bare tf.data: decode once, 2 x (crop + resize + flip)"},
    "train_2view": {"views": 2, "floor": "floor_2view",
                    "what": "data.train_dataset(views=2), production"},
    "fused_2view": {"views": 2, "floor": "floor_2view",
                    "what": "bare tf.data: 2 x decode_and_crop_jpeg + resize + flip"},
    "fused_1view": {"views": 1, "floor": None,
                    "what": "bare tf.data: decode_and_crop_jpeg + resize + flip"},
    "floor_1view": {"views": 1, "floor": "fused_1view",
                    "what": "bare tf.data: full decode, crop + resize + flip"},
    "train_1view": {"views": 1, "floor": "fused_1view",
                    "what": "data.train_dataset(views=1), production"},
    "train_1view_fused": {"views": 1, "floor": "fused_1view",
                          "what": "data.train_dataset(views=1, fused_decode=True)"},
    "device_augment": {"views": 1, "floor": None,
                       "what": "jit(data.mocov2_augment) on uint8 crops, one view"},
}
HOST_CASES = tuple(c for c in CASES if c != "device_augment")

DEFAULTS: dict[str, Any] = {
    # 1024: an epoch of 16 batches of 64. With 256 (4 batches) the production stream paid its
    # per-epoch shuffle-buffer fill every 4th batch: 243 against 269 img/s on 2 cores.
    "images": 1024,
    "seconds": 15.0,
    "host_warmup": 3,
    "threads": 0,
    "host_batch": 64,
    "host_image_size": 224,
    "jpeg_size": "500x375",
    "jpeg_kb": 110.0,
    "aug_batch": 0,
    "aug_dtype": None,
    "steps": 50,
    "host_cases": ",".join(CASES),
    "host_data_dir": None,
    "antialias": True,
}
AUG_BATCH_AUTO = {"cpu": 32, "accelerator": 256}  # --aug-batch 0: per-device paper batch on GPU


# ---------------------------------------------------------------------------------------------
# Options


def _get(args: argparse.Namespace, name: str) -> Any:
    value = getattr(args, name, None)
    return DEFAULTS[name] if value is None else value


def _int(args: argparse.Namespace, name: str, lo: int, flag: str) -> int:
    value = _get(args, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ConfigError(f"--{flag} must be an integer >= {lo}, got {value!r}")
    return int(value)


def options(args: argparse.Namespace) -> dict[str, Any]:
    """The host suite's options from `args` (defaults for what it lacks), checked: one-line
    ConfigErrors before anything is made or written."""
    opts: dict[str, Any] = {
        "images": _int(args, "images", 1, "images"),
        "host_warmup": _int(args, "host_warmup", 0, "warmup"),
        "threads": _int(args, "threads", 0, "threads"),
        "host_batch": _int(args, "host_batch", 1, "batch"),
        "host_image_size": _int(args, "host_image_size", 8, "image-size"),
        "aug_batch": _int(args, "aug_batch", 0, "aug-batch"),
        "steps": _int(args, "steps", 1, "steps"),
    }
    seconds = _get(args, "seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ConfigError(f"--seconds must be a number > 0, got {seconds!r}")
    opts["seconds"] = float(seconds)
    kb = _get(args, "jpeg_kb")
    if isinstance(kb, bool) or not isinstance(kb, (int, float)) or not kb > 0:
        raise ConfigError(f"--jpeg-kb must be a number > 0, got {kb!r}")
    opts["jpeg_kb"] = float(kb)
    size = str(_get(args, "jpeg_size"))
    match = re.fullmatch(r"(\d+)x(\d+)", size)
    if not match or min(int(match[1]), int(match[2])) < 16:
        raise ConfigError(f"--jpeg-size must be WIDTHxHEIGHT with both >= 16, got {size!r}")
    opts["jpeg_size"] = (int(match[1]), int(match[2]))  # (width, height)
    if opts["host_batch"] > opts["images"]:
        raise ConfigError(f"--batch {opts['host_batch']} is larger than --images"
                          f" {opts['images']}: the training stream needs a full batch per epoch")
    cases = _get(args, "host_cases")
    names = [c.strip() for c in cases.split(",")] if isinstance(cases, str) else list(cases)
    bad = [c for c in names if c not in CASES]
    if bad or not names:
        raise ConfigError(f"unknown host case {bad[0] if bad else cases!r}; valid cases:"
                          f" {', '.join(CASES)}")
    # A ratio needs its floor: add it, and run everything in the fixed order (pairs adjacent).
    wanted = set(names) | {CASES[c]["floor"] for c in names if CASES[c]["floor"]}
    opts["host_cases"] = [c for c in CASES if c in wanted]
    opts["aug_dtype"] = _dtype_name(
        getattr(args, "aug_dtype", None) or getattr(args, "dtype", None) or "float32")
    from disco_jax.data.sources import check_bool

    antialias = _get(args, "antialias")
    check_bool("antialias", antialias)
    opts["antialias"] = bool(antialias)
    data_dir = _get(args, "host_data_dir")
    opts["host_data_dir"] = os.path.abspath(os.path.expanduser(data_dir)) if data_dir else None
    return opts


_DTYPE_ALIASES = {"f32": "float32", "fp32": "float32", "bf16": "bfloat16", "f16": "float16",
                  "fp16": "float16"}


def _dtype_name(value: Any) -> str:
    """float32 / bfloat16 / float16 from a name (or an alias) or a dtype object."""
    if isinstance(value, str):
        name = _DTYPE_ALIASES.get(value, value)
    else:
        import jax.numpy as jnp

        try:
            name = jnp.dtype(value).name
        except TypeError:
            name = repr(value)
    if name not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--aug-dtype must be float32, bfloat16 or float16, got {value!r}")
    return name


def available_cores() -> int:
    """The CPUs this process may run on (a container's or taskset's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------------------------
# ImageNet-like JPEGs


def _field(rng: np.random.Generator, h: int, w: int, beta: float) -> np.ndarray:
    """Zero-mean, unit-variance noise with a 1/f^beta amplitude spectrum (beta ~1: the spectrum
    of natural photographs), float32 (h, w)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0 / max(h, w)
    spectrum = rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)
    x = np.fft.irfft2(spectrum / f**beta, s=(h, w)).astype(np.float32)
    return (x - x.mean()) / (x.std() + 1e-6)


def synth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photograph-like uint8 (height, width, 3) image: a 1/f textured, tinted background,
    a few overlapping textured ellipses and rectangles, and grain. Its JPEG at q~90 is about as
    large as an ImageNet photo of that size (the point: realistic decode cost)."""
    h, w = height, width
    texture, tint = _field(rng, h, w, 1.0), _field(rng, h, w, 1.5)
    base = rng.uniform(60.0, 190.0, 3).astype(np.float32)
    mix = rng.uniform(-1.0, 1.0, 3).astype(np.float32)
    image = base + 45.0 * texture[..., None] + 20.0 * tint[..., None] * mix
    # Shapes reuse the texture, shifted, instead of one FFT each: cheap and still varied.
    for _ in range(int(rng.integers(3, 9))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.05, 0.35) * h, rng.uniform(0.05, 0.35) * w
        y0, y1 = int(max(cy - ry, 0)), int(min(cy + ry + 1, h))
        x0, x1 = int(max(cx - rx, 0)), int(min(cx + rx + 1, w))
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        if rng.random() < 0.5:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        else:
            mask = np.ones(yy.shape, bool)
        shifted = np.roll(texture, (int(rng.integers(h)), int(rng.integers(w))), (0, 1))
        colour = rng.uniform(0.0, 255.0, 3).astype(np.float32)
        patch = image[y0:y1, x0:x1]
        shape = colour + 30.0 * shifted[y0:y1, x0:x1, None]
        patch[mask] = 0.3 * patch[mask] + 0.7 * shape[mask]
    image += rng.normal(0.0, 4.0, image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def image_shape(i: int, size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of image i: landscape `size` (w, h), every fourth one portrait, as in
    ImageNet, where most photos are 500x375 or 375x500."""
    w, h = size
    return (w, h) if i % 4 == 3 else (h, w)


def _encode(image: np.ndarray, quality: int) -> bytes:
    from disco_jax.data._tf import tf

    # 4:2:0 chroma, as almost every camera / ImageNet JPEG.
    return tf.io.encode_jpeg(image, quality=quality, chroma_downsampling=True).numpy()


def tune_quality(images: list[np.ndarray], target_bytes: float) -> int:
    """The JPEG quality in [30, 100] whose mean size over `images` is nearest `target_bytes`
    (the size grows with the quality: a bisection)."""
    cache: dict[int, float] = {}

    def mean_size(q: int) -> float:
        if q not in cache:
            cache[q] = float(np.mean([len(_encode(im, q)) for im in images]))
        return cache[q]

    lo, hi = 30, 100
    while lo < hi:  # smallest q with mean_size(q) >= target (or 100)
        mid = (lo + hi) // 2
        if mean_size(mid) >= target_bytes:
            hi = mid
        else:
            lo = mid + 1
    if lo > 30 and abs(mean_size(lo - 1) - target_bytes) < abs(mean_size(lo) - target_bytes):
        return lo - 1
    return lo


def _dataset_name(opts: dict[str, Any]) -> str:
    w, h = opts["jpeg_size"]
    return f"host_bench_jpeg_{opts['images']}_{w}x{h}_{int(round(opts['jpeg_kb']))}kb"


def make_jpeg_dataset(data_dir: str, opts: dict[str, Any],
                      say: Callable[[str], None]) -> dict[str, Any]:
    """Writes (or reuses) the benchmark's JPEG dataset as TFDS `<name>` in data_dir; returns
    its description (name, quality, mean bytes, ...), also kept in `<data_dir>/<name>.json`."""
    from disco_jax.data._tf import import_tfds

    name = _dataset_name(opts)
    meta_path = Path(data_dir, f"{name}.json")
    if meta_path.is_file() and Path(data_dir, name, DATASET_VERSION,
                                    "dataset_info.json").is_file():
        meta = json.loads(meta_path.read_text())
        say(f"reusing {meta['images']} JPEGs ({meta['mean_jpeg_bytes'] / 1e3:.1f} KB mean,"
            f" quality {meta['jpeg_quality']}) in {data_dir}")
        return meta
    n, t0 = opts["images"], time.perf_counter()
    target = opts["jpeg_kb"] * 1000.0
    sample = [synth_image(np.random.default_rng([SEED, i]), *image_shape(i, opts["jpeg_size"]))
              for i in range(min(n, 8))]
    quality = tune_quality(sample, target)
    say(f"making {n} JPEGs {opts['jpeg_size'][0]}x{opts['jpeg_size'][1]} at quality {quality}"
        f" (mean size nearest {target / 1e3:.0f} KB)")
    examples, sizes = [], []
    for i in range(n):
        image = sample[i] if i < len(sample) else synth_image(
            np.random.default_rng([SEED, i]), *image_shape(i, opts["jpeg_size"]))
        jpeg = _encode(image, quality)
        sizes.append(len(jpeg))
        examples.append((i, {"image": jpeg, "label": i % 1000}))
        if (i + 1) % 128 == 0 and i + 1 < n:
            rate = (i + 1) / (time.perf_counter() - t0)
            say(f"  {i + 1}/{n} JPEGs, ETA {(n - i - 1) / rate:.0f} s")
    tfds = import_tfds()
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=1000),
    })
    tqdm_utils = tfds.core.utils.tqdm_utils
    was_active = getattr(tqdm_utils, "_active", True)
    tqdm_utils.display_progress_bar(False)
    try:
        tfds.dataset_builders.store_as_tfds_dataset(
            name=name, version=DATASET_VERSION, features=features,
            split_datasets={SPLIT: examples}, data_dir=data_dir,
            description="disco_jax.bench.host: synthetic ImageNet-like JPEGs.",
            disable_shuffling=True,
        )
    finally:
        tqdm_utils.display_progress_bar(was_active)
    meta = {
        "name": name, "images": n, "jpeg_size": list(opts["jpeg_size"]),
        "jpeg_quality": quality, "mean_jpeg_bytes": float(np.mean(sizes)),
        "min_jpeg_bytes": int(min(sizes)), "max_jpeg_bytes": int(max(sizes)),
        "make_s": round(time.perf_counter() - t0, 2),
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    say(f"  {n} JPEGs, {meta['mean_jpeg_bytes'] / 1e3:.1f} KB mean, in {meta['make_s']:.1f} s")
    return meta


# ---------------------------------------------------------------------------------------------
# The streams


def _tf_options(threads: int):
    from disco_jax.data._tf import tf

    options = tf.data.Options()
    if threads:
        options.threading.private_threadpool_size = threads
        options.autotune.cpu_budget = threads
    return options


def _to_uint8(x):
    from disco_jax.data._tf import tf

    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def _crop_window(shape):
    """A RandomResizedCrop-like box (scale CROP_SCALE, ratio RRC_RATIO, 10 attempts, whole
    image as fallback) from TF's own op: (offset_y, offset_x, height, width)."""
    from disco_jax.data._tf import tf

    begin, size, _ = tf.image.sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), min_object_covered=0.0,
        aspect_ratio_range=RRC_RATIO, area_range=CROP_SCALE, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return begin[0], begin[1], size[0], size[1]


def _finish(crop, image_size: int, antialias: bool = True):
    """Resize (the production's bilinear, antialiased unless --no-antialias), flip, uint8: the
    floor's per-view tail."""
    from disco_jax.data._tf import tf

    view = tf.image.resize(crop, [image_size, image_size], method="bilinear",
                           antialias=antialias)
    view = tf.image.random_flip_left_right(view)
    return tf.ensure_shape(_to_uint8(view), [image_size, image_size, 3])


def floor_dataset(source, case: str, batch: int, image_size: int, threads: int,
                  antialias: bool = True):
    """The bare tf.data stream of `case` (floor_2view, fused_2view, fused_1view, floor_1view)
    over the source's encoded records: decode (+ crop) + resize + flip, batched."""
    from disco_jax.data._tf import no_autograph, tf

    views, fused = CASES[case]["views"], case.startswith("fused")

    def full(jpeg):
        image = tf.io.decode_jpeg(jpeg, channels=3)
        out = []
        for _ in range(views):
            y, x, h, w = _crop_window(tf.shape(image))
            out.append(_finish(tf.slice(image, tf.stack([y, x, 0]), tf.stack([h, w, 3])),
                               image_size, antialias))
        return out

    def fused_crops(jpeg):
        shape = tf.image.extract_jpeg_shape(jpeg)
        out = []
        for _ in range(views):
            window = tf.stack(_crop_window(shape))
            out.append(_finish(tf.image.decode_and_crop_jpeg(jpeg, window, channels=3),
                               image_size, antialias))
        return out

    make = fused_crops if fused else full

    def prepare(ex):
        out = make(ex["image"])
        if views == 1:
            return {"image": out[0], "label": ex["label"]}
        return {"view1": out[0], "view2": out[1], "label": ex["label"]}

    ds = source.dataset(SPLIT, decode=False).repeat()
    ds = ds.map(no_autograph(prepare), num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_tf_options(threads))


def train_stream(source, views: int, batch: int, image_size: int, threads: int,
                 fused_decode: bool = False, antialias: bool = True):
    """The production training stream, as `train.train_stream` builds it for one process."""
    from disco_jax import data

    ds = data.train_dataset(source, split=SPLIT, views=views, image_size=image_size,
                            crop_scale=CROP_SCALE, flip_p=FLIP_P, local_batch=batch, seed=SEED,
                            fused_decode=fused_decode, antialias=antialias)
    return ds.with_options(_tf_options(threads))


# ---------------------------------------------------------------------------------------------
# Timing


class Reporter:
    """Progress lines on stderr with the case's and the suite's ETA."""

    def __init__(self, planned_s: list[float]):
        self.planned = list(planned_s)  # expected seconds of each case still to run
        self.t0 = time.perf_counter()

    def say(self, message: str) -> None:
        print(f"[host] {message}", file=sys.stderr, flush=True)

    def suite_eta(self, case_left_s: float | None = None) -> str:
        """ETA of the suite: what is left of the current case (None: all of it) and the rest."""
        from disco_jax.eval.common import format_eta

        if case_left_s is None:
            return format_eta(sum(self.planned))
        return format_eta(case_left_s + sum(self.planned[1:]))

    def next_case(self) -> None:
        if self.planned:
            self.planned.pop(0)


def time_stream(ds, case: str, batch: int, warmup: int, seconds: float, cores: int,
                report: Reporter) -> dict[str, Any]:
    """Steady-state source images/s of a batched stream: `warmup` batches untimed (tracing,
    buffers, autotuning), then batches for `seconds` of wall time."""
    it = ds.as_numpy_iterator()
    t_start = time.perf_counter()
    for _ in range(warmup):
        next(it)
    warmup_s = time.perf_counter() - t_start
    batches, cpu0, t0 = 0, _cpu_s(), time.perf_counter()
    last = t0
    while True:
        next(it)
        batches += 1
        now = time.perf_counter()
        elapsed = now - t0
        if elapsed >= seconds:
            break
        if now - last >= PROGRESS_EVERY_S:
            last = now
            rate = batches * batch / elapsed
            report.say(f"  {case}: {elapsed:.0f}/{seconds:.0f} s, {batches * batch} img,"
                       f" {rate:.0f} img/s ({rate / cores:.0f}/core), suite ETA"
                       f" {report.suite_eta(seconds - elapsed)}")
    cpu_s = _cpu_s() - cpu0
    del it
    gc.collect()  # the iterator's threads and buffers go before the next case starts
    rate = batches * batch / elapsed
    return {
        "img_per_sec": rate,
        "img_per_sec_per_core": rate / cores,
        "seconds": elapsed,
        "images": batches * batch,
        "warmup_s": warmup_s,
        "cpu_s": cpu_s,
        "cpu_util": cpu_s / (elapsed * cores),
    }


def time_augment(batch: int, image_size: int, dtype: str, seconds: float, steps: int,
                 report: Reporter) -> dict[str, Any]:
    """ms per jitted `mocov2_augment` call on a (batch, S, S, 3) uint8 array on the first local
    device (uniform random pixels: every op runs on every image, so the cost does not depend
    on the content)."""
    import functools

    import jax
    import jax.numpy as jnp

    from disco_jax.data import mocov2_augment

    device = jax.local_devices()[0]
    pixels = np.random.default_rng(SEED).integers(0, 256, (batch, image_size, image_size, 3),
                                                  dtype=np.uint8)
    images = jax.device_put(pixels, device)
    key = jax.device_put(jax.random.PRNGKey(SEED), device)
    fn = jax.jit(functools.partial(mocov2_augment, out_dtype=jnp.dtype(dtype)))
    t0 = time.perf_counter()
    step = fn.lower(key, images).compile()
    compile_s = time.perf_counter() - t0
    for i in range(AUG_WARMUP_CALLS):
        jax.block_until_ready(step(jax.random.fold_in(key, i), images))
    keys = [jax.random.fold_in(key, 100 + i) for i in range(steps)]
    jax.block_until_ready(keys)
    times: list[float] = []
    last = time.perf_counter()
    while len(times) < steps and (sum(times) < seconds or len(times) < 3):
        t = time.perf_counter()
        jax.block_until_ready(step(keys[len(times)], images))
        now = time.perf_counter()
        times.append(now - t)
        if now - last >= PROGRESS_EVERY_S:
            last = now
            report.say(f"  device_augment: {len(times)} calls, {1e3 * np.median(times):.1f}"
                       f" ms/batch, suite ETA {report.suite_eta(seconds - sum(times))}")
    median = float(np.median(times))
    return {
        "img_per_sec": batch / median,
        "seconds": float(sum(times)),
        "images": batch * len(times),
        "calls": len(times),
        "ms_per_batch_median": 1e3 * median,
        "ms_per_batch_p90": 1e3 * float(np.percentile(times, 90)),
        "ms_per_source_batch_two_views": 2e3 * median,
        "source_img_per_sec_two_views": batch / (2.0 * median),
        "compile_s": compile_s,
        "out_dtype": dtype,
        "device_kind": device.device_kind,
        "platform": device.platform,
    }


# ---------------------------------------------------------------------------------------------
# The suite


def _targets(case: str, record: dict[str, Any]) -> None:
    targets: dict[str, float] = {}
    if case == "train_2view":
        targets["img_per_sec_per_core"] = TARGET_PER_CORE
    if case.startswith("train_"):
        targets["ratio_to_floor"] = TARGET_RATIO
    if targets:
        record["targets"] = targets
        record["meets_target"] = {k: bool(record[k] >= v) for k, v in targets.items()}


def _plan(opts: dict[str, Any]) -> list[float]:
    """Rough seconds each case takes (for ETAs): warmup, timed window, compile for the aug."""
    return [opts["seconds"] + (10.0 if c == "device_augment" else 2.0)
            for c in opts["host_cases"]]


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(records: list[dict[str, Any]]) -> str:
    """The records as a Markdown table (rates in source images/s; device_augment in views/s)."""
    head = ("| case | views | img/s | img/s/core | ratio | floor | cpu util | target met |\n"
            "|---|---|---|---|---|---|---|---|")
    rows = [head]
    for r in records:
        met = r.get("meets_target")
        met_s = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in met.items()) if met else "-"
        if r["case"] == "device_augment":
            met_s = (f"{r['ms_per_batch_median']:.1f} ms / batch {r['batch']} (p90"
                     f" {r['ms_per_batch_p90']:.1f}) on {r['device_kind']}")
        rows.append(f"| {r['case']} | {r['views']} | {r['img_per_sec']:.1f} |"
                    f" {_cell(r['img_per_sec_per_core'], '.1f')} |"
                    f" {_cell(r['ratio_to_floor'], '.3f')} | {r['floor_case'] or '-'} |"
                    f" {_cell(r.get('cpu_util'), '.2f')} | {met_s} |")
    return "\n".join(rows)


def run(out_dir: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Runs the host suite; writes out_dir/host_bench.json, prints the table, returns the
    records. Bad options raise a one-line ConfigError before anything is made or written."""
    opts = options(args)
    import jax

    from disco_jax.data import get_source
    from disco_jax.data._tf import tf

    cores_available = available_cores()
    threads = opts["threads"]
    cores = min(threads, cores_available) if threads else cores_available
    report = Reporter(_plan(opts))
    report.say(f"cases {', '.join(opts['host_cases'])}: ~{opts['seconds']:.0f} s timed each on"
               f" {cores} core(s) ({cores_available} available), suite ETA"
               f" {report.suite_eta()} after the JPEGs")
    tmp = None
    data_dir = opts["host_data_dir"]
    if data_dir is None:
        tmp = data_dir = tempfile.mkdtemp(prefix="disco-host-bench-")
    os.makedirs(data_dir, exist_ok=True)
    try:
        meta = make_jpeg_dataset(data_dir, opts, report.say)
        source = get_source({"name": meta["name"], "data_dir": data_dir})
        records = _run_cases(opts, source, meta, cores, cores_available, report)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    common = {"tf_version": tf.__version__, "jax_version": jax.__version__}
    for r in records:
        r.update(common)
    setup = {
        "cpu_model": _cpu_model(), "cores_available": cores_available, "cores": cores,
        "threads": threads, "host_cpus": os.cpu_count(), "dataset": meta,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "crop_scale": list(CROP_SCALE), "flip_p": FLIP_P, "antialias": opts["antialias"],
        **common,
        "note": ("rates are source images/s (a two-view image counts once); per core over"
                 " `cores`; device_augment's img_per_sec is views/s"),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_bench.json").write_text(
        json.dumps({"records": records, "setup": setup}, indent=2) + "\n")
    print(f"host pipeline, {cores} core(s) of {setup['cpu_model']}, {meta['images']} JPEGs of"
          f" {meta['mean_jpeg_bytes'] / 1e3:.1f} KB mean (quality {meta['jpeg_quality']}),"
          f" batch {opts['host_batch']}, {opts['host_image_size']} px")
    print(table(records))
    print(f"wrote {out / 'host_bench.json'}")
    return records


def _run_cases(opts: dict[str, Any], source, meta: dict[str, Any], cores: int,
               cores_available: int, report: Reporter) -> list[dict[str, Any]]:
    batch, size, threads = opts["host_batch"], opts["host_image_size"], opts["threads"]
    by_case: dict[str, dict[str, Any]] = {}
    for i, case in enumerate(opts["host_cases"]):
        spec = CASES[case]
        report.say(f"case {i + 1}/{len(opts['host_cases'])} {case}: {spec['what']};"
                   f" suite ETA {report.suite_eta()}")
        record: dict[str, Any] = {"bench": BENCH, "case": case, "what": spec["what"],
                                  "views": spec["views"], "image_size": size,
                                  "mean_jpeg_bytes": meta["mean_jpeg_bytes"],
                                  "jpeg_quality": meta["jpeg_quality"]}
        if case == "device_augment":
            aug_batch = opts["aug_batch"] or AUG_BATCH_AUTO[_device_class()]
            record.update(batch=aug_batch, cores=None, img_per_sec_per_core=None)
            record.update(time_augment(aug_batch, size, opts["aug_dtype"], opts["seconds"],
                                       opts["steps"], report))
            if record["platform"] == "cpu":  # the CPU cores are the device here
                record.update(cores=cores_available,
                              img_per_sec_per_core=record["img_per_sec"] / cores_available)
        else:
            if case.startswith("train_"):
                ds = train_stream(source, spec["views"], batch, size, threads,
                                  fused_decode=case.endswith("_fused"),
                                  antialias=opts["antialias"])
            else:
                ds = floor_dataset(source, case, batch, size, threads, opts["antialias"])
            record.update(batch=batch, cores=cores, threads=threads)
            record.update(time_stream(ds, case, batch, opts["host_warmup"], opts["seconds"],
                                      cores, report))
            del ds
        floor = spec["floor"]
        record["floor_case"] = floor
        record["ratio_to_floor"] = (record["img_per_sec"] / by_case[floor]["img_per_sec"]
                                    if floor else None)
        _targets(case, record)
        by_case[case] = record
        report.next_case()
        ratio = (f", {record['ratio_to_floor']:.2f} of {floor}" if floor else "")
        report.say(f"  {case}: {record['img_per_sec']:.1f} img/s{ratio}")
    return list(by_case.values())


def _device_class() -> str:
    import jax

    return "cpu" if jax.local_devices()[0].platform == "cpu" else "accelerator"


# ---------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one `error:` line and exit 2, as every disco_jax CLI
        from disco_jax.cli import fail

        fail(message)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The host suite's flags (all but --out and --steps), for this script and the driver."""
    d = DEFAULTS
    p.add_argument("--images", type=int, default=d["images"],
                   help="distinct JPEGs to make (the stream cycles through them)")
    p.add_argument("--seconds", type=float, default=d["seconds"],
                   help="timed wall seconds per case, after the warm-up")
    p.add_argument("--warmup", dest="host_warmup", type=int, default=d["host_warmup"],
                   help="untimed batches per stream case")
    p.add_argument("--threads", type=int, default=d["threads"],
                   help="tf.data threads (private pool and autotune budget); 0: TF's default,"
                        " all available cores")
    p.add_argument("--batch", dest="host_batch", type=int, default=d["host_batch"],
                   help="source images per host batch")
    p.add_argument("--image-size", dest="host_image_size", type=int,
                   default=d["host_image_size"], help="side of the crops, px")
    p.add_argument("--jpeg-size", dest="jpeg_size", default=d["jpeg_size"],
                   help="WIDTHxHEIGHT of the landscape JPEGs (every fourth is portrait)")
    p.add_argument("--jpeg-kb", dest="jpeg_kb", type=float, default=d["jpeg_kb"],
                   help="target mean JPEG size in KB (the quality is tuned to it)")
    p.add_argument("--aug-batch", dest="aug_batch", type=int, default=d["aug_batch"],
                   help="crops per device_augment call; 0: 32 on CPU, 256 on an accelerator")
    p.add_argument("--aug-dtype", dest="aug_dtype", default=None,
                   help="device_augment output dtype (default: float32)")
    p.add_argument("--cases", dest="host_cases", default=d["host_cases"],
                   help=f"comma-separated subset of {', '.join(CASES)} (floors are added)")
    p.add_argument("--no-antialias", dest="antialias", action="store_false", default=True,
                   help="resize every crop with plain bilinear (data.antialias=False), floors"
                        " included; default: antialiased, as PIL and the production default")
    p.add_argument("--data-dir", dest="host_data_dir", default=None,
                   help="keep the JPEG dataset here and reuse it (default: a temporary dir)")


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="python -m disco_jax.bench.host", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for host_bench.json")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"],
                   help="the most timed device_augment calls")
    add_arguments(p)
    return p.parse_args(None if argv is None else list(argv))


def main(argv: Iterable[str] | None = None) -> list[dict[str, Any]]:
    from disco_jax.cli import fail, quiet_start

    quiet_start()
    args = parse_args(argv)
    try:
        return run(args.out, args)
    except ConfigError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
