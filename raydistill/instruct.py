"""Instruction data: chat / prompt-response examples -> fixed-length input rows with a loss mask.

`data.format` chooses how corpus rows become the causal LM's input rows:

    text             packed windows (`data.tokenize_and_pack`): seq_id + input_ids, every position has loss
    chat             `data.messages_column`: a list of {role, content}, rendered with the teacher
                     tokenizer's chat template (or `data.chat_template`: a Jinja string or a file)
    prompt_response  `data.prompt_column`, `data.response_column`: prompt tokens, then response
                     tokens + EOS (no special tokens added around them)

An example is one row (never packed across examples), truncated to `data.seq_len` and right-padded
with the pad id (tokenizer.pad_token_id, else EOS). Input rows of chat / prompt_response:

    seq_id      int64
    input_ids   list<ID>     exactly seq_len tokens
    loss_mask   list<uint8>  exactly seq_len: 1 where token j is a response token that carries loss
                             (target position j - 1, which predicts token j, carries loss); 0 on prompt
                             tokens and padding. `data.loss_on: all`: 1 on every real token after the first.
    length      int32        real (non-pad) tokens

The prompt of a row is input_ids[:first j with loss_mask[j] == 1] (`prompt_ids`; what a generation
pass reads). An example whose response is cut off entirely by truncation, or whose messages are not
a list of {role, content} strings, is skipped and counted like an empty text.

The chat mask is derived by rendering prefixes, as text: for the i-th assistant message, the render
of messages[:i] with the generation prompt ends where its content starts, the render of
messages[:i + 1] where the turn ends (its end-of-turn tokens included); the full render is then
tokenized once with offsets, and a token is a response token when it *starts* inside such a span.
Why not `return_assistant_tokens_mask`: it needs `{% generation %}` markers that most shipped
templates (Qwen2.5's among them) lack; prefix rendering works with any template that renders a
conversation prefix as a prefix of its text (checked per example: one that does not is refused).
Token ids equal `tokenizer.apply_chat_template(messages, tokenize=True)` (tests/test_instruct.py).
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

FORMATS = ("text", "chat", "prompt_response")
LOSS_ON = ("response", "all")
ROLES_WITH_LOSS = ("assistant",)


def is_examples(cfg_data) -> bool:
    """True when input rows are examples with a loss mask (chat / prompt_response), not packed text."""
    return getattr(cfg_data, "format", "text") != "text"


def corpus_columns(cfg_data) -> list[tuple[str, str]]:
    """[(config key, column)] the format reads from the corpus, the first one first in the batch."""
    d = cfg_data
    if d.format == "chat":
        return [("data.messages_column", d.messages_column)]
    if d.format == "prompt_response":
        return [("data.prompt_column", d.prompt_column), ("data.response_column", d.response_column)]
    return [("data.text_column", d.text_column)]


def input_fields(vocab_size: int) -> list[tuple[str, pa.DataType]]:
    """The input-row columns of an example store after seq_id and input_ids (module docstring)."""
    return [("loss_mask", pa.list_(pa.uint8())), ("length", pa.int32())]


# ---------------------------------------------------------------- chat templates

def chat_template_text(value: str | None) -> str | None:
    """data.chat_template as Jinja text: the string itself, or the contents of the file it names."""
    if value is None:
        return None
    if "{%" in value or "{{" in value:
        return value
    path = os.path.expanduser(value)
    if not os.path.isfile(path):
        from .errors import ConfigError

        raise ConfigError([f"data.chat_template: {value!r} is neither a Jinja template (no '{{%' or '{{{{') "
                           "nor an existing file — give the template text or the path of a .jinja file"])
    with open(path, encoding="utf-8") as f:
        return f.read()


def template_problems(tokenizer, cfg_data, model: str) -> list[str]:
    """Why this tokenizer can't render chat rows as configured (`key: what — fix`), before Ray starts."""
    if cfg_data.format != "chat":
        return []
    out = []
    try:
        template = chat_template_text(cfg_data.chat_template)
    except ValueError as e:  # ConfigError
        return list(getattr(e, "errors", [str(e)]))
    if template is None and not getattr(tokenizer, "chat_template", None):
        out.append(f"data.chat_template: the tokenizer of {model} has no chat template, and data.format is chat "
                   "— set data.chat_template to a Jinja template (text or a file path), or use "
                   "data.format=prompt_response")
    if not getattr(tokenizer, "is_fast", False):
        out.append(f"data.format: chat masks need a fast tokenizer (token offsets), and {model}'s is not — "
                   "save a tokenizer.json beside the model, or use data.format=prompt_response")
    return out


# ---------------------------------------------------------------- rendering (workers)

def _messages(value) -> list[dict] | None:
    """A corpus value -> [{role, content}] (Parquet list<struct> arrives as lists or numpy arrays of
    dicts), or None when it is not a usable conversation."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        return None
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return None
        out.append({"role": m["role"], "content": m["content"]})
    return out if any(m["role"] in ROLES_WITH_LOSS for m in out) else None


def _text(value) -> str | None:
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def render_chat(tokenizer, messages: list[dict], template: str | None) -> tuple[list[int], list[int]]:
    """(token ids of the rendered conversation, 1 where the token belongs to an assistant turn)."""
    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                             add_generation_prompt=gen)

    text = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] not in ROLES_WITH_LOSS:
            continue
        start, end = render(messages[:i], True), render(messages[:i + 1], False)
        if not (text.startswith(end) and end.startswith(start)):
            raise ValueError("data.chat_template: this template does not render a conversation's prefix as a "
                             "prefix of its text (e.g. it drops earlier turns' reasoning), so response "
                             "tokens can't be located — use a template that does, or data.format=prompt_response")
        spans.append((len(start), len(end)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= s < b for a, b in spans)) for s, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def render_prompt_response(tokenizer, prompt: str, response: str, eos_id: int) -> tuple[list[int], list[int]]:
    """(prompt tokens + response tokens + EOS, 1 on the response tokens and the EOS)."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [eos_id]
    return list(p) + r, [0] * len(p) + [1] * len(r)


def pad_id_of(tokenizer, eos_id: int | None = None) -> int:
    for v in (tokenizer.pad_token_id, tokenizer.eos_token_id, eos_id):
        if v is not None:
            return int(v)
    return 0


def render_rows(tokenizer, rows: list[dict], cfg_data, *, eos_id: int | None = None) -> dict[str, np.ndarray]:
    """A batch of corpus rows ({column: value} each) -> the input-row columns (module docstring):
    input_ids [n, L] int64, loss_mask [n, L] uint8, length [n] int32, plus valid [n] bool (False:
    the row is unusable and its other columns are padding). One output row per input row."""
    d, seq_len = cfg_data, cfg_data.seq_len
    eos = eos_id if eos_id is not None else tokenizer.eos_token_id
    eos = 0 if eos is None else int(eos)
    pad = pad_id_of(tokenizer, eos)
    template = chat_template_text(d.chat_template) if d.format == "chat" else None
    n = len(rows)
    ids = np.full((n, seq_len), pad, dtype=np.int64)
    mask = np.zeros((n, seq_len), dtype=np.uint8)
    length = np.zeros(n, dtype=np.int32)
    valid = np.zeros(n, dtype=bool)
    for i, row in enumerate(rows):
        if d.format == "chat":
            msgs = _messages(row.get(d.messages_column))
            if msgs is None:
                continue
            tok, m = render_chat(tokenizer, msgs, template)
        else:
            prompt, response = _text(row.get(d.prompt_column)), _text(row.get(d.response_column))
            if prompt is None or not response or not response.strip():
                continue
            tok, m = render_prompt_response(tokenizer, prompt, response, eos)
        tok, m = tok[:seq_len], m[:seq_len]
        m[0:1] = [0]  # the first token is predicted by nothing
        if d.loss_on == "all":
            m = [0] + [1] * (len(tok) - 1)
        if len(tok) < 2 or not any(m):
            continue  # truncation left no response token to learn
        ids[i, :len(tok)], mask[i, :len(tok)], length[i], valid[i] = tok, m, len(tok), True
    return {"input_ids": ids, "loss_mask": mask, "length": length, "valid": valid}


def prompt_ids(input_ids_row, loss_mask_row) -> list[int]:
    """The prompt of an input row: its tokens before the first loss token (all of them if none)."""
    m = np.asarray(loss_mask_row)
    on = np.flatnonzero(m)
    first = int(on[0]) if on.size else len(m)
    return [int(t) for t in np.asarray(input_ids_row)[:first]]


def render_batch(batch: dict, *, tokenizer_path: str, trust_remote_code: bool, data: dict, eos_id: int) -> dict:
    """Ray Data / in-process stage (the contract of `data.tokenize_and_pack`): a batch {column: values}
    of corpus rows -> input rows + valid/docs/skipped, the first row carrying the batch's counts."""
    from .config import DataConfig
    from .data import _tokenizer

    cfg_data = DataConfig(**data)
    names = [c for _, c in corpus_columns(cfg_data)]
    n = len(batch[names[0]])
    rows = [{c: batch[c][i] for c in names} for i in range(n)]
    out = render_rows(_tokenizer(tokenizer_path, trust_remote_code), rows, cfg_data, eos_id=eos_id)
    if n == 0:  # keep the counts' row even for an empty batch
        out = {k: np.zeros((1,) + v.shape[1:], v.dtype) for k, v in out.items()}
    docs, skipped = np.zeros(len(out["valid"]), np.int64), np.zeros(len(out["valid"]), np.int64)
    docs[0], skipped[0] = int(out["valid"].sum()), n - int(out["valid"].sum())
    return dict(out, docs=docs, skipped=skipped)
