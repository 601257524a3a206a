"""The W8 recipes through the pipeline on a GPU: FP8 on FP8 matmuls, INT8 W8A8 on int8 matmuls, W8A16 on the
int8 weight-only kernel, each layer checked against its dequantized weights at load and the rows timed."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
        reason="needs a CUDA device with FP8 matmuls (compute capability 8.9+)",
    ),
]


def test_w8_recipes_run_on_their_cuda_kernels(tmp_path):
    from quantflow import pipeline
    from quantflow.reporting.report import load_report
    from quantflow.spec import parse_spec
    from tests.conftest import make_model, small_spec

    model = make_model(tmp_path / "model", hidden=256)
    variants = [
        {"method": "fp8"},
        {"method": "int8"},
        {"method": "gptq", "bits": 8, "group_size": None, "name": "gptq-w8"},
    ]
    raw = small_spec(model, tmp_path / "out", tmp_path / "cache", variants)
    raw["device"] = "cuda"
    rows = {r.name: r for r in load_report(pipeline.run(parse_spec(raw), progress=lambda _: None) / "report.json").rows}
    assert "FP8 matmuls" in rows["fp8"].runtime, rows["fp8"].runtime
    assert "int8 matmuls" in rows["int8"].runtime, rows["int8"].runtime
    assert "int8 weight-only kernel" in rows["gptq-w8"].runtime, rows["gptq-w8"].runtime
    for name in ("fp8", "int8", "gptq-w8"):
        row = rows[name]
        assert 0 < row.kl_mean < 0.05, (name, row.kl_mean)  # 8-bit rows stay close to the baseline
        assert all(s["decode_tokens_per_s"] > 0 for s in row.speed), (name, row.speed)
