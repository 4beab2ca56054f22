"""Property-based API tests: schemathesis generates requests from the service's OpenAPI schema; none is a 5xx."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
from schemathesis.checks import not_a_server_error, response_schema_conformance  # noqa: E402

MAX_EXAMPLES = 25  # per operation: five operations stay well under a minute


@pytest.fixture(scope="module")
def service_app(tiny, tmp_path_factory):
    from cliplab.search import build_index
    from cliplab.service import create_app

    root = tmp_path_factory.mktemp("schema")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
        (images / f"img{i}.png").write_bytes(buffer.getvalue())
    build_index(tiny, images, root / "index", cache_dir=root / "cache", progress=False, workers=0)
    from cliplab.service.hosts import AllowedHosts

    # schemathesis calls the app as Host "testserver"; any other Host is refused (DNS-rebinding guard)
    return create_app(root / "index", tiny, max_upload_bytes=2**20, allowed_hosts=AllowedHosts("127.0.0.1",
                                                                                               ["testserver"]))


@pytest.mark.slow
def test_no_server_errors_and_answers_match_the_schema(service_app):
    """Every operation in /openapi.json, MAX_EXAMPLES generated requests each (valid and invalid ones).

    Driven through hypothesis directly: schemathesis's lazy pytest fixture does not run under pytest 9.
    """
    schema = schemathesis.openapi.from_asgi("/openapi.json", service_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/healthz", "/search", "/search/image", "/classify",
                                              "/images/{image_id}"}
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        def check(case):
            case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])

        check()
