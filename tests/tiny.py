"""Tiny real HF models and corpora built from config, offline, for tests (no hub access)."""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import torch

WORDS = ("the cat dog sat on a mat and ran to house tree big small red blue green "
         "one two three four five six seven eight nine ten fast slow up down left right").split()


def corpus_texts(n_docs: int = 200, seed: int = 0) -> list[str]:
    """Deterministic pseudo-sentences with a learnable structure."""
    g = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n_docs):
        n = int(torch.randint(8, 40, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (n,), generator=g).tolist()
        texts.append(" ".join(WORDS[i] for i in idx) + ".")
    return texts


def write_corpus(path: str, texts: list[str], fmt: str = "parquet", column: str = "text") -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if fmt == "parquet":
        pq.write_table(pa.table({column: texts}), path)
    else:
        with open(path, "w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({column: t}) + "\n")
    return path


def make_tokenizer(out_dir: str, texts: list[str] | None = None, vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on `texts`, saved in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts or corpus_texts()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return fast


def make_gpt2(out_dir: str, tokenizer, n_layer: int = 2, n_embd: int = 32, n_positions: int = 64, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_layer=n_layer, n_embd=n_embd, n_head=2,
                     n_positions=n_positions, bos_token_id=tokenizer.eos_token_id,
                     eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


def make_llama(out_dir: str, tokenizer, n_layer: int = 2, hidden: int = 32, max_pos: int = 64, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=n_layer, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=max_pos, bos_token_id=tokenizer.eos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


# ---- classification (BERT family): a word-level tokenizer with BERT's special tokens

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def make_bert_tokenizer(out_dir: str, words: list[str]):
    """A WordLevel tokenizer over `words` that adds [CLS] ... [SEP] like BERT's, saved in HF format."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(list(BERT_SPECIALS) + sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(out_dir)
    return fast


def make_bert_classifier(out_dir: str | None, tokenizer, labels: list[str], n_layer: int = 2, hidden: int = 32,
                         max_pos: int = 64, seed: int = 0, kind: str = "bert"):
    """A BertForSequenceClassification (or DistilBert, kind="distilbert") with id2label / label2id."""
    from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                              DistilBertForSequenceClassification)

    torch.manual_seed(seed)
    names = dict(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    if kind == "distilbert":
        cfg = DistilBertConfig(vocab_size=len(tokenizer), dim=hidden, hidden_dim=hidden * 2, n_layers=n_layer,
                               n_heads=2, max_position_embeddings=max_pos, pad_token_id=tokenizer.pad_token_id,
                               **names)
        model = DistilBertForSequenceClassification(cfg)
    else:
        cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=n_layer, num_attention_heads=2, max_position_embeddings=max_pos,
                         pad_token_id=tokenizer.pad_token_id, **names)
        model = BertForSequenceClassification(cfg)
    if out_dir is not None:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return model


# ---- instruction data (raydistill.instruct): a chat template and prompt / response examples

# A ChatML-like template for the tiny byte-level tokenizer (which has no chat template of its own).
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# The same with {% generation %} markers, so that transformers' return_assistant_tokens_mask works.
CHAT_TEMPLATE_GENERATION = (
    "{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}<|endoftext|>{% endgeneration %}{% else %}{{ m['content'] }}<|endoftext|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def example_pairs(n: int = 120, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, response) pairs of pseudo-sentences, prompts up to 10 words, responses up to 12."""
    texts = corpus_texts(2 * n, seed)
    return [(" ".join(texts[2 * i].split()[:10]), " ".join(texts[2 * i + 1].split()[:12])) for i in range(n)]


def write_examples(path: str, pairs: list[tuple[str, str]], kind: str = "prompt_response") -> str:
    """A Parquet corpus of examples: prompt/response columns, or a `messages` list of {role, content}."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if kind == "chat":
        table = pa.table({"messages": [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                                       for p, r in pairs]})
    else:
        table = pa.table({"prompt": [p for p, _ in pairs], "response": [r for _, r in pairs]})
    pq.write_table(table, path)
    return path


# ---- two domains with different token statistics, and a teacher trained on one (tests/test_teachers_e2e.py)

CODE_WORDS = "def return if else for in while x y z i n = + - * ( ) : [ ] 0 1 2".split()
PROSE_WORDS = WORDS[:17]


def markov_texts(words: list[str], n_docs: int, seed: int, chain: int = 0, p_second: float = 0.3) -> list[str]:
    """Documents (drawn with `seed`) of a Markov chain over `words` (fixed by `chain`): each word is
    followed by one of two successors (the second with probability p_second), so a model that knows
    the chain predicts the next word to about 0.6 nats and one that has never seen it is lost."""
    g = torch.Generator().manual_seed(chain)
    succ = [torch.randperm(len(words), generator=g)[:2].tolist() for _ in words]
    g = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n_docs):
        w, out = int(torch.randint(0, len(words), (1,), generator=g)), []
        for _ in range(int(torch.randint(16, 40, (1,), generator=g))):
            out.append(words[w])
            w = succ[w][int(torch.rand(1, generator=g) < p_second)]
        texts.append(" ".join(out))
    return texts


def lm_windows(tokenizer, texts: list[str], length: int) -> torch.Tensor:
    """`texts` tokenized, each followed by EOS, concatenated and cut into [N, length] windows."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // length
    return torch.tensor(ids[: n * length]).view(n, length)


def train_lm(model, windows: torch.Tensor, *, steps: int, batch_size: int = 32, lr: float = 3e-3, seed: int = 0):
    """Plain-PyTorch next-token training on `windows` [N, L] (seeded, one thread); eval mode after."""
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared, loaded machine: 2 threads per op mostly wait for each other
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    try:
        for _ in range(steps):
            batch = windows[torch.randint(0, len(windows), (batch_size,), generator=g)]
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def lm_ce(model, windows: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) of `model` on `windows` [N, L]."""
    with torch.no_grad():
        return float(model(input_ids=windows, labels=windows).loss)
