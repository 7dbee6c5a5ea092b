"""raydistill: distributed knowledge distillation on Ray with a cached, refreshed soft-target store.

    from raydistill import load_config, run
    report = run(load_config("configs/x.yaml", ["train.max_steps=100"]))
"""
from .config import Config, load_config
from .errors import ConfigError, CorruptShardError, ModelError, RaydistillError, StoreError
from .pipeline import run
from .store import SoftTargetStore

__all__ = ["Config", "ConfigError", "CorruptShardError", "ModelError", "RaydistillError", "SoftTargetStore",
           "StoreError", "load_config", "run"]
