"""How rows go to train / validation / test, deterministically from a seed.

Without a group column: each class's rows are shuffled and cut by the requested shares, so
every split holds every class.  With one, whole groups go to one split: first a random fill
(groups in random order, each to the first split still short of its share), which keeps the
test groups a random sample; when that lands more than a quarter off a requested share (few
or unequal groups), every assignment of groups is tried (up to 10 groups), or above that the
largest groups go first to the split furthest below its share; a warning says when even the
best is far off.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from serve.contract import UserError

SPLITS = ("train", "validation", "test")
# A grouped split is "far" from the requested fractions when a split's share of the rows is
# off by more than this part of what was asked (10 % asked: outside 7.5-12.5 %).
_FAR = 0.25
# Up to this many groups, every assignment of groups to splits is tried (3**10 = 59,049).
_EXHAUSTIVE_GROUPS = 10


def assign(frame: pd.DataFrame, carve: dict[str, float], group_column: str | None, seed: int, label_names: list[str]):
    """The split of each row of ``frame`` ("train" or a key of ``carve``: {split: share of the rows}), and a report
    of how it was made (``method``; for groups ``fill``, ``groups`` and ``warning`` when far off)."""
    if not carve:
        return np.full(len(frame), "train", dtype=object), {"method": "none needed"}
    rng = np.random.default_rng(seed)
    if group_column:
        return _split_groups(frame, carve, group_column, label_names, rng)
    return _split_rows(frame["label"].to_numpy(), carve, label_names, rng), {
        "method": "random by row, stratified by label"
    }


def _split_rows(labels: np.ndarray, carve: dict[str, float], label_names: list[str], rng) -> np.ndarray:
    """Each class's rows shuffled and cut by the fractions: every split gets at least one row of every class."""
    split_of = np.full(len(labels), "train", dtype=object)
    for name in label_names:
        rows = np.flatnonzero(labels == name)
        if len(rows) < len(carve) + 1:
            raise UserError(
                f"class {name!r} has {len(rows)} row(s); train, {' and '.join(carve)} each need one: "
                "add rows of it or remove the class"
            )
        rows = rows[rng.permutation(len(rows))]
        counts = [max(1, math.floor(len(rows) * fraction + 0.5)) for fraction in carve.values()]
        while sum(counts) > len(rows) - 1:  # train keeps at least one row of the class
            counts[counts.index(max(counts))] -= 1
        start = 0
        for split, count in zip(carve, counts, strict=True):
            split_of[rows[start : start + count]] = split
            start += count
    return split_of


def _split_groups(frame: pd.DataFrame, carve: dict[str, float], group_column: str, label_names: list[str], rng):
    """Whole groups to splits: a random fill first, a size-aware one when that lands far off."""
    sizes = frame["group"].value_counts().sort_index()
    splits = ["train", *carve]
    if len(sizes) < len(splits):
        raise UserError(
            f"--group-column {group_column} has {len(sizes)} group(s); a split by group needs at least "
            f"{len(splits)} (one per split): use a column with more values, or none for a random row split"
        )
    names = list(sizes.index[rng.permutation(len(sizes))])
    size = sizes[names].to_numpy()
    classes = pd.crosstab(frame["group"], frame["label"]).reindex(index=names, columns=label_names, fill_value=0)
    targets = np.array([1 - sum(carve.values()), *carve.values()])

    def judge(codes: np.ndarray) -> tuple[bool, float, bool]:
        shares = np.array([size[codes == s].sum() for s in range(len(splits))]) / size.sum()
        covered = all((classes.to_numpy()[codes == s].sum(0) > 0).all() for s in range(len(splits)))
        far = bool((np.abs(shares - targets) > _FAR * targets).any())
        return covered, float(np.abs(shares - targets).sum()), far

    # The random fill: groups in random order, each to the first split still short of its share
    # (test, then validation), the rest to train.  It keeps the test groups a random sample.
    codes = np.zeros(len(names), dtype=int)
    filled = np.zeros(len(splits))
    for i in range(len(names)):
        for s in range(1, len(splits)):
            if filled[s] < targets[s] * size.sum():
                codes[i] = s
                filled[s] += size[i]
                break
    fill = "random"
    covered, deviation, far = judge(codes)
    if far or not covered:
        better = _exhaustive_fill(size, classes.to_numpy(), targets) if len(names) <= _EXHAUSTIVE_GROUPS else None
        if better is None:
            better = _size_ordered_fill(size, targets)
        b_covered, b_deviation, b_far = judge(better)
        if (b_covered, -b_deviation) > (covered, -deviation):
            codes, fill, (covered, deviation, far) = (
                better,
                ("every assignment tried" if len(names) <= _EXHAUSTIVE_GROUPS else "largest groups first"),
                (b_covered, b_deviation, b_far),
            )
    split_of = frame["group"].map(dict(zip(names, (splits[c] for c in codes), strict=True))).to_numpy(dtype=object)
    share = {split: size[codes == s].sum() / size.sum() for s, split in enumerate(splits)}
    target = dict(zip(splits, targets, strict=True))
    in_order = [split for split in SPLITS if split in splits]
    report = {
        "method": f"by {group_column}",
        "fill": fill,
        "groups": {split: int((codes == splits.index(split)).sum()) for split in in_order},
    }
    if far:
        report["warning"] = (
            f"the split by {group_column} ({len(names)} groups) gives "
            + ", ".join(f"{split} {100 * share[split]:.1f} %" for split in in_order)
            + " of the rows, far from the requested "
            + "/".join(f"{100 * target[split]:g}" for split in in_order)
            + " %: the groups are too few or too unequal; use a column with more groups, or no --group-column"
        )
    return split_of, report


def _exhaustive_fill(size: np.ndarray, classes: np.ndarray, targets: np.ndarray) -> np.ndarray | None:
    """The assignment of groups to splits closest to ``targets``, every split holding every class if any does."""
    n_splits, n_groups = len(targets), len(size)
    codes = (np.arange(n_splits**n_groups)[:, None] // n_splits ** np.arange(n_groups)) % n_splits
    members = [(codes == s).astype(np.int64) for s in range(n_splits)]
    rows = np.stack([m @ size for m in members], axis=1)
    nonempty = (rows > 0).all(axis=1)
    covered = np.stack([((m @ classes) > 0).all(axis=1) for m in members], axis=1).all(axis=1)
    allowed = nonempty & covered if (nonempty & covered).any() else nonempty
    if not allowed.any():
        return None
    deviation = np.abs(rows / size.sum() - targets).sum(axis=1)
    return codes[np.where(allowed, deviation, np.inf).argmin()]


def _size_ordered_fill(size: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Largest groups first, each to the split furthest below its share (so train takes the big ones)."""
    codes = np.zeros(len(size), dtype=int)
    filled = np.zeros(len(targets))
    for i in np.argsort(-size, kind="stable"):  # stable: equal sizes keep the seeded random order
        s = int(np.argmax(targets * size.sum() - filled))
        codes[i] = s
        filled[s] += size[i]
    return codes
