"""`causal_lm`: token-level distillation of a causal LM on packed text.

Input rows are packed windows: `seq_id` int64 + `input_ids` list<uint16|uint32> of `data.seq_len`
tokens. Position j of a row predicts `input_ids[j + 1]`, so a row of L tokens has P = L - 1
target positions: logits = model(...).logits[:, :-1], labels = input_ids[:, 1:], every position
carries loss. Held-out figures: CE / perplexity, KL(teacher‖student), top-1 agreement
(`raydistill.evaluate.evaluate`).
"""
from __future__ import annotations

import pyarrow as pa
import torch

from .base import Task, int_matrix


class CausalLM(Task):
    name = "causal_lm"
    formats = ("sampled", "topk")
    default_format = "sampled"

    # ---- models
    def load_model(self, name_or_path: str, **kwargs):
        from ..models import load_causal_lm

        return load_causal_lm(name_or_path, **kwargs)

    def build_student(self, *, seed: int):
        from ..models import build_student

        return build_student(self.cfg.student, self.cfg.teacher.model,
                             trust_remote_code=self.cfg.teacher.trust_remote_code, seed=seed)

    # ---- data
    def map_batches_fn(self, tokenizer_path: str, eos_id: int) -> tuple:
        import os

        from ..data import tokenize_and_pack

        d = self.cfg.data
        return tokenize_and_pack, dict(tokenizer_path=os.path.expanduser(tokenizer_path),
                                       trust_remote_code=self.cfg.teacher.trust_remote_code,
                                       text_column=d.text_column, seq_len=d.seq_len, eos_id=eos_id), [d.text_column]

    def input_schema(self, vocab_size: int) -> pa.Schema:
        from ..targets import id_type

        return pa.schema([("seq_id", pa.int64()), ("input_ids", pa.list_(id_type(vocab_size)))])

    def inputs_from_arrow(self, batch) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(int_matrix(batch.column("input_ids")))}

    # ---- positions
    def logits(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=inputs["input_ids"]).logits[:, :-1]

    def labels(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return inputs["input_ids"][:, 1:]

    def hidden_states(self, model, inputs: dict[str, torch.Tensor]):
        from ..chunked_loss import model_hidden

        hidden, weight, bias = model_hidden(model, inputs["input_ids"])
        return hidden[:, :-1], weight, bias

    def encode_targets(self, model, inputs, *, params: dict, vocab_size: int, generator) -> dict:
        from ..chunked_loss import encode_chunked, fused_head_problem, model_hidden
        from ..targets import encode

        ids = inputs["input_ids"]
        kw = dict(fmt=params["format"], k=params.get("k", 1), samples=params.get("samples", 1),
                  capture_temperature=params["capture_temperature"], vocab_size=vocab_size, generator=generator)
        if fused_head_problem(model):  # e.g. soft-capped logits: only the model's own logits are right
            return encode(model(input_ids=ids).logits, ids, **kw)
        # Logits position-chunk by position-chunk from the final hidden states: a pass never holds
        # [B, L, V] logits (same targets as encode on them; chunked_loss.encode_chunked).
        hidden, weight, bias = model_hidden(model, ids)
        return encode_chunked(hidden, weight, ids, bias=bias, **kw)

    # ---- evaluation
    def evaluate(self, student, teacher, eval_table: pa.Table, *, batch_size: int, max_rows: int) -> dict:
        from ..evaluate import eval_input_ids, evaluate

        ids = eval_input_ids(eval_table, max_rows=max_rows)
        return dict(evaluate(student, teacher, ids, batch_size=batch_size), eval_sequences=int(ids.shape[0]))
