"""The flows' parameters where Prefect rebuilds them: `Flow.serve` pickles the flow (cloudpickle) into the process
that runs it, and Prefect builds the parameter model there from the function's annotations."""

import cloudpickle
import pytest

from flows.quantize import quantflow_run, quantflow_variant
from quantflow.devtools.demo import demo_spec
from quantflow.errors import QuantflowError


def as_served(flow):
    """The flow as a served run's process gets it."""
    return cloudpickle.loads(cloudpickle.dumps(flow))


@pytest.mark.parametrize("flow", [quantflow_run, quantflow_variant], ids=lambda flow: flow.name)
def test_a_served_flow_validates_the_forms_default_spec(flow):
    parameters = as_served(flow).validate_parameters({"spec": demo_spec().model_dump(mode="json")})
    assert parameters["spec"] == demo_spec()


@pytest.mark.parametrize(
    "variants, says",
    [
        ([{"method": "rtn"}, {"method": "rtn"}], "(spec): Value error, variant names must be unique; repeated: rtn"),
        ([{"method": "rtn", "bits": 5}], "variants.0.rtn.bits: Input should be 2, 3, 4 or 8"),
    ],
)
def test_a_bad_form_value_fails_with_the_error_the_cli_gives(variants, says):
    """Not Prefect's dump of Pydantic's errors: the QuantflowError the CLI prints for the same value."""
    with pytest.raises(QuantflowError) as raised:
        as_served(quantflow_run).validate_parameters({"spec": {"variants": variants}})
    assert str(raised.value).startswith(f"invalid run spec in the flow run's parameters: {says}")
    assert "\n  fix: correct the named fields" in str(raised.value)
