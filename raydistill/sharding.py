"""How the student is spread over the train workers (`train.strategy`), and its state in checkpoints.

    ddp   every rank holds the whole student; gradients are all-reduced (Ray Train's `prepare_model`).
    fsdp  torch FSDP2 (`torch.distributed.fsdp.fully_shard`): each transformer block (the classes the
          HF model lists in `_no_split_modules`), then the root (embeddings, final norm, LM head), is
          sharded over the ranks, so parameters, gradients and AdamW state are 1/world per rank; a
          block's parameters are all-gathered for its forward and backward and freed after.

Why FSDP2 called in the train loop and not `ray.train.torch.prepare_model(parallel_strategy="fsdp")`:
Ray 2.60 wraps the model in FSDP1 there and raises "FSDP is only available with GPU-enabled training"
without CUDA; FSDP2 runs on CPU/gloo as on GPU/NCCL (tests/test_fsdp.py runs it on gloo) and is the
API torch recommends. The fused head + loss works unchanged: the root is not resharded after its
forward, so the head weight it reads after the forward is the gathered one (`chunked_loss.model_hidden`).

Checkpoints hold *full* state dicts (torch.distributed.checkpoint.state_dict, gathered to rank 0 on
CPU), not sharded ones: `model.safetensors` has the same keys as a DDP run's, so the export
(save_pretrained) and evaluation read it as they always did, and a run resumes at any world size.
The cost: one full CPU copy of the weights and optimizer state on rank 0 at each checkpoint, and on
every rank while resuming. The optimizer state is keyed by parameter name (DDP's by index): a
checkpoint resumes under the strategy that wrote it.
"""
from __future__ import annotations

from contextlib import contextmanager

from .config import STRATEGIES  # noqa: F401  (the choices of train.strategy)
from .log import log0

__all__ = ["STRATEGIES", "prepare_student", "is_sharded", "gradient_sync", "full_state", "load_full_state",
           "save_pretrained", "local_share", "optimizer_format"]


def prepare_student(student, strategy: str, world: int, label: str):
    """The student on this worker's device, wrapped for `strategy` (FSDP only when world > 1)."""
    import ray.train.torch

    if strategy == "ddp" or world == 1:
        if strategy == "fsdp":
            log0(f"[{label}] train.strategy=fsdp with one worker: nothing to shard, training unsharded")
        return ray.train.torch.prepare_model(student)
    from torch.distributed.fsdp import fully_shard

    model = ray.train.torch.prepare_model(student, parallel_strategy=None)  # device only
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    for m in units:
        fully_shard(m)
    fully_shard(model)
    log0(f"[{label}] FSDP: {len(units)} blocks + the root sharded over {world} ranks")
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def gradient_sync(model, sync: bool):
    """Gradients reduced across ranks only on the micro-batch that completes a step (grad_accum)."""
    if sync:
        yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(model, optimizer, rank: int) -> tuple[dict, dict]:
    """(weights, optimizer state) to checkpoint, on CPU. Under FSDP every rank must call it (it
    all-gathers); rank 0 gets the full dicts, the others empty ones."""
    if not is_sharded(model):
        if rank != 0:
            return {}, {}
        inner = model.module if hasattr(model, "module") else model
        return ({k: v.detach().contiguous().cpu() for k, v in inner.state_dict().items()},
                optimizer.state_dict())
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _full_options(cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_full_state(model, optimizer, weights: dict, optimizer_state: dict) -> None:
    """Load `full_state`'s dicts (every rank passes the full ones; FSDP keeps its own shard)."""
    if not is_sharded(model):
        inner = model.module if hasattr(model, "module") else model
        inner.load_state_dict(weights, strict=False)  # tied weights are stored once per name
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, weights, options=_full_options())
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_full_options())


def save_pretrained(model, path: str, weights: dict) -> None:
    """Rank 0: the student as a save_pretrained directory (under FSDP from the gathered weights;
    transformers writes the original class name, not FSDP's wrapper class)."""
    inner = model.module if hasattr(model, "module") else model
    inner.save_pretrained(path, state_dict=weights if is_sharded(model) else None)


def local_share(model) -> tuple[int, int]:
    """(parameter elements this rank holds, elements of the whole model): evidence of sharding."""
    from torch.distributed.tensor import DTensor

    local = total = 0
    for p in model.parameters():
        total += p.numel()
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return local, total


def optimizer_format(model) -> str:
    """How the optimizer state in a checkpoint is keyed (see the module docstring)."""
    return "by_name" if is_sharded(model) else "by_index"

