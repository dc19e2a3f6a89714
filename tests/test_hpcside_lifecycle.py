"""One vocabulary: instance phases and the words people see for a model (hpcside.lifecycle)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from hpcside.lifecycle import Phase, Stage, Status, service_status
from hpcside.state import Instance, SchedulerState, ServiceState

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_000_000.0


def inst(iid: str, phase: Phase, node: str = "", reason: str = "") -> Instance:
    return Instance(iid=iid * 12, service="s", model="m", submitted_at=NOW - 10, phase=phase, node=node,
                    reason=reason)


def words(*instances: Instance, ss: ServiceState | None = None, routable: int = 0,
          slurm_ok: bool = True) -> tuple:
    w = service_status(instances, ss, routable=routable, slurm_ok=slurm_ok, now=NOW)
    return w.status, w.stage, w.message


def test_phases_are_written_and_read_as_the_same_json_words() -> None:
    assert [p.value for p in Phase] == ["pending", "starting", "ready", "unhealthy", "draining", "cancelling"]
    state = SchedulerState(instances={"a" * 12: inst("a", Phase.DRAINING)})
    text = json.dumps(state.to_json())
    assert '"phase": "draining"' in text and "Phase" not in text
    back = SchedulerState.from_json(json.loads(text)).instances["a" * 12]
    assert back.phase == Phase.DRAINING and f"{Phase.DRAINING}" == "draining"
    # a state file written before the enum existed reads the same
    assert SchedulerState.from_json({"version": 1, "instances": {"b" * 12: {
        "iid": "b" * 12, "service": "s", "model": "m", "submitted_at": 1.0, "phase": "ready"}}}
    ).instances["b" * 12].phase == Phase.READY


def test_a_model_with_a_routable_instance_is_ready_whatever_else_runs() -> None:
    assert words(inst("a", Phase.READY), inst("b", Phase.PENDING), routable=1)[0] == Status.READY


def test_a_loading_instance_is_starting_and_names_its_node() -> None:
    assert words(inst("a", Phase.PENDING), inst("b", Phase.STARTING, node="gpu7")) == (
        Status.STARTING, Stage.STARTING, "loading the model on gpu7")
    assert words(inst("a", Phase.STARTING))[2] == "loading the model on a node"


def test_a_queued_instance_shows_slurms_reason() -> None:
    assert words(inst("a", Phase.PENDING, reason="Resources")) == (
        Status.QUEUED, Stage.QUEUED, "queued in Slurm (Resources)")
    assert words(inst("a", Phase.PENDING))[2] == "queued in Slurm (waiting for resources)"


def test_failed_starts_back_off_and_say_when_the_next_try_is() -> None:
    ss = ServiceState(failures=2, backoff_until=NOW + 42)
    assert words(ss=ss) == (Status.FAILED, Stage.BACKOFF, "recent starts failed; retrying in 42s")
    # the backoff is over: offline again, and a held request asks for an instance
    assert words(ss=ServiceState(failures=2, backoff_until=NOW - 1))[:2] == (Status.OFFLINE, Stage.REQUESTED)


def test_a_backoff_without_failures_is_not_failed() -> None:
    assert words(ss=ServiceState(failures=0, backoff_until=NOW + 5))[:2] == (Status.OFFLINE, Stage.BACKOFF)


def test_a_model_with_nothing_is_offline_and_an_instance_is_requested() -> None:
    assert words() == (Status.OFFLINE, Stage.REQUESTED, "an instance was requested")
    assert words(inst("a", Phase.DRAINING), inst("b", Phase.UNHEALTHY))[0] == Status.OFFLINE


def test_slurm_not_answering_is_the_stage_but_not_the_status() -> None:
    assert words(inst("a", Phase.PENDING), slurm_ok=False) == (
        Status.QUEUED, Stage.WAITING, "the batch system is not answering")


@pytest.mark.parametrize("path", ["hpcside/decide.py", "hpcside/reconcile.py", "hpcside/serve.py", "hpcside/status.py",
                                  "chatai/management/commands/embedded.py"])
def test_no_caller_spells_a_phase_itself(path: str) -> None:
    """Every comparison with an instance's phase goes through Phase."""
    tree = ast.parse((ROOT / path).read_text())
    spelled = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                values = side.elts if isinstance(side, (ast.Tuple, ast.List)) else [side]
                spelled += [v.value for v in values if isinstance(v, ast.Constant)
                            and v.value in {p.value for p in Phase}]
    assert not spelled, f"{path} compares with bare words {spelled}: use hpcside.lifecycle"
