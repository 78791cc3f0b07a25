"""Fuzz the OpenAPI schema with schemathesis (bounded): whatever a client sends, never a 5xx."""

from __future__ import annotations

import pytest
from serve_helpers import tiny_pipe

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from latentdit.serve.app import create_app  # noqa: E402
from latentdit.serve.schemas import Limits  # noqa: E402

EXAMPLES = 20  # per operation: bounded, a few seconds each with tiny components


@pytest.fixture(scope="module")
def app(tiny_clip, tiny_vae):
    # Small limits keep every valid request cheap; the bounds are still the server's own checks.
    limits = Limits(max_side=32, side_step=4, max_images=2, max_steps=3, max_frames=3)
    return create_app(tiny_pipe(tiny_clip, tiny_vae), limits=limits)


def _fuzz(op, answered: dict, failures: list) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy())
    def run(case):
        response = case.call()
        answered.setdefault(op.label, set()).add(response.status_code)
        try:
            case.validate_response(response, checks=[not_a_server_error])
        except Exception as e:  # noqa: BLE001 - collected to report every failing operation
            failures.append(f"{op.label}: {e}")

    run()


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_5xx(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures, answered = [], {}
    for operation in schema.get_all_operations():
        _fuzz(operation.ok(), answered, failures)
    assert not failures, "\n".join(failures[:5])
    assert set(answered) >= {"POST /v1/generate", "POST /v1/img2img", "POST /v1/inpaint", "POST /v1/interpolate"}
    assert all(code < 500 for codes in answered.values() for code in codes), answered
    assert 422 in answered["POST /v1/generate"], answered  # the fuzzer did reach the checks
    print({label: sorted(codes) for label, codes in answered.items()})
