"""The network's own classifier: top-1 / top-5 on the test split (Resize 256 / CenterCrop 224).

For supervised and SSLD students (PaddleClas's MobileNetV3-L 78.9 after SSLD, methods.md §5.3)
and MCL cohorts (every network, the best one and the softmax ensemble, as winycg/MCL's
`main_cifar.py` reports: ResNet-32 x2 72.96 on CIFAR-100, methods.md §4.6), plus the kNN.

    python -m disco_jax.evaluate --workdir runs/mcl_r32x2 --config configs/eval/classifier.py

Variants: `:smoke` (what the tests run).
"""

import ml_collections as mlc

from disco_jax import config_lib
from disco_jax.eval import block, protocols


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, smoke=False)
    knn = block("knn")
    if args.smoke:
        knn.ks = (1, 5)
    c = protocols.eval_config(mlc.ConfigDict({"classifier": block("classifier"),
                                                         "knn": knn}))
    c.plots = not args.smoke
    return c
