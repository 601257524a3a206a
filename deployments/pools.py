"""GPU work-pool base job templates, derived from Prefect's own defaults.

``deployments/pools/<type>.default.json`` are Prefect 3.9's default templates
(``prefect work-pool get-default-base-job-template --type <type>``); this module adds the GPU
parts and writes ``deployments/pools/<type>-gpu.json``, which a team passes to
``prefect work-pool create quantflow-gpu --type <type> --base-job-template <file>``.

A worker's card is the worker's, not the deployment's: each GPU worker is started with its own
``CUDA_VISIBLE_DEVICES`` and every flow run it takes must use that card. So no template or
deployment sets ``CUDA_VISIBLE_DEVICES`` as a job variable (Prefect's process worker builds a run's
environment as ``{**os.environ, **job_env}``: a job variable would override every worker's card).

- process: the flow-run process inherits the worker's ``CUDA_VISIBLE_DEVICES``.
- docker: ``container_create_kwargs.device_requests`` asks the NVIDIA runtime for the cards in the
  ``gpu_ids`` job variable (default ``["0"]``). A docker worker's environment does not reach its
  containers, and Prefect 3.9's server refuses templates that read it (``{{ $VAR }}``), so a host
  with several cards runs one docker pool per card, each with its own ``gpu_ids`` default.
- kubernetes: ``nvidia.com/gpu`` limits (``gpu_count``, default 1: the device plugin gives each
  pod its own card), a node selector and a toleration for GPU nodes' taint, each a job variable.

    python -m deployments.pools     # regenerate the *-gpu.json files
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

POOLS = Path(__file__).parent / "pools"


def _variable(template: dict, name: str, schema: dict) -> None:
    template["variables"]["properties"][name] = schema


def process_gpu(base: dict) -> dict:
    return copy.deepcopy(base)  # the worker's own environment, CUDA_VISIBLE_DEVICES included, reaches its runs


def docker_gpu(base: dict) -> dict:
    template = copy.deepcopy(base)
    _variable(
        template,
        "gpu_ids",
        {
            "type": "array",
            "items": {"type": "string"},
            "default": ["0"],
            "title": "GPUs",
            "description": "NVIDIA device ids (or UUIDs) the container gets: one pool per card.",
        },
    )
    template["job_configuration"]["container_create_kwargs"] = {
        "device_requests": [{"Driver": "nvidia", "DeviceIDs": "{{ gpu_ids }}", "Capabilities": [["gpu"]]}]
    }
    return template


def kubernetes_gpu(base: dict) -> dict:
    template = copy.deepcopy(base)
    _variable(
        template,
        "gpu_count",
        {"type": "integer", "default": 1, "title": "GPUs", "description": "nvidia.com/gpu per job."},
    )
    _variable(
        template,
        "node_selector",
        {"type": "object", "default": {"nvidia.com/gpu.present": "true"}, "title": "Node selector"},
    )
    _variable(
        template,
        "tolerations",
        {
            "type": "array",
            "title": "Tolerations",
            "default": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    )
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    pod["nodeSelector"] = "{{ node_selector }}"
    pod["tolerations"] = "{{ tolerations }}"
    pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpu_count }}"
    return template


BUILDERS = {"process": process_gpu, "docker": docker_gpu, "kubernetes": kubernetes_gpu}


def write_all() -> list[Path]:
    written = []
    for kind, build in BUILDERS.items():
        base = json.loads((POOLS / f"{kind}.default.json").read_text())
        target = POOLS / f"{kind}-gpu.json"
        target.write_text(json.dumps(build(base), indent=2) + "\n")
        written.append(target)
    return written


if __name__ == "__main__":
    for path in write_all():
        print(path)
