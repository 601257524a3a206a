"""The core pipeline on a GPU: W4 variants evaluated on int4 kernels, every variant timed with CUDA graphs."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_pipeline_on_cuda_uses_int4_kernels_and_cuda_graphs(tmp_path):
    from quantflow import pipeline
    from quantflow.reporting.report import load_report
    from quantflow.spec import parse_spec
    from tests.conftest import make_model, small_spec

    model = make_model(tmp_path / "model", hidden=256)
    raw = small_spec(
        model,
        tmp_path / "out",
        tmp_path / "cache",
        [{"method": "rtn", "group_size": 64}, {"method": "gptq", "group_size": 64}],
    )
    raw["device"] = "cuda"
    rows = {r.name: r for r in load_report(pipeline.run(parse_spec(raw), progress=lambda _: None) / "report.json").rows}
    assert all("int4 tinygemm" in rows[name].runtime for name in ("rtn", "gptq"))
    assert all(s["harness"].endswith("+ CUDA graph") for r in rows.values() for s in r.speed)
    assert all(
        "fused q/k/v and gate/up" in s["harness"] for r in rows.values() for s in r.speed
    )  # dense and int4 alike
    assert all(r.memory_kind == "cuda_max_allocated" for r in rows.values())
    assert rows["gptq"].kl_mean > 0 and rows["rtn"].perplexity > 1
    assert all(r.compile_seconds > 0 for r in rows.values())  # reported apart from the timed decode
    # the second W4 variant of the same shape compiles from the first one's Inductor cache
    assert rows["gptq"].compile_seconds < rows["rtn"].compile_seconds, {n: r.compile_seconds for n, r in rows.items()}
    assert (tmp_path / "cache" / "inductor").is_dir()
