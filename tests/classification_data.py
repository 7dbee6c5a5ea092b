"""A small labelled text set the repo builds offline: 3-topic sentences from word lists.

Each sentence holds filler words plus topic words; its true topic is the one with the most words
(two of the true topic, one distractor from another topic, so the rule is not a single keyword).
`noise` flips a share of the stored labels to another topic at random: the hard-label student
learns those flips, a teacher trained on clean labels does not pass them on — the gap the
end-to-end test measures. Labels are strings, mapped through the teacher's label2id.
"""
from __future__ import annotations

import numpy as np

TOPICS = {
    "sports": "goal match team coach score league player ball win season".split(),
    "science": "atom cell energy theory data experiment lab gene planet physics".split(),
    "politics": "vote party law senate election policy minister campaign court tax".split(),
}
LABELS = list(TOPICS)
FILLER = ("the a of and to in is was it that this on for with as at by from new report "
          "today said about after more people year week").split()
WORDS = FILLER + [w for ws in TOPICS.values() for w in ws]


def topic_rows(n: int, *, seed: int = 0, noise: float = 0.0) -> dict[str, list]:
    """{"text": [...], "label": [noisy label strings], "true_label": [...]} for `n` sentences."""
    rng = np.random.default_rng(seed)
    texts, labels, truth = [], [], []
    for _ in range(n):
        y = int(rng.integers(len(LABELS)))
        other = int((y + 1 + rng.integers(len(LABELS) - 1)) % len(LABELS))
        words = list(rng.choice(FILLER, size=int(rng.integers(4, 9))))
        words += list(rng.choice(TOPICS[LABELS[y]], size=2)) + [rng.choice(TOPICS[LABELS[other]])]
        rng.shuffle(words)
        shown = y
        if rng.random() < noise:
            shown = int((y + 1 + rng.integers(len(LABELS) - 1)) % len(LABELS))
        texts.append(" ".join(words))
        labels.append(LABELS[shown])
        truth.append(LABELS[y])
    return {"text": texts, "label": labels, "true_label": truth}


def train_classifier(model, tokenizer, rows: dict, *, steps: int, batch_size: int = 32, lr: float = 3e-3,
                     seq_len: int = 16, seed: int = 0):
    """Plain-PyTorch fine-tuning on `rows` (label strings through model.config.label2id); eval mode after."""
    import torch

    torch.manual_seed(seed)
    enc = tokenizer(rows["text"], truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
    y = torch.tensor([model.config.label2id[v] for v in rows["label"]])
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=g)
        out = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx], labels=y[idx])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()
