"""Print every architecture with its parameter count and cost at 224 px.

Run as ``python -m disco_jax.models``. Shapes come from `jax.eval_shape`, so nothing is
allocated; FLOPs come from XLA's cost analysis of the lowered (not compiled) eval forward.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from disco_jax.models import create, list_models


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
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    print(f"{'model':<20} {'params':>12} {'GFLOPs':>8} {'GMACs':>7}")
    for name in list_models():
        model = create(name, num_classes=1000)
        variables = jax.eval_shape(model.init, jax.random.key(0), x)
        params = sum(p.size for p in jax.tree.leaves(variables["params"]))
        flops = _flops(model, variables, x)
        cost = "n/a" if flops is None else f"{flops / 1e9:8.2f} {flops / 2e9:7.2f}"
        print(f"{name:<20} {params:>12,} {cost}")
    # XLA counts a multiply-add as 2 FLOPs; torchvision's "GFLOPS" column counts it once.
    print("GFLOPs: XLA's estimate for one 224 px image; GMACs = GFLOPs / 2.")


if __name__ == "__main__":
    main()
