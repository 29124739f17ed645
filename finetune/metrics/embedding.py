"""Open-set metrics for identity embeddings, computed on held-out identities at validation end.

Verification (pairs, as LFW): k-fold accuracy at the best threshold, ROC AUC, EER and TAR@FAR.
Retrieval (every item queries all the others): recall@k and MAP@R (Musgrave et al. 2020,
"A Metric Learning Reality Check").

Too little data for a metric (a sanity-check batch with no repeated identity) gives NaN and a
warning rather than an error, so it cannot stop a training run; misuse raises a ValueError.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc, binary_roc

log = logging.getLogger(__name__)

# Below this many candidate pairs a full permutation is cheap (32 MiB of int64); above it we
# draw with replacement and drop repeats, so 50k items (1.25e9 pairs) need no O(pairs) memory.
_RANDPERM_LIMIT = 1 << 22
# Cosines of float32 unit vectors overshoot [-1, 1] by rounding; more than this is not a cosine.
_COSINE_SLACK = 1e-3


@functools.cache
def _log_once(level: int, message: str) -> None:
    # Validation runs every epoch on the same set: say each distinct thing once per process.
    log.log(level, message)


# ---------------------------------------------------------------------------------- pairs


def balanced_pairs(labels: torch.Tensor, num_pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`num_pairs // 2` distinct same-label pairs and as many different-label pairs, drawn with
    `seed`: (index_a, index_b, is_same), positives first. If fewer pairs of either kind exist,
    all of the rarer kind are used and as many of the other."""
    if labels.dim() != 1:
        raise ValueError(f"balanced_pairs: labels must be 1-D (one label per item), got shape {tuple(labels.shape)}")
    generator = torch.Generator().manual_seed(seed)
    flat = labels.detach().cpu()
    # Sorted by label, each identity is a contiguous run, so pairs are ranges of positions.
    order = torch.argsort(flat, stable=True)
    _, counts = torch.unique_consecutive(flat[order], return_counts=True)
    group_end = torch.repeat_interleave(counts.cumsum(0), counts)
    position = torch.arange(len(flat))
    same = (position + 1, group_end)  # partners after i in its own run
    different = (group_end, torch.full_like(position, len(flat)))  # partners in later runs

    singletons = int((counts == 1).sum())
    if singletons:
        message = f"balanced_pairs: {singletons} of {len(counts)} labels have a single sample and give no positive pair"
        _log_once(logging.INFO, message)
    available = min(_pair_count(*same), _pair_count(*different))
    per_kind = min(num_pairs // 2, available)
    if per_kind < num_pairs // 2:
        message = f"balanced_pairs: asked for {num_pairs // 2} pairs of each kind, only {per_kind} exist; using {per_kind}"
        _log_once(logging.WARNING, message)

    pos_a, pos_b = _sample_pairs(*same, per_kind, generator)
    neg_a, neg_b = _sample_pairs(*different, per_kind, generator)
    index_a = order[torch.cat([pos_a, neg_a])]
    index_b = order[torch.cat([pos_b, neg_b])]
    is_same = torch.arange(2 * per_kind) < per_kind
    return index_a.to(labels.device), index_b.to(labels.device), is_same.to(labels.device)


def _pair_count(start: torch.Tensor, stop: torch.Tensor) -> int:
    return int((stop - start).sum())


def _sample_pairs(start: torch.Tensor, stop: torch.Tensor, k: int, generator: torch.Generator):
    """k distinct pairs (i, j), j in [start[i], stop[i]), via a linear index over all of them."""
    per_item = stop - start
    ends = per_item.cumsum(0)
    linear = _sample_distinct(_pair_count(start, stop), k, generator)
    first = torch.searchsorted(ends, linear, right=True)
    second = start[first] + linear - (ends[first] - per_item[first])
    return first, second


def _sample_distinct(total: int, k: int, generator: torch.Generator) -> torch.Tensor:
    if k >= total:
        return torch.arange(total)
    if total <= _RANDPERM_LIMIT:
        return torch.randperm(total, generator=generator)[:k]
    chosen = torch.empty(0, dtype=torch.long)
    while len(chosen) < k:
        draws = torch.randint(total, (2 * (k - len(chosen)) + 16,), generator=generator)
        chosen = _unique_in_order(torch.cat([chosen, draws]))
    return chosen[:k]


def _unique_in_order(values: torch.Tensor) -> torch.Tensor:
    # Keep first occurrences in draw order: truncating a sorted unique would favour small indices.
    uniques, inverse = torch.unique(values, return_inverse=True)
    first = torch.full((len(uniques),), len(values))
    first.scatter_reduce_(0, inverse, torch.arange(len(values)), reduce="amin")
    return values[first.sort().values]


def read_lfw_pairs(
    path: str | Path, index_of: Mapping[tuple[str, int], int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs from an LFW `pairs.txt`: (index_a, index_b, is_same, fold). `index_of` maps
    (identity, 1-based image number) to an embedding row. A `folds n` header means each fold is
    n matched then n mismatched lines; with a one-number header or none, fold is -1."""
    path = Path(path)
    lines = [(number, line.split()) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    header = lines[0][1] if lines and len(lines[0][1]) <= 2 and all(f.isdigit() for f in lines[0][1]) else None
    if header is not None:
        lines = lines[1:]
    if not lines:
        raise ValueError(f"{path}: no pair lines; expected 'name i j' or 'name1 i name2 j' per line")
    index_a, index_b, is_same = zip(*(_parse_pair(path, number, fields, index_of) for number, fields in lines))
    fold = _lfw_folds(path, header, len(lines))
    return torch.tensor(index_a), torch.tensor(index_b), torch.tensor(is_same), fold


def _parse_pair(path: Path, number: int, fields: list[str], index_of) -> tuple[int, int, bool]:
    if len(fields) == 3:
        keys, same = [(fields[0], fields[1]), (fields[0], fields[2])], True
    elif len(fields) == 4:
        keys, same = [(fields[0], fields[1]), (fields[2], fields[3])], False
    else:
        raise ValueError(
            f"{path}:{number}: expected 'name i j' or 'name1 i name2 j', got {len(fields)} fields; fix the line"
        )
    rows = []
    for name, image in keys:
        if not image.isdigit():
            raise ValueError(f"{path}:{number}: image number {image!r} is not a positive integer; fix the line")
        row = index_of.get((name, int(image)))
        if row is None:
            raise ValueError(
                f"{path}:{number}: no embedding for ({name!r}, {int(image)}); add it to index_of or remove the line"
            )
        rows.append(row)
    return rows[0], rows[1], same


def _lfw_folds(path: Path, header: list[str] | None, num_pairs: int) -> torch.Tensor:
    if header is None or len(header) == 1:  # a single number counts pairs, it names no folds
        return torch.full((num_pairs,), -1)
    folds, per_kind = int(header[0]), int(header[1])
    if folds * 2 * per_kind != num_pairs:
        raise ValueError(
            f"{path}: header '{folds} {per_kind}' means {folds * 2 * per_kind} pair lines, the file has {num_pairs}; "
            "fix the header or the file"
        )
    return torch.arange(num_pairs) // (2 * per_kind)


# ---------------------------------------------------------------------------- verification


def roc_curve(scores: torch.Tensor, is_same: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ROC of `score >= threshold` (torchmetrics' binary_roc): (fpr, tpr, thresholds), thresholds
    falling and in cosine units; the first, +inf, is the (0, 0) point."""
    fpr, tpr, thresholds = binary_roc(_unit_interval(scores), is_same.long())
    thresholds = thresholds * 2 - 1
    # torchmetrics starts at threshold 1, which a cosine of exactly 1 would pass; +inf accepts nothing.
    thresholds[0] = math.inf
    return fpr, tpr, thresholds.to(scores.dtype)


def _unit_interval(scores: torch.Tensor) -> torch.Tensor:
    """Cosines mapped onto [0, 1]: torchmetrics applies a sigmoid to scores outside [0, 1], which
    would leave thresholds in sigmoid units only when some cosine is negative."""
    low, high = float(scores.min()), float(scores.max())
    if not (math.isfinite(low) and math.isfinite(high)) or low < -1 - _COSINE_SLACK or high > 1 + _COSINE_SLACK:
        raise ValueError(
            f"scores must be cosine similarities in [-1, 1], got min {low:.4g} and max {high:.4g}; "
            "L2-normalise the embeddings before the dot product"
        )
    return (scores.double().clamp(-1, 1) + 1) / 2


def verification_metrics(
    scores: torch.Tensor,
    is_same: torch.Tensor,
    folds: torch.Tensor | None = None,
    num_folds: int = 10,
    far_targets: Sequence[float] = (1e-1, 1e-2, 1e-3),
) -> dict[str, float]:
    """`acc`, `auc`, `eer` and `tar@far=<target>` of cosine `scores` for pairs `is_same`.

    `acc` is LFW's k-fold accuracy: each fold is scored at the threshold best on the others.
    TAR@FAR is the highest TAR whose FAR <= target, reported only for targets the negatives can
    measure (at least 1/target of them)."""
    if scores.dim() != 1 or scores.shape != is_same.shape:
        raise ValueError(
            f"verification_metrics: scores and is_same must be 1-D of one length, "
            f"got {tuple(scores.shape)} and {tuple(is_same.shape)}"
        )
    is_same = is_same.bool()
    num_pos = int(is_same.sum())
    num_neg = len(is_same) - num_pos
    if num_pos == 0 or num_neg == 0:
        message = f"verification_metrics: {num_pos} positive and {num_neg} negative pairs; metrics need both, reporting NaN"
        _log_once(logging.WARNING, message)
        return {"acc": math.nan, "auc": math.nan, "eer": math.nan}
    fpr, tpr, _ = roc_curve(scores, is_same)
    # Work in counts: FAR <= target then holds exactly, not up to float32 rounding of the rates.
    false_accepts, true_accepts = (fpr.double() * num_neg).round(), (tpr.double() * num_pos).round()
    metrics = {
        "acc": _kfold_accuracy(scores, is_same, _fold_ids(is_same, folds, num_folds)),
        "auc": float(binary_auroc(_unit_interval(scores), is_same.long())),
        "eer": _equal_error_rate(false_accepts / num_neg, true_accepts / num_pos),
    }
    for target in far_targets:
        if num_neg * target >= 1 - 1e-9:
            allowed = math.floor(num_neg * target + 1e-9)
            metrics[f"tar@far={_short_float(target)}"] = float(true_accepts[false_accepts <= allowed].max()) / num_pos
    return metrics


def _short_float(value: float) -> str:
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"  # 1e-1, 2.5e-3


def _fold_ids(is_same: torch.Tensor, folds: torch.Tensor | None, num_folds: int) -> torch.Tensor:
    if folds is not None:
        folds = folds.to(is_same.device).long()
        if folds.shape != is_same.shape:
            raise ValueError(
                f"verification_metrics: folds has shape {tuple(folds.shape)}, scores {tuple(is_same.shape)}; "
                "give one fold per pair"
            )
        if bool((folds >= 0).all()):
            return folds
        if bool((folds >= 0).any()):
            raise ValueError(
                "verification_metrics: folds mixes assigned (>= 0) and unassigned (-1) pairs; "
                "give every pair a fold or pass folds=None"
            )
    if num_folds < 2:
        raise ValueError(f"verification_metrics: num_folds={num_folds}, the held-out threshold needs at least 2")
    # Deal each class round-robin in its given order, so every fold gets both classes and the
    # split is the same on every run (no seed needed).
    ids = torch.empty(is_same.shape, dtype=torch.long, device=is_same.device)
    for kind in (True, False):
        members = (is_same == kind).nonzero().squeeze(1)
        ids[members] = torch.arange(len(members), device=ids.device) % num_folds
    return ids


def _kfold_accuracy(scores: torch.Tensor, is_same: torch.Tensor, folds: torch.Tensor) -> float:
    fold_values = folds.unique()
    if len(fold_values) < 2:
        message = f"verification_metrics: {len(is_same)} pairs fill only one fold; acc needs two, reporting NaN"
        _log_once(logging.WARNING, message)
        return math.nan
    accuracies = []
    for fold in fold_values:
        held_out = folds == fold
        threshold = _best_threshold(scores[~held_out], is_same[~held_out])
        accuracies.append(((scores[held_out] > threshold) == is_same[held_out]).double().mean())
    return float(torch.stack(accuracies).mean())


def _best_threshold(scores: torch.Tensor, is_same: torch.Tensor) -> float:
    """The threshold maximising accuracy of `score > threshold`, exact: every cut between distinct
    sorted scores is tried, and the cut is placed midway. Ties go to the lowest threshold, as
    LFW evaluation scripts do (argmax over ascending thresholds)."""
    order = scores.argsort()
    sorted_scores, same = scores[order].double(), is_same[order]
    zero = torch.zeros(1, dtype=torch.long, device=scores.device)
    negatives_below = torch.cat([zero, (~same).cumsum(0)])  # cut k: the k lowest called "different"
    positives_above = same.sum() - torch.cat([zero, same.cumsum(0)])
    correct = negatives_below + positives_above
    cut_allowed = torch.ones_like(correct, dtype=torch.bool)
    cut_allowed[1:-1] = sorted_scores[1:] > sorted_scores[:-1]  # never split equal scores
    k = int(torch.where(cut_allowed, correct, -1).argmax())
    if k == 0:
        return -math.inf
    if k == len(sorted_scores):
        return math.inf
    return float(sorted_scores[k - 1] + sorted_scores[k]) / 2


def _equal_error_rate(fpr: torch.Tensor, tpr: torch.Tensor) -> float:
    """Where the ROC crosses FPR = 1 - TPR, linearly interpolated between the two points around it."""
    gap = (1 - tpr) - fpr  # falls from 1 at (0, 0) to -1 at (1, 1)
    i = int((gap <= 0).nonzero()[0])
    before, after = float(gap[i - 1]), float(gap[i])
    t = before / (before - after)
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


# ------------------------------------------------------------------------------- retrieval

# Written here, not with torchmetrics' retrieval module: RetrievalRecall/RetrievalMAP/
# RetrievalPrecision take flat (preds, target, indexes) of N*(N-1) entries (2.5e9 for 50k items)
# and keep them all in their state; the functional forms score one query at a time (a Python
# loop over 50k queries); and in 1.9 retrieval_recall and retrieval_average_precision count an
# item as relevant only where its score is > 0, which drops same-identity items at negative
# cosine. RetrievalMAP also divides by the relevant items retrieved, not by R, so it is not MAP@R.
# A chunked top-k over the similarity matrix gives both metrics in a few matrix products.

# Queries are ranked in chunks whose similarity block holds at most this many elements (256 MiB
# of float32; the chunk's work needs at most as much again), on the CPU or a GPU: at 100k
# items, 671 queries a chunk. Smaller chunks cost time on the CPU, where each matrix product
# repacks the whole gallery: at 100k items, 167 queries a chunk took 1.25x as long as 1024, 671
# took 1.07x (2 cores, 2026-12-05, one measurement on a shared machine).
_SIMILARITY_BLOCK = 1 << 26


def retrieval_metrics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ks: Sequence[int] = (1, 5),
    chunk_size: int | None = None,
    distributed: bool = False,
) -> dict[str, float]:
    """Leave-one-out retrieval by cosine similarity: `recall@k` for each k (a same-label item in
    the top k) and `map@r`. Queries are the items whose label has another item; all items are
    in the gallery, ranked by similarity, equal similarities by row (lower first).

    Runs on the embeddings' device, `chunk_size` queries at a time (default: as many as keep a
    chunk's similarity block under 2^26 elements). With `distributed` and torch.distributed
    initialised, every process must pass the same (gathered) embeddings and labels: each ranks
    its share of the queries and the sums are all-reduced, so every process returns the metrics
    of the whole set."""
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"retrieval_metrics: need embeddings (N, D) and labels (N,), "
            f"got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
        )
    if not ks or min(ks) < 1:
        raise ValueError(f"retrieval_metrics: ks={tuple(ks)}; give positive ranks such as (1, 5)")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"retrieval_metrics: chunk_size={chunk_size}; give a positive number of queries or None")
    device = embeddings.device
    # Autocast would compute the similarities in 16 bits, and TF32 with 10-bit mantissas: both
    # reorder near neighbours, so the ranking is done in full float32, as on the CPU.
    with torch.autocast(device.type, enabled=False), _ieee_float32_matmul(device):
        embeddings = F.normalize(embeddings.float(), dim=1)
        _, identity, counts = torch.unique(labels.to(device), return_inverse=True, return_counts=True)
        num_relevant = counts[identity] - 1  # R: the other items sharing the query's label
        queries = num_relevant.nonzero().squeeze(1)
        if len(queries) == 0:
            _log_once(logging.WARNING, f"retrieval_metrics: none of {len(labels)} labels repeats; reporting NaN")
            return {**{f"recall@{k}": math.nan for k in ks}, "map@r": math.nan}
        # By R, so that a chunk ranks no deeper than its own largest R (its last query's): one
        # large identity then deepens only the chunks of its own items.
        queries = queries[num_relevant[queries].argsort(stable=True)]
        rank, world_size = _process_share(distributed)
        sums = _retrieval_sums(embeddings, identity, num_relevant, queries[rank::world_size], ks, chunk_size)
        if world_size > 1:
            torch.distributed.all_reduce(sums)
    *hits, precision_sum, num_queries = sums.tolist()
    metrics = {f"recall@{k}": hit / num_queries for k, hit in zip(ks, hits)}
    metrics["map@r"] = precision_sum / num_queries
    return metrics


def _process_share(distributed: bool) -> tuple[int, int]:
    """(rank, world size) to share the queries among; (0, 1) computes them all here."""
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@contextlib.contextmanager
def _ieee_float32_matmul(device: torch.device):
    """Float32 matrix products without TF32 on CUDA, restoring the caller's setting after."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 has `fp32_precision`; reading the legacy flag after it was set raises there.
    name, exact = ("fp32_precision", "ieee") if hasattr(matmul, "fp32_precision") else ("allow_tf32", False)
    previous = getattr(matmul, name)
    setattr(matmul, name, exact)
    try:
        yield
    finally:
        setattr(matmul, name, previous)


def _retrieval_sums(
    embeddings: torch.Tensor,
    identity: torch.Tensor,
    num_relevant: torch.Tensor,
    queries: torch.Tensor,
    ks: Sequence[int],
    chunk_size: int | None,
) -> torch.Tensor:
    """float64 (hits at each k, sum of AP@R, number of queries) over `queries` (sorted by R),
    on the embeddings' device."""
    device, num_items = embeddings.device, len(embeddings)
    sums = torch.zeros(len(ks) + 2, dtype=torch.float64, device=device)
    chunk_size = chunk_size or max(1, _SIMILARITY_BLOCK // num_items)
    chunks = queries.split(chunk_size)
    if not chunks:
        return sums
    # Each chunk's depth in one read, not one host sync a chunk.
    last = torch.tensor([min(len(queries), (i + 1) * chunk_size) - 1 for i in range(len(chunks))], device=device)
    deepest = num_relevant[queries[last]].tolist()
    k_limits = torch.tensor(ks, device=device)
    for chunk, max_relevant in zip(chunks, deepest):
        depth = min(num_items - 1, max(max(ks), max_relevant))
        relevant = _ranked_relevance(embeddings, identity, chunk, depth)
        # Rank of the first relevant item (argmax returns the first of equal maxima); max(ks) if
        # none is in the top max(ks), which then counts as a hit at no k.
        first_hit = torch.where(relevant[:, : max(ks)].any(1), relevant.byte().argmax(1), max(ks))
        sums[: len(ks)] += (first_hit[:, None] < k_limits).sum(0)
        sums[-2] += _average_precision_at_r(relevant, num_relevant[chunk]).sum()
        sums[-1] += len(chunk)
    return sums


def _ranked_relevance(embeddings: torch.Tensor, identity: torch.Tensor, queries: torch.Tensor, depth: int) -> torch.Tensor:
    """(queries, depth) bool: whether each of a query's `depth` nearest others shares its label."""
    similarity = embeddings[queries] @ embeddings.T
    similarity[torch.arange(len(queries), device=queries.device), queries] = -math.inf  # not itself
    return identity[_nearest(similarity, depth)] == identity[queries, None]


def _nearest(similarity: torch.Tensor, depth: int) -> torch.Tensor:
    """Columns of each row's `depth` (< columns) largest values, largest first, equal values by
    column, lower first.

    torch.topk leaves equal values in whatever order its partial sort does (on the CPU it
    changes with k, hence with a chunk's depth; CUDA's differs again), so its pick is made
    exact: rows where the value after the cut equals the last one before it are sorted whole
    (finding them is a host sync a chunk, at epoch end), and the picked columns are put in
    (value, column) order."""
    # One more than needed tells whether equal values continue past the cut; when the cut
    # takes every other column, that one is the row's own -inf.
    values, nearest = similarity.topk(depth + 1, dim=1)
    nearest = nearest[:, :depth]
    straddling = (values[:, depth] == values[:, depth - 1]).nonzero().squeeze(1)
    # A quarter of the rows at a time: a sort's values and int64 indices then take at most
    # 3/4 of the similarity block's memory (every row ties at the cut if the embeddings collapse).
    for rows in straddling.split(max(1, len(similarity) // 4)):
        nearest[rows] = similarity[rows].sort(dim=1, descending=True, stable=True).indices[:, :depth]
    nearest = nearest.sort(dim=1).values
    by_value = similarity.gather(1, nearest).sort(dim=1, descending=True, stable=True).indices
    return nearest.gather(1, by_value)


def _average_precision_at_r(relevant: torch.Tensor, num_relevant: torch.Tensor) -> torch.Tensor:
    """MAP@R per query: precision@i summed over the relevant ranks i <= R, divided by R."""
    rank = torch.arange(1, relevant.shape[1] + 1, device=relevant.device)
    precision = relevant.cumsum(1, dtype=torch.float64) / rank
    counted = relevant & (rank <= num_relevant[:, None])
    return (precision * counted).sum(1) / num_relevant
