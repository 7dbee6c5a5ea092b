"""Errors raised to users. All are ValueErrors that pickle, because they cross Ray processes."""


class RaydistillError(ValueError):
    """Base class: something the user can fix; the message says what and how."""


class ConfigError(RaydistillError):
    """Every problem of a config at once, one per line: `key: what is wrong — fix`."""

    def __init__(self, errors):
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"invalid config ({len(self.errors)} problem(s)):\n{lines}")

    def __reduce__(self):
        return (type(self), (self.errors,))


class ModelError(RaydistillError):
    """A model or tokenizer cannot be used as configured (names the model and the fix)."""


class StoreError(RaydistillError):
    """The soft-target store cannot be used as asked (names the store and the fix)."""


class CorruptShardError(StoreError):
    """A shard version on disk does not match its manifest record (checksum, rows, missing)."""
