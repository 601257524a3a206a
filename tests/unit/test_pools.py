"""GPU work-pool templates: generated from Prefect's defaults, with the GPU parts in place."""

import json

from deployments.pools import BUILDERS, POOLS


def load(kind):
    return json.loads((POOLS / f"{kind}-gpu.json").read_text())


def test_committed_templates_are_current():
    for kind, build in BUILDERS.items():
        assert build(json.loads((POOLS / f"{kind}.default.json").read_text())) == load(kind), f"run python -m deployments.pools ({kind})"


def test_gpu_parts():
    assert load("process")["variables"]["properties"]["env"]["default"] == {"CUDA_VISIBLE_DEVICES": "0"}
    docker = load("docker")
    assert docker["job_configuration"]["container_create_kwargs"]["device_requests"][0]["Capabilities"] == [["gpu"]]
    pod = load("kubernetes")["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert pod["nodeSelector"] == "{{ node_selector }}" and pod["tolerations"] == "{{ tolerations }}"
