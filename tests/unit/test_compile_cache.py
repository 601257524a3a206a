"""Inductor compiles into the run's step cache even when an import already asked torch for its cache folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# A fresh step process as the pipeline starts one: torch._dynamo is imported first (torchvision.ops does so), which
# makes torch write its machine-wide default folder into os.environ; only then does the step point Inductor at the
# run's cache, and compiles.
STEP = """
import json, os, sys
import torch, torch._dynamo
from quantflow.infra.resources import Resources
Resources(device="cpu", compile_cache=sys.argv[1]).use_compile_cache()
torch.compile(lambda x: x.sin() + 1)(torch.randn(8))
print(json.dumps({k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}))
"""


def run_step(folder: Path, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    done = subprocess.run(
        [sys.executable, "-c", STEP, str(folder)], env={**clean, **env}, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_compiles_into_the_runs_cache_after_torch_dynamo_was_imported(tmp_path):
    folder = tmp_path / "cache" / "inductor"
    env = run_step(folder)
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    assert (folder / "fxgraph").is_dir(), sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "missing"
    assert env["TRITON_CACHE_DIR"] is None  # Triton's default lies under Inductor's folder: the run's


def test_a_users_own_setting_wins(tmp_path):
    mine, triton = tmp_path / "mine", tmp_path / "triton"
    env = run_step(tmp_path / "cache" / "inductor", TORCHINDUCTOR_CACHE_DIR=str(mine), TRITON_CACHE_DIR=str(triton))
    assert env == {"TORCHINDUCTOR_CACHE_DIR": str(mine), "TRITON_CACHE_DIR": str(triton)}
    assert (mine / "fxgraph").is_dir() and not (tmp_path / "cache").exists()
