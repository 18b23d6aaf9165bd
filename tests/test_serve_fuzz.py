"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis): for
every operation, generated requests, valid and invalid, must never get a 5xx, every
response must match what the schema documents (status, media type, body schema, headers),
and invalid requests must be rejected with a 4xx.

The normal suite sends 100 cases to the app in-process; the ``long`` test sends 1,200 to a
real uvicorn on 127.0.0.1 (opt in with ``pytest -m long``). The cases come from plain
Hypothesis strategies (``schema.as_strategy``): schemathesis' lazy pytest fixtures do not
work with pytest 9.
"""

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from test_serve import running_server

from pipeline.serve.app import Settings, create_app

# Small limits keep each case cheap; the checks do not depend on the sizes.
LIMITS = {"max_n": 32, "max_concurrency": 64}


def fuzz(schema: schemathesis.BaseSchema, cases: int) -> None:
    """Send ``cases`` generated requests (half valid, half invalid) and validate each."""
    requests = st.one_of([schema.as_strategy(mode) for mode in GenerationMode])

    @given(case=requests)
    @settings(
        max_examples=cases,
        deadline=None,
        database=None,  # no .hypothesis/ folder in the repo
        suppress_health_check=list(HealthCheck),
    )
    def call_and_validate(case: schemathesis.Case) -> None:
        # Not "every schema-valid request succeeds": POST's n must equal len(z), a rule
        # across fields that JSON Schema cannot state (that case gets a 422 naming n).
        case.call_and_validate(excluded_checks=[positive_data_acceptance])

    call_and_validate()


def test_api_conforms_in_process(onnx_generators: dict[str, Path]) -> None:
    app = create_app(Settings(model=onnx_generators["conditional"], **LIMITS))
    fuzz(schemathesis.openapi.from_asgi("/openapi.json", app), cases=100)


@pytest.mark.long
def test_api_conforms_live(onnx_generators: dict[str, Path]) -> None:
    with running_server(onnx_generators["conditional"], env_limits=LIMITS) as server:
        fuzz(schemathesis.openapi.from_url(f"{server.url}/openapi.json"), cases=1200)
