"""GPU work-pool base job templates, derived from Prefect's own defaults.

``deployments/pools/<type>.default.json`` are Prefect 3.9's default templates
(``prefect work-pool get-default-base-job-template --type <type>``); this module adds the GPU
parts and writes ``deployments/pools/<type>-gpu.json``, which a team passes to
``prefect work-pool create quantflow-gpu --type <type> --base-job-template <file>``.

- process: one worker per GPU host and card; ``CUDA_VISIBLE_DEVICES`` defaults to "0" and is a
  job variable, so each worker/deployment pins its card.
- docker: ``container_create_kwargs.device_requests`` asks the NVIDIA runtime for GPUs
  (``gpu_count`` variable, -1 = all).
- kubernetes: ``nvidia.com/gpu`` limits (``gpu_count``), a node selector and a toleration for
  GPU nodes' taint, each a job variable.

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
    template = copy.deepcopy(base)
    template["variables"]["properties"]["env"]["default"] = {"CUDA_VISIBLE_DEVICES": "0"}
    return template


def docker_gpu(base: dict) -> dict:
    template = copy.deepcopy(base)
    _variable(template, "gpu_count", {"type": "integer", "default": -1, "title": "GPUs", "description": "GPUs to expose (-1 = all)."})
    template["job_configuration"]["container_create_kwargs"] = {
        "device_requests": [{"Driver": "nvidia", "Count": "{{ gpu_count }}", "Capabilities": [["gpu"]]}]}
    return template


def kubernetes_gpu(base: dict) -> dict:
    template = copy.deepcopy(base)
    _variable(template, "gpu_count", {"type": "integer", "default": 1, "title": "GPUs", "description": "nvidia.com/gpu per job."})
    _variable(template, "node_selector", {"type": "object", "default": {"nvidia.com/gpu.present": "true"}, "title": "Node selector"})
    _variable(template, "tolerations", {"type": "array", "title": "Tolerations",
                                        "default": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]})
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
