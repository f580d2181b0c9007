"""Silence the third-party noise a run prints that says nothing about the run.

Called once when `thinklab` is imported, before torch or torchao load. Each filter is
narrow, by logger or by module and category, never a global ignore:

- torchao logs "Failed to load ..._C_*.so" at import for every optional CUDA/CUTLASS
  kernel library the wheel ships, on any host without them (the formats thinklab runs
  on CPU do not use them);
- torch's pytree logs that torchao's `register_constant` on an Enum is deprecated, and
  older transformers/torch pairs warn (FutureWarning) that `_register_pytree_node` is;
- torchao and torch.ao warn (Deprecation/Future/UserWarning) about their own APIs'
  futures, which a user of thinklab cannot act on.

Warnings from thinklab itself, and from the libraries about what a run does (a
generation config, a tokenizer), are left alone.
"""

from __future__ import annotations

import logging
import warnings

_QUIET_LOGGERS = ("torchao", "torch.utils._pytree")
_NOISY_MODULES = r"(torchao|torch\.ao)(\..*)?"


def silence_third_party() -> None:
    """Install the filters (idempotent: `warnings.filterwarnings` replaces an equal filter)."""
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=_NOISY_MODULES)
    warnings.filterwarnings("ignore", message=r".*_register_pytree_node.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*register_constant\(\) on Enum subclasses is deprecated")
