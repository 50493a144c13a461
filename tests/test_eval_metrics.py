"""Evaluation metrics on hand-checkable cases: LFW-protocol accuracy, ROC / TAR@FAR, CMC, age, synthesis."""
import numpy as np
import pytest
from PIL import Image

from mtlface_fast.eval import age as age_mod
from mtlface_fast.eval.identification import cmc, cosine_matrix, identification_metrics, identity_ranks
from mtlface_fast.eval.synthesis import contact_sheet, synthesis_metrics
from mtlface_fast.eval.verification import (best_threshold, consecutive_folds, cosine_similarity, equal_error_rate,
                                            kfold_accuracy, roc_curve, roc_png, tar_at_far, verification_metrics)


def _separable(n=200, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2 == 0
    scores = np.where(labels, rng.uniform(0.6, 1.0, n), rng.uniform(-0.2, 0.4, n))
    return scores, labels


# -- k-fold accuracy -------------------------------------------------------------------------------------------
def test_perfect_separation_is_100_percent():
    s, y = _separable()
    r = kfold_accuracy(s, y)
    assert r["accuracy"] == 1.0 and r["std"] == 0.0
    assert len(r["fold_accuracies"]) == 10 and r["fold_sizes"] == [20] * 10
    assert all(0.4 < t < 0.6 for t in r["thresholds"])


def test_swapped_labels_give_the_complement():
    # Fixed decision rule (score >= thr): swapping the labels turns every right answer wrong.
    s, y = _separable()
    thr, acc = best_threshold(s, y)
    acc_swapped = float(((s >= thr) == ~y).mean())
    assert acc == 1.0 and acc_swapped == 0.0
    # With a mixed case: accuracy a at a fixed threshold -> 1 - a with swapped labels.
    rng = np.random.default_rng(1)
    s2, y2 = rng.normal(size=101), rng.random(101) < 0.5
    a = float(((s2 >= 0.1) == y2).mean())
    assert float(((s2 >= 0.1) == ~y2).mean()) == pytest.approx(1 - a)
    # Cross-validated, the threshold is re-chosen on the other folds: on swapped labels no cut beats
    # rejecting everything, so each balanced fold scores chance (50%), never more.
    r = kfold_accuracy(s, ~y)
    assert r["fold_accuracies"] == [0.5] * 10 and r["thresholds"] == [np.inf] * 10


def test_kfold_hand_case_threshold_from_other_folds():
    # 4 pairs per fold, 2 folds. Fold 0: scores separable at 0.5; fold 1: a genuine pair at 0.45.
    s = np.array([0.9, 0.8, 0.2, 0.1, 0.9, 0.45, 0.3, 0.1])
    y = np.array([1, 1, 0, 0, 1, 1, 0, 0], dtype=bool)
    r = kfold_accuracy(s, y, n_folds=2)
    # Fold 0's threshold comes from fold 1: best cut between 0.45 and 0.3 -> 0.375; fold 0 all right.
    assert r["thresholds"][0] == pytest.approx(0.375)
    # Fold 1's threshold from fold 0: cut between 0.8 and 0.2 -> 0.5; 0.45 is then rejected: 3/4.
    assert r["thresholds"][1] == pytest.approx(0.5)
    assert r["fold_accuracies"] == [1.0, 0.75]
    assert r["accuracy"] == pytest.approx(0.875)


def test_accuracy_by_age_gap_by_hand():
    from mtlface_fast.eval.verification import accuracy_by_gap
    s = np.array([0.9, 0.4, 0.2, 0.7, 0.8, 0.1])
    y = np.array([1, 1, 0, 0, 1, 0], dtype=bool)
    gaps = np.array([2.0, 25.0, 5.0, 31.0, np.nan, 12.0])
    folds = np.array([0, 0, 0, 1, 1, 1])
    r = accuracy_by_gap(s, y, gaps, folds, {0: 0.5, 1: 0.75})
    # fold 0 (thr 0.5): right, wrong (0.4 genuine rejected), right; fold 1 (thr 0.75): right (0.7 rejected),
    # unknown gap, right
    assert r["n_unknown"] == 1
    assert r["bins"] == {"0-10": dict(n_pairs=2, n_genuine=1, accuracy=1.0),
                         "10-20": dict(n_pairs=1, n_genuine=0, accuracy=1.0),
                         "20-30": dict(n_pairs=1, n_genuine=1, accuracy=0.0),
                         "30-40": dict(n_pairs=1, n_genuine=0, accuracy=1.0)}
    with pytest.raises(ValueError, match="one entry per pair"):
        accuracy_by_gap(s, y, gaps[:2], folds, {0: 0.5, 1: 0.5})


def test_consecutive_folds_match_unshuffled_kfold_sizes():
    f = consecutive_folds(23, 10)
    assert np.bincount(f).tolist() == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert (np.diff(f) >= 0).all()
    with pytest.raises(ValueError, match="n_folds"):
        consecutive_folds(10, 1)
    with pytest.raises(ValueError, match="cannot be split"):
        consecutive_folds(3, 10)


def test_explicit_folds_are_used():
    s, y = _separable(40)
    folds = np.repeat([0, 1, 2, 3], 10)
    r = kfold_accuracy(s, y, folds=folds)
    assert r["fold_sizes"] == [10] * 4
    with pytest.raises(ValueError, match="folds"):
        kfold_accuracy(s, y, folds=folds[:-1])


# -- ROC / TAR@FAR ----------------------------------------------------------------------------------------------
def test_roc_on_constructed_scores():
    # genuine 0.9, 0.7, 0.5; impostor 0.8, 0.4, 0.3, 0.2
    s = np.array([0.9, 0.7, 0.5, 0.8, 0.4, 0.3, 0.2])
    y = np.array([1, 1, 1, 0, 0, 0, 0], dtype=bool)
    fpr, tpr, thr = roc_curve(s, y)
    np.testing.assert_allclose(thr[1:], [0.9, 0.8, 0.7, 0.5, 0.4, 0.3, 0.2])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1 / 3, 2 / 3, 1, 1, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.25, 0.25, 0.25, 0.5, 0.75, 1])
    # FAR 0.25 allows one impostor accepted: all three genuine pairs pass at threshold 0.5
    assert tar_at_far(s, y, fars=[0.25])["tar"]["0.25"] == pytest.approx(1.0)
    # FAR 0.1 (< 1/4) allows none: only the genuine 0.9 is above every impostor
    t = tar_at_far(s, y, fars=[0.1], min_impostors_per_far=0.1)
    assert t["tar"]["1e-01"] == pytest.approx(1 / 3) and t["threshold"]["1e-01"] == pytest.approx(0.9)
    # ...but 4 impostors cannot resolve 1e-1 at the default resolution rule (far * n_impostor >= 1)
    t = tar_at_far(s, y, fars=[0.1])
    assert "1e-01" in t["skipped"] and "1e-01" not in t["tar"]
    assert equal_error_rate(s, y) == pytest.approx(0.25)


def test_tar_at_far_skips_unresolvable_fars():
    s, y = _separable(2000)
    t = tar_at_far(s, y)  # 1000 impostors: 1e-2 and 1e-3 resolvable, 1e-4..1e-6 not
    assert set(t["tar"]) == {"1e-02", "1e-03"} and set(t["skipped"]) == {"1e-04", "1e-05", "1e-06"}
    assert t["tar"]["1e-03"] == 1.0


def test_tar_at_far_with_ties_never_exceeds_far():
    s = np.array([0.5] * 10 + [0.5] * 10)
    y = np.array([True] * 10 + [False] * 10)
    t = tar_at_far(s, y, fars=[0.1])
    assert t["tar"]["1e-01"] == 0.0  # accepting the tie would accept every impostor


def test_verification_metrics_bundle():
    s, y = _separable(400)
    m = verification_metrics(s, y)
    assert m["accuracy"] == 1.0 and m["auc"] == pytest.approx(1.0) and m["eer"] == 0.0
    assert m["n_genuine"] == m["n_impostor"] == 200


def test_metric_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        kfold_accuracy([], [])
    with pytest.raises(ValueError, match="same shape"):
        kfold_accuracy([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="NaN"):
        roc_curve([0.1, np.nan], [1, 0])
    with pytest.raises(ValueError, match="genuine and impostor"):
        roc_curve([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="labels"):
        roc_curve([0.1, 0.2], [2, 0])
    with pytest.raises(ValueError, match="fars"):
        tar_at_far([0.1, 0.2], [1, 0], fars=[2.0])


def test_cosine_similarity():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    np.testing.assert_allclose(cosine_similarity(a, b), [1.0, 0.0, -1.0])
    with pytest.raises(ValueError):
        cosine_similarity(a, b[:2])


def test_roc_png(tmp_path):
    s, y = _separable(300)
    s = s + np.random.default_rng(0).normal(0, 0.2, s.size)
    fpr, tpr, _ = roc_curve(s, y)
    out = roc_png(str(tmp_path / "roc.png"), {"a": (fpr, tpr), "b": (fpr, np.sqrt(tpr))})
    img = np.asarray(Image.open(out))
    assert img.shape == (480, 640, 3)
    # both curve colours are drawn
    for color in ((31, 119, 180), (214, 39, 40)):
        assert (img == color).all(-1).sum() > 100
    with pytest.raises(ValueError):
        roc_png(str(tmp_path / "x.png"), {})


# -- identification ---------------------------------------------------------------------------------------------
def test_cmc_on_constructed_similarity_matrix():
    # 4 probes, gallery of identities A, B, C (C has two images).
    g_ids = ["A", "B", "C", "C"]
    sim = np.array([
        [0.9, 0.1, 0.2, 0.3],   # probe A: rank 1
        [0.8, 0.5, 0.1, 0.0],   # probe B: A beats B -> rank 2
        [0.7, 0.6, 0.1, 0.5],   # probe C: best C image 0.5 < A, B -> rank 3
        [0.1, 0.2, 0.3, 0.9],   # probe C: rank 1 via its second image
    ])
    r = identity_ranks(sim, ["A", "B", "C", "C"], g_ids)
    assert r["ranks"].tolist() == [1, 2, 3, 1] and r["n_identities"] == 3
    np.testing.assert_allclose(cmc(r["ranks"]), [0.5, 0.75, 1.0])
    m = identification_metrics(sim, ["A", "B", "C", "C"], g_ids)
    assert m["rank1"] == 0.5 and m["cmc"] == [0.5, 0.75, 1.0] and m["rank"]["5"] == 1.0


def test_cmc_png(tmp_path):
    from mtlface_fast.eval.identification import cmc_png
    out = cmc_png(str(tmp_path / "cmc.png"), {"plain": [0.5, 0.75, 1.0], "augmented": [0.7, 0.9, 1.0]})
    img = np.asarray(Image.open(out))
    assert img.shape == (480, 640, 3)
    for color in ((31, 119, 180), (214, 39, 40)):
        assert (img == color).all(-1).sum() > 100
    with pytest.raises(ValueError):
        cmc_png(str(tmp_path / "x.png"), {})


def test_cmc_ties_count_against_the_probe():
    r = identity_ranks(np.full((2, 3), 0.5), ["A", "B"], ["A", "B", "C"])
    assert r["ranks"].tolist() == [3, 3]


def test_leave_one_out_and_unmatched_probes():
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    ids = ["a", "a", "b", "b", "c"]  # 'c' has a single image: nothing to find once its own image is excluded
    sim = cosine_matrix(emb, emb)
    m = identification_metrics(sim, ids, ids, exclude=np.eye(5, dtype=bool))
    assert m["n_identified"] == 4 and m["unmatched_probes"] == [4] and m["rank1"] == 1.0
    # a probe whose identity is not in the gallery at all
    m = identification_metrics(sim[:, :4], ids, ids[:4])
    assert m["n_unmatched"] == 1
    with pytest.raises(ValueError, match="no identifiable probes"):
        identification_metrics(sim[:1, 2:4], ["a"], ["b", "b"])
    with pytest.raises(ValueError, match="similarity"):
        identity_ranks(sim, ids[:2], ids)


def test_split_probe_gallery(tmp_path):
    from mtlface_fast.eval.identification import read_identity_list, split_probe_gallery
    for n in ("a.png", "b.png", "c.png", "d.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / n)
    lst = tmp_path / "ids.txt"
    lst.write_text("a.png 1 5 probe\nb.png 1 30 gallery\nc.png 2 7 probe\nd.png 2 40 gallery\nmissing.png 3 9 probe\n")
    L = read_identity_list(str(lst))
    assert len(L.paths) == 4 and L.missing == [(5, str(tmp_path / "missing.png"))]
    p, g, ex = split_probe_gallery(L, "age", split_age=18)
    assert p.tolist() == [0, 2] and g.tolist() == [1, 3] and ex is None
    p, g, _ = split_probe_gallery(L, "role")
    assert p.tolist() == [0, 2] and g.tolist() == [1, 3]
    p, g, ex = split_probe_gallery(L, "loo")
    assert ex.sum() == 4
    with pytest.raises(ValueError, match="split must be"):
        split_probe_gallery(L, "nope")
    with pytest.raises(ValueError, match="both must be non-empty"):
        split_probe_gallery(L, "age", split_age=1)
    (tmp_path / "bad.txt").write_text("a.png 1 five\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: age 'five'"):
        read_identity_list(str(tmp_path / "bad.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="empty"):
        read_identity_list(str(tmp_path / "empty.txt"))


# -- age -------------------------------------------------------------------------------------------------------
def test_age_mae_and_group_accuracy_by_hand():
    pred = np.array([10.0, 25.0, 33.0, 70.0])
    true = np.array([12.0, 20.0, 33.0, 61.0])
    m = age_mod.age_metrics(pred, true, age_group=7)
    assert m["mae"] == pytest.approx((2 + 5 + 0 + 9) / 4)
    # groups (7): 10->0, 12->1 | 25->2, 20->1 | 33->3, 33->3 | 70->6, 61->6
    assert m["group_accuracy"] == pytest.approx(0.5)
    assert m["cumulative_score"]["5"] == pytest.approx(0.75)
    logits = np.eye(7)[[1, 1, 0, 6]]
    m = age_mod.age_metrics(pred, true, 7, group_logits=logits)
    assert m["group_accuracy_head"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="same length"):
        age_mod.age_metrics(pred, true[:2])
    with pytest.raises(ValueError, match="NaN"):
        age_mod.age_metrics([np.nan], [1.0])
    with pytest.raises(ValueError, match="age_group"):
        age_mod.age_metrics(pred, true, age_group=3)


def test_age_labels_text_and_json(tmp_path):
    (tmp_path / "ages.txt").write_text("# path age\na.jpg 23\nsub/b.jpg\t41.5\n")
    labels, info = age_mod.read_age_labels(str(tmp_path / "ages.txt"))
    assert labels == {str(tmp_path / "a.jpg"): 23.0, str(tmp_path / "sub/b.jpg"): 41.5}
    (tmp_path / "data.json").write_text(
        '{"x.jpg": {"attributes": {"age": {"value": 31}}}, "y.jpg": {"age": 8}, "z.jpg": {"url": "u"}}')
    labels, info = age_mod.read_age_labels(str(tmp_path / "data.json"), root="/r")
    assert labels == {"/r/x.jpg": 31.0, "/r/y.jpg": 8.0} and info["n_without_age"] == 1
    (tmp_path / "list.json").write_text('[{"file": "p.jpg", "faces": [{"attributes": {"age": {"value": 50}}}]}]')
    assert age_mod.read_age_labels(str(tmp_path / "list.json"))[0] == {str(tmp_path / "p.jpg"): 50.0}
    (tmp_path / "bad.txt").write_text("a.jpg old\n")
    with pytest.raises(ValueError, match=r"bad.txt:1"):
        age_mod.read_age_labels(str(tmp_path / "bad.txt"))
    (tmp_path / "none.json").write_text("{}")
    with pytest.raises(ValueError, match="no ages"):
        age_mod.read_age_labels(str(tmp_path / "none.json"))
    with pytest.raises(FileNotFoundError):
        age_mod.read_age_labels(str(tmp_path / "absent.txt"))


# -- synthesis -------------------------------------------------------------------------------------------------
def test_synthesis_metrics_by_hand(tmp_path):
    real = np.array([[1.0, 0.0], [0.0, 1.0]])
    aged = np.stack([np.tile(real[0], (7, 1)), np.tile([1.0, 1.0], (7, 1))])  # cos 1 and 1/sqrt(2)
    ages = np.tile([5.0, 15.0, 25.0, 35.0, 45.0, 55.0, 80.0], (2, 1))
    ages[1, 0] = 50.0  # one miss
    m = synthesis_metrics(real, aged, ages, 7)
    assert m["identity_cosine_mean"] == pytest.approx((1 + 2 ** -0.5) / 2)
    assert m["age_accuracy"] == pytest.approx(13 / 14) and m["age_accuracy_per_group"][0] == 0.5
    with pytest.raises(ValueError, match="expected real"):
        synthesis_metrics(real, aged[:, :3], ages, 7)
    import torch
    src = torch.rand(2, 3, 16, 16) * 2 - 1
    out = contact_sheet(str(tmp_path / "s.png"), src, torch.rand(2, 7, 3, 16, 16) * 2 - 1,
                        [str(i) for i in range(7)], captions=["a", "b"], title="t")
    assert Image.open(out).size[0] == 8 * 20 + 4
