"""How often a classification student learns in the end-to-end test's budget, over seeds.

    .venv/bin/python bench/classification_seeds.py [--seeds 10]

The data and teacher of tests/test_classification.py's end-to-end test (a 2x64 BERT teacher trained
on clean sentences; 800 sentences whose labels are 30% wrong, the last quarter held out), then, for
each student shape and learning rate, plain-PyTorch training of a randomly initialised student
(the test's 240 steps of batch 32, AdamW, warm-up 10 + cosine, grad clip 1.0, raydistill's
`distill_loss` at alpha 0.9 / T 2 vs hard labels) for every seed. Printed per setting: the held-out
accuracy of both arms per seed, and in how many seeds the distilled student beats the hard-label
one by more than the test's 0.05. No Ray: this measures the optimisation, not the pipeline.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "tests"))

SETTINGS = [  # (label, student config overrides, lr)
    ("1x64 lr 3e-3 (the test before 2026-12-02)", {}, 3e-3),
    ("1x64 lr 1e-3", {}, 1e-3),
    ("1x128 lr 1e-3 (the test now)", {"hidden_size": 128, "intermediate_size": 256}, 1e-3),
]
STEPS, BATCH, MARGIN = 240, 32, 0.05


def main(argv=None) -> int:
    import torch
    from transformers import BertForSequenceClassification

    import classification_data as cd
    import tiny
    from raydistill.losses import distill_loss
    from raydistill.targets import from_logits
    from raydistill.train import lr_lambda

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10)
    args = ap.parse_args(argv)

    tok = tiny.make_bert_tokenizer(tempfile.mkdtemp(), cd.WORDS)
    teacher = tiny.make_bert_classifier(None, tok, cd.LABELS, n_layer=2, hidden=64, seed=1)
    cd.train_classifier(teacher, tok, cd.topic_rows(1500, seed=1), steps=150, seq_len=16)
    rows = cd.topic_rows(800, seed=2, noise=0.3)
    enc = tok(rows["text"], truncation=True, max_length=16, padding="max_length", return_tensors="pt")
    y = torch.tensor([teacher.config.label2id[v] for v in rows["label"]])
    n_train = 600
    with torch.no_grad():
        t_logits = teacher(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits

    def accuracy(model) -> float:
        model.eval()
        with torch.no_grad():
            out = model(input_ids=enc["input_ids"][n_train:], attention_mask=enc["attention_mask"][n_train:]).logits
        return round((out.argmax(-1) == y[n_train:]).float().mean().item(), 3)

    def train(over: dict, lr: float, seed: int, distilled: bool) -> float:
        conf = copy.deepcopy(teacher.config)
        conf.num_hidden_layers = 1
        for k, v in over.items():
            setattr(conf, k, v)
        torch.manual_seed(seed)
        student = BertForSequenceClassification(conf)
        opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(10, STEPS))
        g = torch.Generator().manual_seed(seed)
        student.train()
        for _ in range(STEPS):
            idx = torch.randint(0, n_train, (BATCH,), generator=g)
            logits = student(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx]).logits
            labels = y[idx].unsqueeze(1)
            targets = from_logits(t_logits[idx].unsqueeze(1), labels)
            loss, _ = distill_loss(logits.unsqueeze(1), targets, labels, alpha=0.9 if distilled else 0.0,
                                   temperature=2.0 if distilled else 1.0, loss="forward_kl")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
        return accuracy(student)

    print(f"teacher held-out accuracy (noisy labels): {accuracy(teacher)}")
    results = []
    for label, over, lr in SETTINGS:
        pairs = [(train(over, lr, s, True), train(over, lr, s, False)) for s in range(args.seeds)]
        wins = sum(d > h + MARGIN for d, h in pairs)
        results.append({"setting": label, "pairs (distilled, hard-label)": pairs, "wins": wins})
        print(f"{label}: distilled > hard-label + {MARGIN} in {wins} of {args.seeds} seeds; {pairs}", flush=True)
    out = os.path.join(ROOT, "bench", "results", f"classification-seeds-{time.strftime('%Y-%m-%d')}.json")
    with open(out, "w") as f:
        json.dump({"steps": STEPS, "batch": BATCH, "margin": MARGIN, "results": results}, f, indent=1)
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
