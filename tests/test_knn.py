"""Sharded weighted kNN (`knn_topk`) against an independent NumPy reference, across meshes."""

import jax.numpy as jnp
import numpy as np
import pytest

from disco_jax.errors import ConfigError
from disco_jax.eval.knn import compiled_step, knn_accuracy, knn_topk, shard_bank
from disco_jax.sharding import make_mesh

TEMP = 0.07


def clustered(seed: int, n_bank: int, n_query: int, num_classes: int, dim: int = 24):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, dim))
    bank_y = rng.integers(0, num_classes, n_bank)
    query_y = rng.integers(0, num_classes, n_query)
    bank = (centers[bank_y] + 2.0 * rng.normal(size=(n_bank, dim))).astype(np.float32)
    query = (centers[query_y] + 2.0 * rng.normal(size=(n_query, dim))).astype(np.float32)
    return bank, bank_y, query, query_y


def np_knn(bank, bank_y, query, query_y, ks, num_classes, temp=TEMP):
    """float64 argsort + explicit weighted vote; also checks the data has no near-ties, so
    float32 vs float64 rounding cannot change a neighbour set or a vote ranking."""
    a = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    b = query / np.linalg.norm(query, axis=1, keepdims=True)
    sims = b.astype(np.float64) @ a.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")
    ranked = np.take_along_axis(sims, order, axis=1)
    rows = np.arange(len(query))[:, None]
    out = {}
    for k in ks:
        kk = min(k, len(bank))
        if kk < len(bank):  # k-th and (k+1)-th apart by >> float32 rounding of a 24-d dot
            assert np.min(ranked[:, kk - 1] - ranked[:, kk]) > 1e-6
        votes = np.zeros((len(query), num_classes))
        np.add.at(votes, (rows, bank_y[order[:, :kk]]), np.exp(ranked[:, :kk] / temp))
        m = min(5, num_classes)
        top = np.argsort(-votes, axis=1, kind="stable")[:, :m]
        # The ranks that decide top-1 (1st vs 2nd) and top-5 membership (m-th vs (m+1)-th) are
        # well apart relative to the largest vote; only exact zeros (no vote) may tie.
        head = -np.sort(-votes, axis=1)
        for r in {0, m - 1} & set(range(num_classes - 1)):
            gap = (head[:, r] - head[:, r + 1]) / head[:, 0]
            assert np.all((gap > 1e-5) | (head[:, r] == 0))
        # Same count -> percent formula as knn_topk, so equal counts compare equal exactly.
        hit = top == query_y[:, None]
        out[f"top1_k{k}"] = 100.0 * int(np.sum(hit[:, 0])) / len(query_y)
        out[f"top5_k{k}"] = 100.0 * int(np.sum(hit.any(axis=1))) / len(query_y)
    return out


# Bank 501 rows (not a multiple of 8: padding), 203 queries (not a multiple of the chunk: a
# masked last chunk); k=200 exceeds the 63 rows of a shard, so the global merge matters.
KS = (1, 5, 20, 200)


@pytest.fixture(scope="module")
def data():
    return clustered(2, 501, 203, 10)  # a seed whose data passes np_knn's no-near-tie checks


@pytest.fixture(scope="module")
def eight(data):
    return knn_topk(*data, num_classes=10, ks=KS, mesh=make_mesh(8), chunk=64)


def test_matches_numpy_reference(data, eight):
    want = np_knn(*data, KS, 10)
    assert eight == want
    assert list(eight) == [f"top{t}_k{k}" for k in KS for t in (1, 5)]
    assert 30 < eight["top1_k20"] < 100 and eight["top5_k20"] > eight["top1_k20"]


def test_one_device_equals_eight(data, eight):
    assert knn_topk(*data, num_classes=10, ks=KS, mesh=None, chunk=64) == eight
    # jax.Array input (padded and normalised on the mesh instead of placed from the host)
    on_device = [jnp.asarray(x) for x in data]
    assert knn_topk(*on_device, num_classes=10, ks=KS, mesh=make_mesh(8), chunk=64) == eight


def test_k_larger_than_bank_and_few_classes():
    bank, bank_y, query, query_y = clustered(1, 13, 37, 3)
    got = knn_topk(bank, bank_y, query, query_y, num_classes=3, ks=(13, 50), mesh=make_mesh(8))
    want = np_knn(bank, bank_y, query, query_y, (13,), 3)
    assert got["top1_k50"] == got["top1_k13"] == want["top1_k13"]
    assert got["top5_k50"] == got["top5_k13"] == 100.0  # min(5, 3) classes: always a hit


def test_padding_rows_never_chosen():
    # Every real row has cosine ~ -1 to every query, so a zero padding row (13 rows on 8
    # devices: 3 of them) would be the nearest neighbour if it were not masked.
    rng = np.random.default_rng(5)
    u = rng.normal(size=16)
    bank = (u + 0.3 * rng.normal(size=(13, 16))).astype(np.float32)
    query = (-u + 0.3 * rng.normal(size=(9, 16))).astype(np.float32)
    bank_y, query_y = rng.integers(0, 4, 13), rng.integers(0, 4, 9)
    got = knn_topk(bank, bank_y, query, query_y, num_classes=4, ks=(3, 13), mesh=make_mesh(8))
    assert got == np_knn(bank, bank_y, query, query_y, (3, 13), 4)
    assert got == knn_topk(bank, bank_y, query, query_y, num_classes=4, ks=(3, 13), mesh=None)


def test_knn_accuracy_wrapper():
    bank, bank_y, query, query_y = clustered(2, 120, 30, 4)
    want = np_knn(bank, bank_y, query, query_y, (7,), 4)["top1_k7"]
    assert knn_accuracy(bank, bank_y, query, query_y, num_classes=4, k=7, chunk=16) == want


@pytest.mark.parametrize(
    "kwargs",
    [{"temp": 0.0}, {"temp": -1.0}, {"temp": float("nan")}, {"ks": (10, 0)}, {"ks": (2.5,)},
     {"ks": ()}, {"ks": (True,)}],
)
def test_bad_settings_raise_config_error(kwargs):
    bank, bank_y, query, query_y = clustered(3, 16, 4, 2)
    with pytest.raises(ConfigError) as err:
        knn_topk(bank, bank_y, query, query_y, num_classes=2, **kwargs)
    assert "\n" not in str(err.value)


def test_bank_is_sharded_per_device_memory():
    """XLA's per-device footprint of the compiled chunk step: with 8 devices the bank term is
    an eighth, so arguments + temporaries stay well under a quarter of the bank."""
    n, dim, chunk, kmax, classes = 4099, 128, 32, 20, 10
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    bank_bytes = feats.nbytes

    def per_device(devices: int) -> int:
        bank = shard_bank(feats, labels, make_mesh(devices))
        shard = bank.feats.addressable_shards[0].data
        assert shard.shape == (-(-n // devices), dim)  # each device holds only its rows
        mem = compiled_step(bank, num_classes=classes, ks=(10, kmax), chunk=chunk)
        stats = mem.memory_analysis()
        return stats.argument_size_in_bytes + stats.temp_size_in_bytes

    n_local = -(-n // 8)
    # query chunk, (chunk, n/8) similarities, (chunk, 8 * kmax) candidates, votes: generous
    chunk_terms = 8 * chunk * (dim + n_local + 8 * kmax + classes)
    one, eight = per_device(1), per_device(8)
    assert one > bank_bytes  # one device holds the whole bank
    assert eight < bank_bytes / 4 + chunk_terms < one
