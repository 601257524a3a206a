"""The workaround for loading a compressed-tensors artifact whose input embedding is quantized in transformers.

transformers 5.17 initializes every module it did not mark as loaded, and its ``_init_weights`` guards a Linear
without ``weight`` (a compressed one stores ``weight_packed``) but not an Embedding: loading stops with
"'Embedding' object has no attribute 'weight'" although the checkpoint holds every part. Within
``embedding_load()`` a compressed Embedding is left to the checkpoint and compressed-tensors decompresses it at the
first forward pass, as it does the Linears. The last lines of
``tests/unit/test_mixed.py::test_quantized_embeddings_ship_standard_compressed_tensors_and_load`` load such an
artifact without it and expect the failure: when they fail, the fix has landed upstream and this module can go.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def embedding_load() -> Iterator[None]:
    from transformers import PreTrainedModel

    original = PreTrainedModel._init_weights

    def guarded(self, module: torch.nn.Module) -> None:
        if isinstance(module, torch.nn.Embedding) and getattr(module, "weight", None) is None:
            return
        original(self, module)

    PreTrainedModel._init_weights = guarded
    try:
        yield
    finally:
        PreTrainedModel._init_weights = original
