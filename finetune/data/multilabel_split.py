"""Hold out a validation set from multi-label data, keeping every label's share in both parts.

Iterative stratification (Sechidis, Tsoumakas & Vlahavas 2011, "On the stratification of
multi-label data"), the algorithm scikit-multilearn implements. It is written here because
scikit-multilearn is unmaintained (no release since 2018) and is not a dependency, and two
subsets need only a few lines of it.

Three choices of ours on top of the paper, so that it behaves like the folder reader's
`stratified_split`: the wanted counts are whole numbers, with at least one example of each
label with two or more in validation and one in training; a final pass moves the examples that
disturb the label shares least until validation has exactly its share of all examples; and the
order examples are handed out in is shuffled by the seed (so another seed is another split).
"""

from __future__ import annotations

import random

TRAIN, VAL = 0, 1


def held_out(count: int, val_fraction: float) -> int:
    """How many of `count` go to validation: at least one, and one left for training, when count >= 2."""
    n_val = round(count * val_fraction)
    if val_fraction > 0 and count >= 2:
        n_val = min(max(n_val, 1), count - 1)
    return n_val


def iterative_split(
    label_sets: list[tuple[int, ...]], num_classes: int, val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(train indices, val indices), each sorted, of the examples whose labels are `label_sets`."""
    n = len(label_sets)
    if val_fraction <= 0 or n < 2:
        return list(range(n)), []
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    labels = [sorted(set(label_set)) for label_set in label_sets]
    examples_of: list[list[int]] = [[] for _ in range(num_classes)]
    for i in order:
        for label in labels[i]:
            examples_of[label].append(i)

    wanted_val = [held_out(len(examples), val_fraction) for examples in examples_of]
    # want[s][label]: examples of `label` subset s still wants; size_want[s]: examples it still wants
    want = [[len(examples) - v for examples, v in zip(examples_of, wanted_val)], wanted_val[:]]
    n_val = held_out(n, val_fraction)
    size_want = [n - n_val, n_val]
    remaining = [len(examples) for examples in examples_of]
    subset: list[int | None] = [None] * n

    def assign(i: int, s: int) -> None:
        subset[i] = s
        size_want[s] -= 1
        for label in labels[i]:
            want[s][label] -= 1
            remaining[label] -= 1

    while True:
        # The rarest label first: its few examples are the hardest to share out, and the
        # examples of common labels handed out later can still even those out.
        open_labels = [label for label in range(num_classes) if remaining[label]]
        if not open_labels:
            break
        rarest = min(open_labels, key=lambda label: (remaining[label], label))
        for i in examples_of[rarest]:
            if subset[i] is None:
                assign(i, max((TRAIN, VAL), key=lambda s: (want[s][rarest], size_want[s], rng.random())))
    for i in order:  # examples with no label
        if subset[i] is None:
            assign(i, max((TRAIN, VAL), key=lambda s: (size_want[s], rng.random())))

    _even_sizes(subset, labels, want, size_want, order)
    train = sorted(i for i in range(n) if subset[i] == TRAIN)
    val = sorted(i for i in range(n) if subset[i] == VAL)
    return train, val


def _even_sizes(subset: list, labels: list[list[int]], want: list[list[int]], size_want: list[int],
                order: list[int]) -> None:
    """Move examples from the subset that got too many to the other until both have their size.

    Handing out by label leaves the sizes a few examples off (about a hundred in 100,000). The
    examples moved are those whose labels the giving subset has most in excess (the least squared
    error in the wanted counts, ranked once per round: a full scan per move would be quadratic),
    and none that would leave a label of two or more examples without one in the giving subset."""
    count = [[0] * len(want[0]) for _ in (TRAIN, VAL)]
    for i, s in enumerate(subset):
        for label in labels[i]:
            count[s][label] += 1
    total = [a + b for a, b in zip(*count)]

    def last_of_a_label(i: int, s: int) -> bool:
        return any(count[s][label] == 1 and total[label] >= 2 for label in labels[i])

    while size_want[TRAIN] != 0:
        source = TRAIN if size_want[TRAIN] < 0 else VAL
        target = 1 - source
        cost = {i: sum(want[source][label] - want[target][label] + 1 for label in labels[i])
                for i in order if subset[i] == source}
        moved = 0
        for i in sorted(cost, key=cost.__getitem__):  # stable: ties keep the seeded order
            if moved == -size_want[source]:
                break
            if last_of_a_label(i, source):
                continue
            subset[i] = target
            for label in labels[i]:
                want[source][label] += 1
                want[target][label] -= 1
                count[source][label] -= 1
                count[target][label] += 1
            moved += 1
        size_want[source] += moved
        size_want[target] -= moved
        if not moved:
            return  # every move would empty a label in one subset: keep the labels over the size
