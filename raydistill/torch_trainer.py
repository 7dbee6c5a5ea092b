"""The TorchTrainer our fits run on: Ray Train's, less the DatasetManager actor it starts for every fit.

Ray Train 2.60 starts a DatasetManager actor per worker group whether or not `datasets=` is given. Our
workers read the store themselves (`shard_reader`), so for us it is an idle process per fit and per
restart (1.4 s of CPU each in the test suite, bench/cpu_by_process.py). With datasets given, nothing changes.
Ray Train is pinned to 2.60.* (pyproject), whose callback list this relies on.
"""
from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback


class _DataContextOnly(DatasetsCallback):
    """Still hands the driver's DataContext to the workers; creates no dataset shard provider."""

    def before_init_train_context(self, workers):
        return {}


class DistillTrainer(TorchTrainer):
    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [_DataContextOnly(self.train_run_context, {}) if type(cb) is DatasetsCallback else cb
                for cb in callbacks]
