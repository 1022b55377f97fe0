"""kNN and linear probe against independent references."""

import numpy as np

from disco_jax.eval import knn_accuracy, linear_probe


def np_weighted_knn(train_f, train_y, test_f, k, temp, num_classes):
    a = train_f / np.linalg.norm(train_f, axis=1, keepdims=True)
    b = test_f / np.linalg.norm(test_f, axis=1, keepdims=True)
    sims = b @ a.T
    preds = []
    for row in sims:
        idx = np.argsort(-row)[:k]
        votes = np.zeros(num_classes)
        for i in idx:
            votes[train_y[i]] += np.exp(row[i] / temp)
        preds.append(votes.argmax())
    return np.array(preds)


def test_knn_matches_numpy_reference():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16))
    train_y = rng.integers(0, 5, 300)
    test_y = rng.integers(0, 5, 97)
    train_f = centers[train_y] + 1.5 * rng.normal(size=(300, 16))
    test_f = centers[test_y] + 1.5 * rng.normal(size=(97, 16))
    want = 100 * np.mean(np_weighted_knn(train_f, train_y, test_f, 20, 0.07, 5) == test_y)
    got = knn_accuracy(train_f, train_y, test_f, test_y, num_classes=5, k=20, temp=0.07, chunk=40)
    assert abs(got - want) < 1e-9
    assert 30 < got < 100  # informative but not trivial


def test_linear_probe_learns_and_is_scale_free():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(32, 4))
    x = rng.normal(size=(600, 32))
    y = np.argmax(x @ w, axis=1)
    acc = linear_probe(x[:500], y[:500], x[500:], y[500:], num_classes=4, epochs=30, lr=0.1)
    assert acc > 85
    # Tiny features (an untrained MobileNetV3 in eval mode gives ~1e-9) must not break it.
    tiny = linear_probe(1e-9 * x[:500], y[:500], 1e-9 * x[500:], y[500:], num_classes=4,
                        epochs=30, lr=0.1)
    assert abs(tiny - acc) < 2
    shuffled = linear_probe(x[:500], rng.permutation(y[:500]), x[500:], y[500:], num_classes=4,
                            epochs=30, lr=0.1)
    assert shuffled < 50
