import json

import numpy as np
import pytest
import scipy.linalg

from fdpipe.evaluate import (evaluate_variant, fdrk, frechet_distance_of_file, inception_score,
                             validation_fds, write_stats)
from fdpipe.frechet import StatisticsError
from fdpipe.report import aggregate
from fdpipe.stats import GaussianStats
from fdpipe.store import write_features


def sqrtm_fd(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def feature_file(path, features, space="pixels", **attrs):
    write_features(path, features.astype(np.float32), np.zeros(len(features), np.int64),
                   space=space, **attrs)
    return path


def test_fd_matches_sqrtm_reference():
    rng = np.random.default_rng(0)
    for d in (3, 16, 64):
        a, b = rng.normal(size=(d, 2 * d)), rng.normal(size=(d, 2 * d))
        s1, s2 = a @ a.T / d, b @ b.T / d
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        ref = GaussianStats(mu2, s2, 0)
        fd = ref.frechet_distance_to(mu1, s1)
        assert fd == pytest.approx(sqrtm_fd(mu1, s1, mu2, s2), rel=1e-6)


def test_fd_of_own_statistics_is_tiny(tmp_path):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(3000, 32)) * rng.uniform(0.1, 3, size=32) + 5.0
    path = feature_file(tmp_path / "f.h5", features)
    stats = write_stats(path, tmp_path / "s.npz")
    fd, n, _ = frechet_distance_of_file(path, tmp_path / "s.npz")
    assert n == 3000
    assert fd < 1e-6 * np.trace(stats.sigma)


def test_stats_wrong_dimension_message(tmp_path):
    rng = np.random.default_rng(2)
    write_stats(feature_file(tmp_path / "a.h5", rng.normal(size=(100, 8))), tmp_path / "s.npz")
    other = feature_file(tmp_path / "b.h5", rng.normal(size=(100, 6)))
    with pytest.raises(StatisticsError) as err:
        frechet_distance_of_file(other, tmp_path / "s.npz")
    message = str(err.value)
    assert "s.npz" in message
    assert "dimension 8" in message
    assert "6-d" in message
    assert "fdpipe stats" in message


def test_stats_from_other_space_rejected(tmp_path):
    rng = np.random.default_rng(3)
    write_stats(feature_file(tmp_path / "a.h5", rng.normal(size=(50, 4)), space="mae"),
                tmp_path / "s.npz")
    other = feature_file(tmp_path / "b.h5", rng.normal(size=(50, 4)), space="classifier")
    with pytest.raises(StatisticsError, match="'mae'"):
        frechet_distance_of_file(other, tmp_path / "s.npz")


def test_inception_score_closed_forms():
    uniform = np.zeros((1000, 10))
    assert inception_score(uniform, splits=1)[0] == pytest.approx(1.0)
    # Confident and balanced over K classes: IS = K.
    confident = np.full((1000, 10), -50.0)
    confident[np.arange(1000), np.arange(1000) % 10] = 50.0
    assert inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-9)


def test_inception_score_brute_force():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(200, 5)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    marginal = p.mean(0)
    expected = np.exp(np.mean(np.sum(p * np.log(p / marginal), axis=1)))
    assert inception_score(logits, splits=1)[0] == pytest.approx(expected, rel=1e-10)


def test_fdrk_is_mean_and_needs_all_spaces():
    assert fdrk({"a": 1.0, "b": 3.0, "c": 100.0}, ["a", "b"]) == 2.0
    with pytest.raises(KeyError, match="d"):
        fdrk({"a": 1.0}, ["a", "d"])


def test_evaluate_and_aggregate(tmp_path):
    rng = np.random.default_rng(5)
    spaces = ["s1", "s2"]
    evals = []
    for space in spaces:
        train = feature_file(tmp_path / f"train_{space}.h5", rng.normal(size=(2000, 4)), space)
        write_stats(train, tmp_path / f"{space}.npz")
        feature_file(tmp_path / f"val_{space}.h5", rng.normal(size=(500, 4)), space)
    valfd = validation_fds({s: (str(tmp_path / f"val_{s}.h5"), str(tmp_path / f"{s}.npz"))
                            for s in spaces})
    (tmp_path / "valfd.json").write_text(json.dumps(valfd))
    for variant, shift in (("good", 0.1), ("bad", 1.0)):
        for space in spaces:
            feats = feature_file(tmp_path / f"{variant}_{space}.h5",
                                 rng.normal(size=(500, 4)) + shift, space)
            result = evaluate_variant(feats, tmp_path / f"{space}.npz", tmp_path / "valfd.json",
                                      space)
            assert result["fdr"] == pytest.approx(result["fd"] / valfd[space]["fd"])
            out = tmp_path / "eval" / variant / f"{space}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result))
            evals.append(out)
    rows = aggregate(evals, spaces, spaces, tmp_path / "t.csv", tmp_path / "t.md",
                     tmp_path / "f.png", variants={"good": {"steps": 1}, "bad": {"steps": 1}})
    assert [r["variant"] for r in rows] == ["good", "bad"]
    assert rows[0]["fdr_k"] == pytest.approx(np.mean([rows[0]["fdr_s1"], rows[0]["fdr_s2"]]))
    markdown = (tmp_path / "t.md").read_text()
    assert markdown.index("| good") < markdown.index("| bad")
    assert (tmp_path / "t.csv").read_text().splitlines()[0].startswith("variant,steps,n,fdr_k")
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_published_normalisers_replace_computed(tmp_path):
    rng = np.random.default_rng(6)
    train = feature_file(tmp_path / "train.h5", rng.normal(size=(1000, 3)), "s1")
    write_stats(train, tmp_path / "s1.npz")
    val = feature_file(tmp_path / "val.h5", rng.normal(size=(300, 3)), "s1")
    computed = validation_fds({"s1": (str(val), str(tmp_path / "s1.npz"))})
    fixed = validation_fds({"s1": (str(val), str(tmp_path / "s1.npz"))}, published={"s1": 1.68})
    assert fixed["s1"]["fd"] == 1.68
    assert fixed["s1"]["source"] == "published"
    assert fixed["s1"]["computed_fd"] == pytest.approx(computed["s1"]["fd"])
    with pytest.raises(KeyError, match="published_normalisers"):
        validation_fds({"s1": (str(val), str(tmp_path / "s1.npz"))}, published={"s2": 1.0})
