"""Open-set embedding metrics against values worked out by hand, and the two extremes:
perfectly separated identities and random embeddings."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import finetune.metrics.embedding as embedding_metrics
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


# ------------------------------------------------------------------- retrieval at scale


def previous_retrieval_metrics(embeddings, labels, ks=(1, 5), chunk_size=1024):
    """The implementation before issue 20 (commit c8315fb), on the CPU, every query in one
    process: the reference the chunked, sharded one must reproduce."""
    embeddings = F.normalize(embeddings.float(), dim=1)
    _, identity, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    num_relevant = counts[identity] - 1
    queries = num_relevant.nonzero().squeeze(1)
    hits = torch.zeros(len(ks), dtype=torch.float64)
    precision_sum = torch.zeros((), dtype=torch.float64)
    for chunk in queries.split(chunk_size):
        depth = min(len(labels) - 1, max(max(ks), int(num_relevant[chunk].max())))
        similarity = embeddings[chunk] @ embeddings.T
        similarity[torch.arange(len(chunk)), chunk] = -math.inf
        relevant = identity[similarity.topk(depth, dim=1).indices] == identity[chunk, None]
        for n, k in enumerate(ks):
            hits[n] += relevant[:, :k].any(1).sum()
        rank = torch.arange(1, depth + 1)
        counted = relevant & (rank <= num_relevant[chunk, None])
        precision_sum += ((relevant.cumsum(1) / rank * counted).sum(1) / num_relevant[chunk]).sum()
    metrics = {f"recall@{k}": float(hits[n]) / len(queries) for n, k in enumerate(ks)}
    metrics["map@r"] = float(precision_sum) / len(queries)
    return metrics


def brute_force_retrieval(unit, labels, ks):
    """Each query's others sorted by (similarity falling, row rising) in plain Python: the
    ranking with ties, item by item. `unit` must be unit rows whose products are exact."""
    similarity, labels = (unit.double() @ unit.double().T).tolist(), labels.tolist()
    hits, average_precisions = [0] * len(ks), []
    for q, label in enumerate(labels):
        num_relevant = labels.count(label) - 1
        if num_relevant == 0:
            continue
        ranked = sorted((j for j in range(len(labels)) if j != q), key=lambda j: (-similarity[q][j], j))
        relevant = [labels[j] == label for j in ranked]
        hits = [h + any(relevant[:k]) for h, k in zip(hits, ks)]
        precision_at = [sum(relevant[:i]) / i for i in range(1, num_relevant + 1)]
        average_precisions.append(sum(p for p, r in zip(precision_at, relevant) if r) / num_relevant)
    metrics = {f"recall@{k}": h / len(average_precisions) for h, k in zip(hits, ks)}
    return {**metrics, "map@r": sum(average_precisions) / len(average_precisions)}


def clustered(num_items, dim, seed, duplicates=0):
    """Random embeddings around per-label centres; labels of 1 to 12 items (singletons too),
    shuffled; the first `duplicates` rows copied over rows of the same label (exact ties)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 13, (num_items,), generator=generator)
    labels = torch.repeat_interleave(torch.arange(num_items), sizes)[:num_items]
    labels = labels[torch.randperm(num_items, generator=generator)]
    centres = torch.randn(int(labels.max()) + 1, dim, generator=generator)
    embeddings = centres[labels] + 1.2 * torch.randn(num_items, dim, generator=generator)
    for row in range(duplicates):
        twins = (labels == labels[row]).nonzero().squeeze(1)
        embeddings[twins[-1]] = embeddings[row]
    return embeddings, labels


def exact_tie_embeddings(num_items, seed):
    """Unit rows drawn from 24 vectors (+-e_i and the 16 sign patterns of 1/2 in 4-D) whose
    products are exact multiples of 1/2. 40 labels share them: each label's items take its
    vector 2 times in 3, a random one otherwise, so exact ties between labels decide hits."""
    generator = torch.Generator().manual_seed(seed)
    axes = torch.cat([torch.eye(4), -torch.eye(4)])
    signs = torch.tensor([[(1 if n >> b & 1 else -1) * 0.5 for b in range(4)] for n in range(16)])
    vectors = torch.cat([axes, signs])
    labels = torch.randint(40, (num_items,), generator=generator)
    own_vector = torch.randint(len(vectors), (40,), generator=generator)[labels]
    other_vector = torch.randint(len(vectors), (num_items,), generator=generator)
    keep_own = torch.rand(num_items, generator=generator) < 2 / 3
    return vectors[torch.where(keep_own, own_vector, other_vector)], labels


def test_retrieval_matches_the_previous_implementation():
    # 301 items (a prime: no chunk size divides it), labels of 1-12 items, 40 exact duplicate
    # pairs within labels (ties whose order cannot change a metric, so the old topk agrees).
    embeddings, labels = clustered(301, 16, seed=3, duplicates=40)
    ks = (1, 2, 5, 10)
    expected = previous_retrieval_metrics(embeddings, labels, ks)
    assert 0.2 < expected["recall@1"] < 0.9 and 0.05 < expected["map@r"] < 0.8  # neither trivial nor chance
    for chunk_size in (None, 1, 7, 64, 1000):
        metrics = retrieval_metrics(embeddings, labels, ks, chunk_size=chunk_size)
        assert metrics.keys() == expected.keys()
        for name, value in expected.items():
            assert abs(metrics[name] - value) < 1e-6, (chunk_size, name, metrics[name], value)


def test_equal_similarities_rank_by_row():
    # x0 A (1, 0); x1 B and x2 A both (.6, .8); x3 B (0, 1). Cosines: x0.x1 = x0.x2 = .6,
    # x3.x1 = x3.x2 = .8, x1.x2 = 1, x0.x3 = 0. Equal similarities rank the lower row first:
    # query  R  ranked others                    first hit  AP@R
    # x0 A   1  x1 B(.6) x2 A(.6) x3 B(0)         2          0
    # x1 B   1  x2 A(1) x3 B(.8) x0 A(.6)         2          0
    # x2 A   1  x1 B(1) x3 B(.8) x0 A(.6)         3          0
    # x3 B   1  x1 B(.8) x2 A(.8) x0 A(0)         1          1
    # (x2 before x1 would make x0 hit first and x3 miss.) depth 1 (ks=(1,)) cuts through the
    # tie of x0 and x3; depth 3 does not: both give one answer, in any chunking.
    embeddings = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 0, 1])
    for chunk_size in (1, 3, None):
        assert retrieval_metrics(embeddings, labels, ks=(1,), chunk_size=chunk_size) == {"recall@1": 0.25, "map@r": 0.25}
        metrics = retrieval_metrics(embeddings, labels, ks=(1, 2, 3), chunk_size=chunk_size)
        assert metrics == {"recall@1": 0.25, "recall@2": 0.75, "recall@3": 1.0, "map@r": 0.25}


def test_retrieval_with_many_exact_ties_matches_brute_force():
    embeddings, labels = exact_tie_embeddings(240, seed=0)
    ks = (1, 3, 10)
    expected = brute_force_retrieval(embeddings, labels, ks)
    assert 0.1 < expected["recall@1"] < 0.9  # ties decide real hits and misses
    for chunk_size in (None, 1, 7):
        metrics = retrieval_metrics(embeddings, labels, ks, chunk_size=chunk_size)
        assert metrics == pytest.approx(expected, abs=1e-12), chunk_size


def record_queries(monkeypatch) -> list[torch.Tensor]:
    """The query rows of each chunk ranked, as they are ranked."""
    chunks, rank = [], embedding_metrics._ranked_relevance

    def recording(embeddings, identity, queries, depth):
        chunks.append(queries.clone())
        return rank(embeddings, identity, queries, depth)

    monkeypatch.setattr(embedding_metrics, "_ranked_relevance", recording)
    return chunks


def test_chunks_keep_the_similarity_block_bounded(monkeypatch):
    embeddings, labels = clustered(301, 16, seed=4)
    expected = retrieval_metrics(embeddings, labels)
    monkeypatch.setattr(embedding_metrics, "_SIMILARITY_BLOCK", 1000)  # 3 queries x 301 items a chunk
    chunks = record_queries(monkeypatch)
    assert retrieval_metrics(embeddings, labels) == pytest.approx(expected, abs=1e-12)
    assert max(len(chunk) for chunk in chunks) * len(labels) <= 1000
    assert len(chunks[-1]) < 3  # the queries do not divide by 3: the last chunk is short
    queries = torch.cat(chunks)
    assert sorted(queries.tolist()) == [i for i, label in enumerate(labels) if (labels == label).sum() > 1]


def rank_a_share(rank: int, folder: str) -> None:
    """One of 2 gloo processes: retrieval_metrics(distributed=True) on the same embeddings as
    the other, recording the queries this process ranked."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    try:
        monkeypatch = pytest.MonkeyPatch()
        chunks = record_queries(monkeypatch)
        embeddings, labels = exact_tie_embeddings(240, seed=1)
        metrics = retrieval_metrics(embeddings, labels, ks=(1, 3, 10), chunk_size=16, distributed=True)
        torch.save({"metrics": metrics, "queries": torch.cat(chunks)}, f"{folder}/rank{rank}.pt")
        monkeypatch.undo()
    finally:
        dist.destroy_process_group()


def test_two_processes_share_the_queries_and_agree_with_one(tmp_path):
    mp.spawn(rank_a_share, args=(str(tmp_path),), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    embeddings, labels = exact_tie_embeddings(240, seed=1)
    alone = retrieval_metrics(embeddings, labels, ks=(1, 3, 10), distributed=True)  # not initialised: all here
    assert alone == pytest.approx(brute_force_retrieval(embeddings, labels, (1, 3, 10)), abs=1e-12)
    for share in ranks:
        assert share["metrics"] == pytest.approx(alone, abs=1e-12)
    first, second = (set(share["queries"].tolist()) for share in ranks)
    queries = {i for i, label in enumerate(labels) if (labels == label).sum() > 1}
    assert not first & second and first | second == queries  # each query ranked once, by one process
    assert abs(len(first) - len(second)) <= 1
