"""What a reader sees: samples as verbatim text blocks, upload progress that says little about small files."""

from quantflow.delivery.store import upload_progress
from quantflow.reporting.report import fenced


def test_a_sample_is_a_text_block_that_keeps_its_lines_and_backticks():
    sample = "```python\ndef square(x):\n    return x ** 2\n```"
    block = fenced(sample)
    assert block[0] == "````text" and block[-1] == "````"  # a longer fence than any run of backticks inside
    assert "\n".join(block[1:-1]) == sample
    assert fenced("") == ["```text", "(empty)", "```"]


def test_upload_progress_logs_a_small_file_once_and_a_large_one_by_quarters():
    said = []
    progress = upload_progress(said.append, large=1000)
    for _ in range(10):
        progress("big.safetensors", 100, 1000)
    for _ in range(4):
        progress("config.json", 25, 100)
    assert said == [
        "uploading big.safetensors: 25% of 0.0 MiB",
        "uploading big.safetensors: 50% of 0.0 MiB",
        "uploading big.safetensors: 75% of 0.0 MiB",
        "uploaded big.safetensors (0.0 MiB)",
        "uploaded config.json (0.0 MiB)",
    ]


def test_bitsandbytes_4_bit_layout_costs_its_block_maxima():
    from pathlib import Path

    from quantflow.reporting.bits import bnb_bits

    assert bnb_bits("bnb-nf4", False, Path("unused")) == 4.5  # an fp32 absmax per 64 weights
    assert bnb_bits("bnb-fp4", True, Path("unused")) == 4.127  # 8-bit absmax per 64, one fp32 per 256 blocks
