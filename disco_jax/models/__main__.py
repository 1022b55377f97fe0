"""Print every architecture with its parameter count and cost at its native resolution.

Run as ``python -m disco_jax.models``. ImageNet models: 224 px, 1000 classes; MCL's CIFAR nets:
32 px, 100 classes (CIFAR-100), as marked in the output. Shapes come from `jax.eval_shape`, so
nothing is allocated; FLOPs come from XLA's cost analysis of the lowered (not compiled) eval
forward.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from disco_jax.models import _MODELS, cifar, create, list_models

# (image size, classes) per family; everything else is an ImageNet model.
_CIFAR = (32, 100)
_IMAGENET = (224, 1000)


def native_setting(name: str) -> tuple[int, int]:
    """(image size, num_classes) an architecture is reported at."""
    func = _MODELS[name].func
    return _CIFAR if func in (cifar.CifarResNet, cifar.WideResNet) else _IMAGENET


def _flops(model: nn.Module, variables: dict, x: jax.ShapeDtypeStruct) -> float | None:
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    try:
        cost = apply.lower(variables, x).cost_analysis()
    except Exception:  # cost analysis is optional and backend dependent
        return None
    if isinstance(cost, list):  # older jax returned one dict per device
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def main() -> None:
    print(f"{'model':<24} {'params':>12} {'GFLOPs':>8} {'GMACs':>7}  input")
    for name in list_models():
        size, classes = native_setting(name)
        x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        model = create(name, num_classes=classes)
        variables = jax.eval_shape(model.init, jax.random.key(0), x)
        params = sum(p.size for p in jax.tree.leaves(variables["params"]))
        flops = _flops(model, variables, x)
        cost = "     n/a     n/a" if flops is None else f"{flops / 1e9:8.2f} {flops / 2e9:7.2f}"
        print(f"{name:<24} {params:>12,} {cost}  {size} px, {classes} classes")
    # XLA counts a multiply-add as 2 FLOPs; torchvision's "GFLOPS" column counts it once.
    print(
        "GFLOPs: XLA's estimate for one image at the listed size (ImageNet models 224 px /"
        " 1000 classes, MCL's CIFAR nets 32 px / 100 classes); GMACs = GFLOPs / 2."
    )


if __name__ == "__main__":
    main()
