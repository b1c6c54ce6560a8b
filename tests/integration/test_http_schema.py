"""Schemathesis against the daemon's own /openapi.json, over real HTTP.

Every response must have a status code that the document declares for its
route (so no undeclared 5xx), the declared content type, and a body that
matches the declared schema. A deployment named "fuzz" of each kind exists,
so generated requests reach real containers as well as the 404 paths. The
number of examples per operation is kept small to bound the run.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from beam_support import Beam
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from engine.core.deployments import DeploymentKind
from engine.server.openapi import openapi_document

MAX_EXAMPLES = 50
# The document the daemon serves at /openapi.json; the test checks that the
# served one equals it before fuzzing.
SCHEMA = schemathesis.openapi.from_dict(openapi_document())
OPERATIONS = {
    operation.label: operation
    for operation in (result.ok() for result in SCHEMA.get_all_operations())
}


@pytest.fixture(scope="module")
def fuzz_target(beam_daemon, session_token, app_dir) -> Iterator[Beam]:
    helper = Beam(beam_daemon, session_token, app_dir)
    helper.deploy("fuzz", "echo", keep_warm=60, max_pending=1000)
    helper.deploy("fuzz-queue", "noop", kind=DeploymentKind.TASK_QUEUE)
    try:
        yield helper
    finally:
        helper.delete_all()


def test_served_document_matches(fuzz_target: Beam) -> None:
    with fuzz_target.client() as client:
        assert client.get("/openapi.json").json() == openapi_document()


# NOTE: schemathesis 4.32's pytest plugin fails on pytest 9 ("'Function'
# object has no attribute '_nodeid'"), so each operation's strategy is run
# with hypothesis directly.
@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_responses_match_openapi(label: str, fuzz_target: Beam) -> None:
    operation = OPERATIONS[label]
    headers = {"Authorization": f"Bearer {fuzz_target.token}"}

    @given(case=operation.as_strategy())
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(
            base_url=fuzz_target.base_url,
            headers=headers,
            checks=[
                status_code_conformance,
                content_type_conformance,
                response_schema_conformance,
            ],
            timeout=60,
        )

    check()
