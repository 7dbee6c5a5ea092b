"""The final student on disk: `<output_dir>/<name>/` = save_pretrained weights + the tokenizer,
loadable with the task's Auto class. Written under a temporary name and renamed, so a reader finds
the previous student or the whole new one."""
from __future__ import annotations

import os
import shutil
import uuid


def export_student(result, cfg, out_dir: str, name: str) -> str:
    """Copy the final checkpoint's student (save_pretrained) + the tokenizer to <out_dir>/<name>."""
    from .models import load_tokenizer

    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".tmp-{name}-{uuid.uuid4().hex[:8]}")
    with result.checkpoint.as_directory() as d:
        shutil.copytree(os.path.join(d, "student"), tmp)
    load_tokenizer(cfg.teacher.model, trust_remote_code=cfg.teacher.trust_remote_code).save_pretrained(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final
