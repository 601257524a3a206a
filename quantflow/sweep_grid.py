"""A sweep grid's combinations as named variant entries: the part of ``quantflow.sweep`` the spec's own validation
needs (it counts the grid against ``max_variants``).

It takes the spec's ``Variant`` union as an argument instead of importing the spec, so the spec can import it
without an import circle; ``quantflow.sweep`` validates the entries against the variant models.
"""

from __future__ import annotations

import itertools
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError


def variant_name(entry: dict[str, Any]) -> str:
    """A name that says what the combination is: ``gptq-w4-g64-asym``, ``awq-w4-g128-sym-n_grid10``, ``fp8``."""
    parts = [entry["method"]]
    if "bits" in entry:
        parts.append(f"w{entry['bits']}")
    if "group_size" in entry:
        parts.append("ch" if entry["group_size"] is None else f"g{entry['group_size']}")
    if "symmetric" in entry:
        parts.append("sym" if entry["symmetric"] else "asym")
    fixed = {"method", "calibration", *AXES.values()}
    parts += [f"{key}{str(value).lower()}" for key, value in entry.items() if key not in fixed]
    if entry.get("calibration") is not None:
        parts.append(f"cal-{entry['calibration'].label()}")
    return "-".join(parts)


AXES = {"bits": "bits", "group_sizes": "group_size", "symmetric": "symmetric"}


def entries(sweep: Any, variant: Any, reads: Callable[[Any], bool]) -> list[dict[str, Any]]:
    """Every combination of a ``SweepSpec`` as a variant entry, each axis applied only where the method's model (in
    the spec's ``Variant`` union, passed in) has the field; the calibration axis only where ``reads`` (the spec's
    ``needs_calibration``) says the variant reads calibration data."""
    found, seen = [], set()
    for method in sweep.methods:
        fields = set(variant_classes(variant)[method].model_fields)
        axes = {field: getattr(sweep, name) for name, field in AXES.items() if field in fields}
        settings = {k: v if isinstance(v, list) else [v] for k, v in sweep.settings.get(method, {}).items()}
        axes.update(settings)
        for values in itertools.product(*axes.values()):
            for entry in _calibrated({"method": method, **dict(zip(axes, values))}, sweep.calibrations, variant, reads):
                name = variant_name(entry)
                if name not in seen:
                    seen.add(name)
                    found.append({**entry, "name": name})
    return found


def _calibrated(
    entry: dict[str, Any], choices: list[Any], variant: Any, reads: Callable[[Any], bool]
) -> list[dict[str, Any]]:
    """The entry once per calibration source when it reads calibration data, else once as it is: an RTN or FP8-rtn
    variant calibrated on two sources would be the same variant twice."""
    if not choices or not _reads_calibration(entry, variant, reads):
        return [entry]
    return [{**entry, "calibration": choice} for choice in choices]


def _reads_calibration(entry: dict[str, Any], variant: Any, reads: Callable[[Any], bool]) -> bool:
    """Whether the entry's variant reads calibration data; an entry the schema refuses is kept once (it is dropped
    with its reason later)."""
    try:
        return reads(TypeAdapter(variant).validate_python({**entry, "name": ""}))
    except ValidationError:
        return False


def variant_classes(variant: Any) -> dict[str, type[BaseModel]]:
    """Each method name -> its variant model, read from the spec's discriminated union ``Variant``."""
    union = typing.get_args(variant)[0]
    return {
        method: model
        for model in typing.get_args(union)
        for method in typing.get_args(model.model_fields["method"].annotation)
    }
