"""Plan a run: every check that can fail before heavy work, so bad input costs seconds, not a GPU hour."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from quantflow.errors import QuantflowError
from quantflow.evaluation.int4 import GROUP_SIZES
from quantflow.infra.cache import StepCache, default_cache_root
from quantflow.infra.resources import Resources, check_fits, pick_device
from quantflow.inputs.corpus import check_source
from quantflow.inputs.sources import ModelRef, resolve_model
from quantflow.quantization.quantize import Scheme, check_ignore, resolve_group_size, weightless_model
from quantflow.spec import BnbVariant, RunSpec

Progress = Callable[[str], None]


class Plan(BaseModel):
    """A validated run: the spec, the resolved model, the device and each weight variant's scheme."""

    spec: RunSpec
    model: ModelRef
    device: str
    cache_root: str
    schemes: dict[str, Scheme]
    gather_only: bool = False

    @property
    def cache(self) -> StepCache:
        return StepCache(Path(self.cache_root), read_only=self.gather_only)

    @property
    def resources(self) -> Resources:
        spec = self.spec
        return Resources(
            device=self.device,
            dtype=spec.model.dtype,
            gpu_memory_gb=spec.gpu_memory_gb,
            timeout_s=spec.step_timeout_s,
            compile_cache=str(Path(self.cache_root) / "inductor"),
        )


def check_environment(spec: RunSpec) -> None:
    """Refuse variants this machine cannot run, before anything is loaded."""
    from quantflow.infra.environment import package_version

    bnb = [v.name for v in spec.variants if isinstance(v, BnbVariant)]
    if bnb and package_version("bitsandbytes") is None:
        raise QuantflowError(
            f"variants {', '.join(bnb)} need bitsandbytes, which is not installed",
            "pip install 'quantflow[bnb]' or drop those variants",
        )
    if spec.evaluation.lm_eval:
        from quantflow.evaluation.lm_eval_tasks import check_tasks

        check_tasks(spec.evaluation.lm_eval)


def check_folder(field: str, folder: Path) -> None:
    """A folder the run will write must be a folder, or creatable: found now, not after an hour of GPU work."""
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise QuantflowError(f"{field} {folder} cannot be a folder: {existing} is a file", f"point {field} at a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise QuantflowError(
            f"{field} {folder} is not writable ({existing} is read-only for this user)",
            f"point {field} at a writable folder",
        )


def plan(spec: RunSpec, progress: Progress = print) -> Plan:
    """Validate the spec against this machine and the model's shapes; resolve the model source."""
    device = pick_device(spec.device)
    check_environment(spec)
    cache = StepCache(spec.output.cache_dir or default_cache_root())
    check_folder("output.dir", Path(spec.output.dir))
    check_folder("output.cache_dir", cache.root)
    check_source("calibration.source", spec.calibration.source)
    check_source("evaluation.corpus", spec.evaluation.corpus)
    if spec.output.store:
        from quantflow.delivery.store import check_access

        check_access(spec.output.store)
    progress(f"model: resolving {spec.model.source}")
    model = resolve_model(spec.model, cache)
    if device == "cuda":
        import psutil
        import torch

        from quantflow.evaluation.evaluate import folder_size

        check_fits(
            folder_size(Path(model.path)),
            spec.gpu_memory_gb,
            torch.cuda.device_count(),
            psutil.virtual_memory().available,
        )
    skeleton = weightless_model(model.path, spec.model.trust_remote_code)
    schemes = {}
    for variant in spec.variants:
        if isinstance(variant, BnbVariant):
            continue
        check_ignore(skeleton, variant)
        schemes[variant.name] = scheme = resolve_group_size(skeleton, variant)
        if spec.evaluation.kernels == "int4" and (variant.bits != 4 or scheme.group_size not in GROUP_SIZES):
            raise QuantflowError(
                f"variant '{variant.name}' ({variant.bits} bits, group size {scheme.group_size}) cannot run on the "
                f"int4 kernels, which need 4 bits in groups of {GROUP_SIZES}",
                "set evaluation.kernels to 'auto' or 'dense', or change the variant",
            )
    return Plan(spec=spec, model=model, device=device, cache_root=str(cache.root), schemes=schemes)
