"""GPU work-pool templates: generated from Prefect's defaults, with the GPU parts in place, and each GPU
worker's own card (its CUDA_VISIBLE_DEVICES) reaching the runs it takes."""

import json
from pathlib import Path

import yaml

from deployments.pools import BUILDERS, POOLS

ROOT = Path(__file__).parents[2]


def load(kind):
    return json.loads((POOLS / f"{kind}-gpu.json").read_text())


def test_committed_templates_are_current():
    for kind, build in BUILDERS.items():
        assert build(json.loads((POOLS / f"{kind}.default.json").read_text())) == load(kind), (
            f"run python -m deployments.pools ({kind})"
        )


def test_gpu_parts():
    docker = load("docker")
    assert docker["job_configuration"]["container_create_kwargs"]["device_requests"][0]["Capabilities"] == [["gpu"]]
    pod = load("kubernetes")["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert (
        load("kubernetes")["variables"]["properties"]["gpu_count"]["default"] == 1
    )  # the device plugin: one card per pod
    assert pod["nodeSelector"] == "{{ node_selector }}" and pod["tolerations"] == "{{ tolerations }}"


def test_no_job_variable_overrides_the_workers_card():
    """Prefect's process worker runs a flow with {**os.environ, **job_env}: a CUDA_VISIBLE_DEVICES job variable
    would put every worker's runs on that one card."""
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    for deployment in deployments:
        env = (deployment.get("work_pool") or {}).get("job_variables", {}).get("env", {})
        assert "CUDA_VISIBLE_DEVICES" not in env, deployment["name"]
    for kind in BUILDERS:
        variables = load(kind)["variables"]["properties"]
        assert "CUDA_VISIBLE_DEVICES" not in json.dumps(variables.get("env", {}).get("default", {})), kind


def test_a_docker_pool_requests_its_own_cards():
    """Rendered with Prefect's own templating, as the worker does."""
    from prefect.utilities.templating import apply_values

    template = load("docker")
    values = {name: spec.get("default") for name, spec in template["variables"]["properties"].items()}
    rendered = apply_values(template["job_configuration"], {**values, "gpu_ids": ["1"]})
    assert rendered["container_create_kwargs"]["device_requests"][0]["DeviceIDs"] == ["1"]
    assert apply_values(template["job_configuration"], values)["container_create_kwargs"]["device_requests"][0][
        "DeviceIDs"
    ] == ["0"]


def test_each_deployments_form_defaults_fit_its_pool():
    """The local (CPU) deployment's form opens on the demo's spec, sized for a 2-core machine; the GPU ones on
    specs whose variants the default model can take."""
    from quantflow.devtools.demo import demo_spec
    from quantflow.spec import RunSpec

    deployments = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    local = RunSpec.model_validate(deployments["local"]["parameters"]["spec"])
    assert local == demo_spec(local.output.dir)
    for name in ("on-demand", "fan-out"):
        spec = RunSpec.model_validate(deployments[name].get("parameters", {}).get("spec", {}))
        assert all(getattr(v, "group_size", "auto") == "auto" for v in spec.variants), name
    # whole runs on the GPU pool ask for CUDA, so a worker without it refuses them at plan time (fan-out's children
    # take their parent's spec, whose plan runs on the CPU pool)
    for name in ("nightly", "on-demand"):
        assert RunSpec.model_validate(deployments[name]["parameters"]["spec"]).device == "cuda", name
