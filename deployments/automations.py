"""Server-side automations quantflow relies on.

A worker host that dies (OOM killer, preemption, power) cannot report its flow run's end, so
the run would show "Running" forever and block nothing but confuse everyone. Flow runs emit
heartbeats (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, set in ``prefect.yaml``); this automation,
Prefect's documented recipe for self-hosted servers, marks a run Crashed when its heartbeats
stop. Re-triggering the same spec then resumes from the content-addressed cache.
"""

from __future__ import annotations

from datetime import timedelta

ZOMBIE_AUTOMATION = "quantflow: crash zombie flow runs"
HEARTBEAT_SECONDS = 30
MISSING_AFTER = timedelta(seconds=3 * HEARTBEAT_SECONDS)


def ensure_zombie_automation() -> bool:
    """Create the zombie-run automation on the configured server unless it exists; True when created."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        Automation.read(name=ZOMBIE_AUTOMATION)
        return False
    except ValueError:
        pass
    ends = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}
    Automation(
        name=ZOMBIE_AUTOMATION,
        description=f"Mark a flow run Crashed when it sent no heartbeat for {MISSING_AFTER.seconds} s (its host died).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *ends},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=MISSING_AFTER,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message="quantflow: no heartbeat from the flow run's host; re-run to resume from cache",
            )
        ],
    ).create()
    return True


if __name__ == "__main__":  # `python -m deployments.automations` against $PREFECT_API_URL (docs/operations.md)
    print(("created" if ensure_zombie_automation() else "already present") + f": {ZOMBIE_AUTOMATION}")
