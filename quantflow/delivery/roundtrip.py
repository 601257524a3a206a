"""Round-trip check of a stored artifact: pull it, reload it, and get the local copy's perplexity.

An upload verified by sha256 proves the bytes; this proves the bytes still make the model:
the pulled folder loads in a fresh process and scores a few evaluation windows exactly as the
local folder does. Off by default (it costs a download and two short evaluations per variant).
"""

from __future__ import annotations

import math
import shutil
import uuid
from pathlib import Path

from pydantic import BaseModel

from quantflow.errors import QuantflowError
from quantflow.spec import RunSpec, StoreSpec


class RoundTrip(BaseModel):
    uri: str
    windows: int
    perplexity_local: float
    perplexity_pulled: float


def slice_perplexities(folders: list[str], run: RunSpec, device: str, windows: int) -> list[float]:
    """Perplexity of each folder on the first ``windows`` evaluation windows (one process, same tokens)."""
    from quantflow.evaluation.evaluate import eval_tokens, load_for_eval, score, window_span
    from quantflow.infra.resources import compute_dtype
    from quantflow.inputs.corpus import evaluation_documents

    protocol = run.evaluation.model_copy(update={"max_windows": windows, "kl_tokens": 0})
    texts = evaluation_documents(run.calibration, run.evaluation)
    result = []
    for folder in folders:
        model, tokenizer = load_for_eval(folder, device, compute_dtype(device, run.model.dtype))
        span, bos = window_span(protocol, model, tokenizer)
        nll, _, _, _ = score(model, eval_tokens(texts, tokenizer), protocol, span, bos, None, None)
        result.append(math.exp(nll))
        del model
    return result


def roundtrip(uri: str, store: StoreSpec, local: Path, run: RunSpec, device: str, scratch_root: Path) -> RoundTrip:
    """Pull ``uri`` into a scratch folder and compare its slice perplexity with ``local``'s; raise on a mismatch."""
    from quantflow.delivery.store import pull
    from quantflow.infra.steps import isolated

    scratch = scratch_root / f".roundtrip-{uuid.uuid4().hex[:8]}"
    scratch_root.mkdir(parents=True, exist_ok=True)
    try:
        pull(uri, scratch, store)
        windows = store.roundtrip_windows
        local_ppl, pulled_ppl = isolated(
            "roundtrip", run.step_timeout_s, slice_perplexities, [str(local), str(scratch)], run, device, windows
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not math.isclose(local_ppl, pulled_ppl, rel_tol=1e-6):
        raise QuantflowError(
            f"{uri} reloads with perplexity {pulled_ppl:.6f} on {windows} windows, the local copy gives "
            f"{local_ppl:.6f}",
            "do not use this artifact; re-run the upload and check the server",
        )
    return RoundTrip(uri=uri, windows=windows, perplexity_local=local_ppl, perplexity_pulled=pulled_ppl)
