"""`causal_lm`: token-level distillation of a causal LM on packed text or on instruction examples.

Input rows (`data.format: text`) are packed windows: `seq_id` int64 + `input_ids` list<uint16|uint32>
of `data.seq_len` tokens. Position j of a row predicts `input_ids[j + 1]`, so a row of L tokens has
P = L - 1 target positions: logits = model(...).logits[:, :-1], labels = input_ids[:, 1:], every
position carries loss.

`data.format: chat | prompt_response` (`raydistill.instruct`): one example per row, right-padded,
with `loss_mask` [L] and `length`; labels are -100 wherever loss_mask[j + 1] == 0 (prompt tokens,
padding), the models see attention_mask = positions < length, and the teacher pass computes and
stores targets only at the loss positions (targets.py). Held-out figures: CE / perplexity,
KL(teacher‖student), top-1 agreement over the loss positions (`raydistill.evaluate.evaluate`).
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
        import dataclasses
        import os

        from ..data import tokenize_and_pack
        from ..instruct import corpus_columns, is_examples, render_batch

        d, trust = self.cfg.data, self.cfg.teacher.trust_remote_code
        path = os.path.expanduser(tokenizer_path)
        if is_examples(d):
            return render_batch, dict(tokenizer_path=path, trust_remote_code=trust, data=dataclasses.asdict(d),
                                      eos_id=eos_id), [c for _, c in corpus_columns(d)]
        return tokenize_and_pack, dict(tokenizer_path=path, trust_remote_code=trust, text_column=d.text_column,
                                       seq_len=d.seq_len, eos_id=eos_id), [d.text_column]

    def preflight(self) -> list[str]:
        """Instruction data: the chat template exists, and the refresh source can keep the loss mask."""
        from ..instruct import is_examples, template_problems
        from ..models import load_tokenizer

        cfg = self.cfg
        if not is_examples(cfg.data):
            return []
        t = cfg.teacher
        tok = load_tokenizer(t.model, trust_remote_code=t.trust_remote_code, revision=t.revision)
        problems = template_problems(tok, cfg.data, t.model)
        if cfg.refresh.policy != "none" and cfg.refresh.source == "on_policy":
            problems.append(f"refresh.source: on_policy rewrites packed text rows, not data.format={cfg.data.format} "
                            "examples (their prompts and loss masks) — use refresh.source=teacher or resample")
        return problems

    def _examples(self) -> bool:
        return self.cfg is not None and self.cfg.data.format != "text"

    def input_schema(self, vocab_size: int) -> pa.Schema:
        from ..instruct import input_fields
        from ..targets import id_type

        fields = [("seq_id", pa.int64()), ("input_ids", pa.list_(id_type(vocab_size)))]
        return pa.schema(fields + (input_fields(vocab_size) if self._examples() else []))

    def inputs_from_arrow(self, batch) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(int_matrix(batch.column("input_ids")))
        if "loss_mask" not in batch.column_names:
            return {"input_ids": ids}
        length = torch.from_numpy(batch.column("length").to_numpy(zero_copy_only=False).astype("int64"))
        return {"input_ids": ids, "loss_mask": torch.from_numpy(int_matrix(batch.column("loss_mask"))) != 0,
                "attention_mask": (torch.arange(ids.shape[1])[None, :] < length[:, None]).long()}

    # ---- positions
    @staticmethod
    def _forward_kwargs(inputs: dict) -> dict:
        return {"attention_mask": inputs["attention_mask"]} if "attention_mask" in inputs else {}

    def logits(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=inputs["input_ids"], **self._forward_kwargs(inputs)).logits[:, :-1]

    def labels(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = inputs["input_ids"][:, 1:]
        if "loss_mask" in inputs:  # examples: no loss on prompt tokens and padding
            labels = labels.masked_fill(~inputs["loss_mask"][:, 1:], -100)
        return labels

    def hidden_states(self, model, inputs: dict[str, torch.Tensor]):
        from ..chunked_loss import model_hidden

        hidden, weight, bias = model_hidden(model, inputs["input_ids"], **self._forward_kwargs(inputs))
        return hidden[:, :-1], weight, bias

    def encode_targets(self, model, inputs, *, params: dict, vocab_size: int, generator) -> dict:
        from ..chunked_loss import encode_chunked, fused_head_problem, model_hidden
        from ..targets import encode

        ids, fwd = inputs["input_ids"], self._forward_kwargs(inputs)
        kw = dict(fmt=params["format"], k=params.get("k", 1), samples=params.get("samples", 1),
                  capture_temperature=params["capture_temperature"], vocab_size=vocab_size, generator=generator,
                  loss_mask=inputs.get("loss_mask"))
        # Only the first vocab_size (W, models.ModelInfo) logits are scored: a head wider than the
        # shared width has padding rows there, which no stored id or probability may name.
        if fused_head_problem(model):  # e.g. soft-capped logits: only the model's own logits are right
            out = encode(model(input_ids=ids, **fwd).logits[..., :vocab_size], ids, **kw)
        else:
            # Logits position-chunk by position-chunk from the final hidden states: a pass never holds
            # [B, L, V] logits (same targets as encode on them; chunked_loss.encode_chunked).
            hidden, weight, bias = model_hidden(model, ids, **fwd)
            out = encode_chunked(hidden, weight[:vocab_size], ids, bias=None if bias is None else bias[:vocab_size],
                                 **kw)
        if "loss_mask" in inputs:  # a store of examples keeps the input columns beside its targets
            out["loss_mask"] = list(inputs["loss_mask"].cpu().numpy().astype("uint8"))
            out["length"] = list(inputs["attention_mask"].sum(1).cpu().numpy())
        return out

    # ---- evaluation
    def evaluate(self, student, teacher, eval_table: pa.Table, *, batch_size: int, max_rows: int,
                 vocab_width: int | None = None) -> dict:
        from ..evaluate import eval_input_ids, evaluate

        ids = eval_input_ids(eval_table, max_rows=max_rows)
        kw = {"vocab_width": vocab_width}
        if "loss_mask" in eval_table.column_names:  # examples: the figures cover the loss positions only
            rows = self.inputs_from_arrow(eval_table.slice(0, ids.shape[0]))
            kw.update(loss_mask=rows["loss_mask"], attention_mask=rows["attention_mask"])
        return dict(evaluate(student, teacher, ids, batch_size=batch_size, **kw), eval_sequences=int(ids.shape[0]))
