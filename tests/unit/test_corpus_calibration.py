"""Text sources, the calibration/evaluation split, and the tokenized calibration set."""

import json

import pytest

from quantflow.errors import QuantflowError
from quantflow.inputs.calibration import build_calibration, load_samples, tokenize_samples
from quantflow.inputs.corpus import calibration_documents, evaluation_documents, load_texts, prepare
from quantflow.spec import CalibrationSpec, EvaluationSpec


def test_pydoc_split_is_disjoint_and_deterministic():
    cal, ev = CalibrationSpec(min_chars=500), EvaluationSpec()
    calibration, evaluation = calibration_documents(cal, ev), evaluation_documents(cal, ev)
    assert calibration and evaluation
    assert not set(calibration) & set(evaluation)
    assert calibration == calibration_documents(cal, ev)
    assert all(len(text) >= 500 for text in calibration)


def test_other_eval_source_drops_texts_calibration_saw(tmp_path):
    shared = "A paragraph that both files contain, long enough to be kept by the filter."
    (tmp_path / "cal.txt").write_text(f"{shared}\n\nOnly in calibration, another long enough paragraph of text here.")
    (tmp_path / "ev.txt").write_text(f"{shared}\n\nOnly in evaluation: a different paragraph of reasonable length.")
    cal = CalibrationSpec(source=str(tmp_path / "cal.txt"), min_chars=10)
    ev = EvaluationSpec(corpus=str(tmp_path / "ev.txt"))
    assert evaluation_documents(cal, ev) == ["Only in evaluation: a different paragraph of reasonable length."]


def test_file_formats(tmp_path):
    rows = [{"text": "first document"}, {"text": "second document"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "a.csv").write_text("id,text\n1,first document\n2,second document\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["first document", "second document"]}), tmp_path / "a.parquet")
    assert load_texts(str(tmp_path / "a.jsonl")) == ["first document", "second document"]
    assert load_texts(str(tmp_path / "a.csv")) == ["first document", "second document"]
    assert load_texts(str(tmp_path / "a.parquet"), "body") == ["first document", "second document"]
    with pytest.raises(QuantflowError, match="no column 'text'.*body"):
        load_texts(str(tmp_path / "a.parquet"))


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "holds no text"),
        (b"\n\n  \n", "holds no text"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 20, "binary|not UTF-8"),
    ],
)
def test_empty_or_binary_files_are_refused(tmp_path, content, words):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(QuantflowError, match=words):
        load_texts(str(path))


def test_missing_file():
    with pytest.raises(QuantflowError, match="does not exist"):
        load_texts("/no/such/file.txt")


def test_prepare_filters_and_dedups():
    assert prepare(["long text", "long text", "x"], min_chars=3, dedup=True) == ["long text"]
    assert prepare(["long text", "long text"], min_chars=3, dedup=False) == ["long text", "long text"]


def test_samples_are_chunked_seeded_and_bounded(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = calibration_documents(CalibrationSpec(min_chars=500), EvaluationSpec())
    spec = CalibrationSpec(num_samples=20, seq_len=64, seed=1)
    first, again = tokenize_samples(texts, tokenizer, spec), tokenize_samples(texts, tokenizer, spec)
    other = tokenize_samples(texts, tokenizer, spec.model_copy(update={"seed": 2}))
    assert first == again and first != other
    assert len(first) == 20 and all(16 <= len(ids) <= 64 for ids in first)


def test_samples_start_with_bos_where_the_tokenizer_starts_a_text_with_it(tiny_model):
    """Gemma's tokenizer puts BOS before every text and the model expects it first; SmolLM2's (like the tiny one)
    adds none, and its samples stay as they were."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = calibration_documents(CalibrationSpec(min_chars=500), EvaluationSpec())
    spec = CalibrationSpec(num_samples=8, seq_len=64)
    plain = tokenize_samples(texts, tokenizer, spec)
    assert not any(ids[0] == tokenizer.bos_token_id for ids in plain)
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert tokenizer("a")["input_ids"][0] == bos
    started = tokenize_samples(texts, tokenizer, spec)
    assert all(ids[0] == bos and bos not in ids[1:] and len(ids) <= 64 for ids in started)
    assert max(len(ids) for ids in started) == 64


def test_too_few_samples_names_the_number(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    with pytest.raises(QuantflowError, match=r"(?s)gives only 2 usable samples.*lower calibration.num_samples to 2"):
        tokenize_samples(
            ["short text one " * 30, "short text two " * 30], tokenizer, CalibrationSpec(num_samples=5, seq_len=512)
        )


def test_chat_template_needs_a_template(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    with pytest.raises(QuantflowError, match="no chat template"):
        tokenize_samples(["text " * 50], tokenizer, CalibrationSpec(num_samples=1, chat_template=True))
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    [ids] = tokenize_samples(["hello world " * 5], tokenizer, CalibrationSpec(num_samples=1, chat_template=True))
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


def test_build_saves_samples_stats_and_hash(tiny_model, tmp_path):
    spec = CalibrationSpec(num_samples=12, seq_len=64)
    record = build_calibration(spec, EvaluationSpec(), str(tiny_model), tmp_path, tmp_path)
    samples = load_samples(record)
    assert record.samples == len(samples) == 12
    assert record.tokens == sum(len(s) for s in samples)
    assert sum(record.histogram.values()) == 12
    assert json.loads((tmp_path / "stats.json").read_text())["hash"] == record.hash
    other = tmp_path / "other"
    other.mkdir()
    changed = build_calibration(spec.model_copy(update={"seed": 9}), EvaluationSpec(), str(tiny_model), other, other)
    assert changed.hash != record.hash


def test_the_default_sample_count_takes_what_the_source_holds_and_says_so(tiny_model):
    from transformers import AutoTokenizer

    from quantflow.inputs.calibration import shortfall

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    spec = CalibrationSpec(seq_len=512)  # num_samples left at its default
    samples = tokenize_samples(["short text one " * 30, "short text two " * 30], tokenizer, spec)
    assert len(samples) == 2
    assert "2 samples, fewer than the default 128" in shortfall(spec, len(samples))
    assert (
        shortfall(spec.model_copy(update={"num_samples": 2}), 2) is None
    )  # a count the user chose and got: no warning
    with pytest.raises(QuantflowError, match="gives only 0 usable samples"):
        tokenize_samples(["x"], tokenizer, spec)


def unreachable_hub() -> str:
    """A hub endpoint nothing answers on (a loopback port just freed), so the test is offline on any machine."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_an_unreachable_hub_is_one_line_naming_the_offline_sources(tmp_path):
    """Offline, `datasets` retried for about a minute and printed its network error at each retry."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "HF_ENDPOINT": unreachable_hub(), "QUANTFLOW_HOME": str(tmp_path / "qf")}
    command = [sys.executable, "-m", "deployments.cli", "run", "--engine", "local", "--output", str(tmp_path / "out")]
    start = time.monotonic()
    result = subprocess.run(
        [*command, "--calibration", "hf:no/such-dataset"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2 and time.monotonic() - start < 120  # no minute of retries (imports take a while)
    said = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(said) if line.startswith("error: ")]  # the console's stage lines come first
    assert len(errors) == 1 and said[errors[0]].startswith(
        "error: calibration.source hf:no/such-dataset: the Hugging Face hub (127.0.0.1) is unreachable"
    ), result.stderr
    assert said[errors[0] + 1 :] == [
        "  fix: use an offline source: a .txt/.jsonl/.parquet/.csv file, builtin:pydoc, or a local "
        "dataset folder as hf:/path/to/folder; or connect this machine to the hub"
    ], result.stderr
    assert not (tmp_path / "out").exists()


def test_a_local_dataset_folder_loads_without_the_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", unreachable_hub())
    (tmp_path / "data").mkdir()
    rows = [{"text": f"Paragraph {i} of a dataset kept on this machine."} for i in range(3)]
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    assert load_texts(f"hf:{tmp_path / 'data'}") == [row["text"] for row in rows]
