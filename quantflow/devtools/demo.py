"""The embedded demo run: real model, real corpus, sized for a 2-core CPU with no network.

SmolLM2-135M-Instruct (hidden size 576, so group size 64: 128 does not divide it),
CPython's pydoc corpus split into disjoint calibration and evaluation halves, and one
scheme (W4, group 64, asymmetric: AWQ's own scheme) for RTN, AWQ and GPTQ so that the
report compares like with like. Calibration and grid sizes are chosen for a 2-core machine;
docs/demo.md has the measurements behind these choices.
"""

from __future__ import annotations

from pathlib import Path

from quantflow.spec import (
    FRESH_OUTPUT,
    AWQVariant,
    BnbVariant,
    CalibrationSpec,
    ConstraintsSpec,
    EvaluationSpec,
    GPTQVariant,
    OutputSpec,
    RTNVariant,
    RunSpec,
    SpeedSpec,
)


def demo_spec(output: Path = FRESH_OUTPUT) -> RunSpec:
    """The demo's spec; `quantflow demo` writes runs/demo, the served deployment's form a fresh folder per run."""
    scheme = {"bits": 4, "group_size": 64, "symmetric": False}
    return RunSpec(
        calibration=CalibrationSpec(num_samples=16, seq_len=256, min_chars=500),
        variants=[
            RTNVariant(**scheme),
            AWQVariant(**scheme, n_grid=10),
            GPTQVariant(**scheme),
            BnbVariant(method="bnb-nf4"),
        ],
        evaluation=EvaluationSpec(
            window=512,
            max_windows=16,
            kl_tokens=1024,
            max_new_tokens=24,
            speed=SpeedSpec(batch_sizes=[1, 4], prompt_len=32, gen_len=16, prefill_len=512, warmup=1, repeats=3),
        ),
        constraints=ConstraintsSpec(max_ppl_increase_pct=15.0),  # a 135M model loses more to 4 bits than a 7B one
        output=OutputSpec(dir=output),
        device="auto",
    )
