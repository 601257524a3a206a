"""Shared fixtures: a tiny random Llama with a small BPE tokenizer trained on the pydoc corpus.

The model is random, so its perplexity is near the vocabulary size; tests assert
behaviour (files, states, relations between numbers), not model quality.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def make_tokenizer(folder: Path):
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator([topics[k] for k in sorted(topics)][:60], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_model(
    folder: Path,
    hidden: int = 64,
    layers: int = 2,
    tie: bool = False,
    seed: int = 0,
    classes: tuple[type, type] | None = None,
    **fields: Any,
) -> Path:
    """A tiny random model with the test tokenizer, in bf16: Llama unless ``classes`` (config, model) names another
    architecture, whose own config ``fields`` go over the shared defaults."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config_class, model_class = classes or (LlamaConfig, LlamaForCausalLM)
    tokenizer = make_tokenizer(folder)
    torch.manual_seed(seed)
    defaults = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = model_class(config_class(**{**defaults, **fields})).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model_96(tmp_path_factory) -> Path:
    """Hidden size 96: group size 64 divides nothing, 32 divides everything."""
    return make_model(tmp_path_factory.mktemp("tiny-llama-96"), hidden=96)


@pytest.fixture
def cache_root(tmp_path) -> Path:
    return tmp_path / "cache"


def small_spec(model: Path, out: Path, cache: Path, variants: list[dict], **evaluation) -> dict:
    """A spec dictionary sized for seconds on a CPU."""
    return {
        "model": {"source": str(model)},
        "calibration": {"num_samples": 8, "seq_len": 64, "min_chars": 200},
        "variants": variants,
        "evaluation": {
            "window": 64,
            "max_windows": 4,
            "kl_tokens": 64,
            "max_new_tokens": 4,
            "prompts": ["Hello"],
            "speed": {
                "batch_sizes": [1, 2],
                "prompt_len": 8,
                "gen_len": 4,
                "prefill_len": 16,
                "warmup": 0,
                "repeats": 1,
            },
            **evaluation,
        },
        "output": {"dir": str(out), "cache_dir": str(cache)},
        "device": "cpu",
    }


def run_interpreted(module: str, function: str) -> dict:
    """``module.function()``'s JSON result from a child process under Triton's CPU interpreter: Triton reads
    TRITON_INTERPRET once, before it compiles anything, and this process may hold compiled kernels."""
    root = Path(__file__).parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(root), *sys.path])}
    code = f"import json; from {module} import {function}; print(json.dumps({function}()))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def docstring_corpus(path: Path) -> Path:
    """A JSONL calibration file of another kind of text than the default corpus: standard-library docstrings."""
    import collections
    import csv
    import difflib
    import email
    import functools
    import inspect
    import itertools
    import logging
    import pathlib
    import shutil
    import tarfile
    import typing

    modules = (collections, csv, difflib, email, functools, itertools, logging, pathlib, shutil, tarfile, typing)
    texts = [inspect.getdoc(module) or "" for module in modules]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts if len(text) > 200))
    return path


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def report_row(name: str, **fields: Any):
    """A report Row for tests of what is computed from rows (fronts, the best pick): the measurements a test does not
    read are set to neutral values, the ones it does come in ``fields``."""
    from quantflow.reporting.report import Row

    neutral = dict(
        method="rtn",
        ppl_delta_pct=0.0,
        kl_mean=None,
        size_kind="files",
        size_ratio=1.0,
        peak_memory_mb=0.0,
        memory_kind="rss",
        speed=[],
        quantize_seconds=None,
        quantize_peak_memory_mb=None,
        quantized_layers=None,
        skipped_layers=[],
        group_size=None,
        group_size_note=None,
        runtime="eager",
        artifact=None,
    )
    return Row(name=name, **{**neutral, **fields})
