"""Open-set embedding metrics against values worked out by hand, and the two extremes:
perfectly separated identities and random embeddings."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from finetune.metrics import balanced_pairs, read_lfw_pairs, retrieval_metrics, roc_curve, verification_metrics
from finetune.metrics.embedding import _log_once


def cosine_scores(embeddings, index_a, index_b):
    unit = F.normalize(embeddings, dim=1)
    return (unit[index_a] * unit[index_b]).sum(1)


def unit_vectors_at(degrees):
    """2-D unit vectors at these angles: cosine falls with the angle between them, so the
    ranking of a hand-worked case can be read off the angles."""
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1)


# ---------------------------------------------------------------------- the two extremes


def test_separated_identities_score_perfectly():
    labels = torch.arange(10).repeat_interleave(5)
    noise = 0.01 * torch.randn(50, 10, generator=torch.Generator().manual_seed(0))
    embeddings = F.one_hot(labels, 10).float() + noise
    index_a, index_b, is_same = balanced_pairs(labels, num_pairs=200, seed=0)
    metrics = verification_metrics(cosine_scores(embeddings, index_a, index_b), is_same)
    assert metrics["acc"] == 1.0 and metrics["auc"] == 1.0 and metrics["eer"] == 0.0
    assert metrics["tar@far=1e-1"] == 1.0 and metrics["tar@far=1e-2"] == 1.0
    assert "tar@far=1e-3" not in metrics  # 100 negatives cannot measure a FAR of 1/1000
    assert retrieval_metrics(embeddings, labels) == {"recall@1": 1.0, "recall@5": 1.0, "map@r": 1.0}


def test_random_embeddings_score_at_chance():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(50).repeat_interleave(10)
    embeddings = torch.randn(500, 64, generator=generator)
    index_a, index_b, is_same = balanced_pairs(labels, num_pairs=4000, seed=1)
    metrics = verification_metrics(cosine_scores(embeddings, index_a, index_b), is_same)
    assert metrics["auc"] == pytest.approx(0.5, abs=0.05)
    assert metrics["acc"] == pytest.approx(0.5, abs=0.05)
    retrieval = retrieval_metrics(embeddings, labels)
    chance = 9 / 499  # 9 same-label items among the 499 others
    assert retrieval["recall@1"] == pytest.approx(chance, abs=0.02)
    assert retrieval["recall@5"] == pytest.approx(1 - (1 - chance) ** 5, abs=0.04)
    assert retrieval["map@r"] < 0.05


# ------------------------------------------------------------------------- hand-worked cases


def test_map_at_r_and_recall_by_hand():
    # Angles (degrees) and labels; F at 89 is alone, so it is only a distractor, never a query.
    #   x0 A 0, x1 A 10, x2 B 15, x3 A 32, x4 B 50, x5 F 89
    # query  R  nearest others (angle apart)            top R     AP@R          top1 top2
    # x0 A   2  x1 A(10) x2 B(15) x3 A(32) ...          A B       1/1 / 2 = .5    hit  hit
    # x1 A   2  x2 B(5)  x0 A(10) x3 A(22) ...          B A       1/2 / 2 = .25   miss hit
    # x2 B   1  x1 A(5)  x0 A(15) x3 A(17) ...          A         0               miss miss
    # x3 A   2  x2 B(17) x4 B(18) x1 A(22) ...          B B       0               miss miss
    # x4 B   1  x3 A(18) x2 B(35) x5 F(39) ...          A         0               miss hit
    # MAP@R = (.5 + .25) / 5 = .15 (plain AP would give x0 (1 + 2/3) / 2: MAP@R divides by R).
    embeddings = unit_vectors_at([0, 10, 15, 32, 50, 89])
    labels = torch.tensor([0, 0, 1, 0, 1, 5])
    metrics = retrieval_metrics(embeddings, labels, ks=(1, 2, 5), chunk_size=2)  # chunks of 2 queries
    assert metrics["recall@1"] == pytest.approx(1 / 5)
    assert metrics["recall@2"] == pytest.approx(3 / 5)
    assert metrics["recall@5"] == pytest.approx(1.0)
    assert metrics["map@r"] == pytest.approx(0.15)


def test_eer_tar_and_auc_by_hand():
    # Falling scores and class: .9P .8P .75N .7P .6P .3N .25P .2N .1N 0N -.1N ... -.5N
    # ROC (fpr, tpr) after each: (0,.2) (0,.4) (.1,.4) (.1,.6) (.1,.8) (.2,.8) (.2,1) ...
    # FAR <= .1 allows one negative: best TAR .8 (threshold .6). FNR = FPR = .2 at (.2, .8).
    # AUC: .9 and .8 beat all 10 negatives, .7 and .6 beat 9, .25 beats 8: 46/50.
    positives = [0.9, 0.8, 0.7, 0.6, 0.25]
    negatives = [0.75, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3, -0.4, -0.5]
    scores = torch.tensor(positives + negatives)
    is_same = torch.tensor([True] * 5 + [False] * 10)
    metrics = verification_metrics(scores, is_same, num_folds=5)
    assert metrics["tar@far=1e-1"] == pytest.approx(0.8)
    assert metrics["eer"] == pytest.approx(0.2)
    assert metrics["auc"] == pytest.approx(0.92)
    assert set(metrics) == {"acc", "auc", "eer", "tar@far=1e-1"}  # 10 negatives: no 1e-2, 1e-3


def test_eer_interpolates_across_tied_scores():
    # P .9, then a P and an N tied at .5, then N .1: ROC (0,0) (0,.5) (.5,1) (1,1). FNR - FPR is
    # .5 at (0,.5) and -.5 at (.5,1); halfway is (.25, .75): EER .25.
    scores = torch.tensor([0.9, 0.5, 0.5, 0.1])
    is_same = torch.tensor([True, True, False, False])
    assert verification_metrics(scores, is_same, num_folds=2)["eer"] == pytest.approx(0.25)
    fpr, tpr, thresholds = roc_curve(scores, is_same)
    assert fpr.tolist() == [0, 0, 0.5, 1] and tpr.tolist() == [0, 0.5, 1, 1]
    assert thresholds[0] == math.inf and thresholds[1:].tolist() == pytest.approx([0.9, 0.5, 0.1])


def test_kfold_accuracy_by_hand():
    # fold 0: P .9 .8, N .1 .2      fold 1: P .7 .3, N .4 0
    # Held out 0: on fold 1 (0N .3P .4N .7P) cuts after 0 and after .4 both get 3/4 right; the
    # lower wins (as LFW scripts): threshold .15, and fold 0 scores .2N as same: 3/4.
    # Held out 1: fold 0 cuts at .5; fold 1 misses .3P: 3/4.  Mean 0.75.
    scores = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.7, 0.3, 0.4, 0.0])
    is_same = torch.tensor([True, True, False, False, True, True, False, False])
    folds = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert verification_metrics(scores, is_same, folds=folds)["acc"] == pytest.approx(0.75)


def test_verification_rejects_scores_that_are_not_cosines():
    with pytest.raises(ValueError, match=r"cosine similarities in \[-1, 1\].*L2-normalise"):
        verification_metrics(torch.tensor([3.0, -2.0]), torch.tensor([True, False]))


def test_far_targets_need_enough_negatives():
    generator = torch.Generator().manual_seed(0)
    is_same = torch.arange(1200) < 200  # 200 positives, 1000 negatives
    scores = torch.rand(1200, generator=generator) * 2 - 1
    assert {"tar@far=1e-1", "tar@far=1e-2", "tar@far=1e-3"} <= set(verification_metrics(scores, is_same))
    few = verification_metrics(scores[:1100], is_same[:1100])  # 900 negatives
    assert "tar@far=1e-2" in few and "tar@far=1e-3" not in few
    assert "tar@far=1e-2" not in verification_metrics(scores[:250], is_same[:250])  # 50 negatives


# ----------------------------------------------------------------------------------- pairs


def test_balanced_pairs_are_balanced_distinct_and_seeded():
    labels = torch.cat([torch.arange(20).repeat_interleave(4), torch.tensor([100, 101, 102])])
    index_a, index_b, is_same = balanced_pairs(labels, num_pairs=100, seed=7)
    assert len(is_same) == 100 and int(is_same.sum()) == 50
    assert torch.equal(labels[index_a] == labels[index_b], is_same)
    assert not (index_a == index_b).any()
    unordered = {tuple(sorted(pair)) for pair in zip(index_a.tolist(), index_b.tolist())}
    assert len(unordered) == 100
    again = balanced_pairs(labels, num_pairs=100, seed=7)
    assert all(torch.equal(x, y) for x, y in zip((index_a, index_b, is_same), again))
    assert not torch.equal(balanced_pairs(labels, num_pairs=100, seed=8)[0], index_a)


def test_balanced_pairs_uses_all_positives_when_too_few(caplog):
    _log_once.cache_clear()
    labels = torch.tensor([0, 0, 1, 1, 2, 3, 4])  # 2 positive pairs exist; 3 labels are singletons
    with caplog.at_level(logging.INFO, logger="finetune.metrics.embedding"):
        index_a, index_b, is_same = balanced_pairs(labels, num_pairs=10, seed=0)
    assert is_same.tolist() == [True, True, False, False]
    assert sorted(zip(index_a[:2].tolist(), index_b[:2].tolist())) == [(0, 1), (2, 3)]
    assert (labels[index_a[2:]] != labels[index_b[2:]]).all()
    assert "3 of 5 labels have a single sample" in caplog.text
    assert "only 2 exist" in caplog.text


def test_balanced_pairs_samples_large_sets_without_enumerating_them():
    labels = torch.arange(1000).repeat_interleave(4)  # 8e6 pairs: past the full-permutation limit
    index_a, index_b, is_same = balanced_pairs(labels, num_pairs=2000, seed=0)
    assert torch.equal(labels[index_a] == labels[index_b], is_same) and int(is_same.sum()) == 1000
    assert len({tuple(sorted(p)) for p in zip(index_a.tolist(), index_b.tolist())}) == 2000


# ------------------------------------------------------------------------------- LFW pairs

PAIRS = "2\t2\nAnn\t1\t2\nBob 1 3\nAnn\t1\tBob\t2\nBob 3 Cy 1\n\nCy\t1\t2\nAnn 2 1\nCy 2 Ann 1\nBob 2 Ann 2\n"
INDEX_OF = {("Ann", 1): 0, ("Ann", 2): 1, ("Bob", 1): 2, ("Bob", 2): 3, ("Bob", 3): 4, ("Cy", 1): 5, ("Cy", 2): 6}


def test_read_lfw_pairs_with_folds(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text(PAIRS)
    index_a, index_b, is_same, fold = read_lfw_pairs(path, INDEX_OF)
    assert index_a.tolist() == [0, 2, 0, 4, 5, 1, 6, 3]
    assert index_b.tolist() == [1, 4, 3, 5, 6, 0, 0, 1]
    assert is_same.tolist() == [True, True, False, False] * 2
    assert fold.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_read_lfw_pairs_without_folds(tmp_path):
    path = tmp_path / "pairsDevTrain.txt"
    path.write_text("1\nAnn 1 2\nBob 1 Cy 2\n")  # one number counts pairs, it names no folds
    assert read_lfw_pairs(path, INDEX_OF)[3].tolist() == [-1, -1]
    path.write_text("Ann 1 2\n")
    assert read_lfw_pairs(path, INDEX_OF)[3].tolist() == [-1]


def test_read_lfw_pairs_names_the_missing_entry(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text(PAIRS.replace("Cy 2 Ann 1", "Cy 2 Dee 4"))
    with pytest.raises(ValueError) as error:
        read_lfw_pairs(path, INDEX_OF)
    message = str(error.value)
    assert message.startswith(f"{path}:9: no embedding for ('Dee', 4)") and "\n" not in message
