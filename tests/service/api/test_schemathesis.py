"""schemathesis over the served OpenAPI schema, against a running server: no 5xx, every response as
declared (status, content type, body schema)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.factories import copy_gallery
from tests.service.api.server import Server, running_server, settings_for


@pytest.fixture(scope="module")
def fuzzed_server(
    run_dir: Path, gallery_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    index = copy_gallery(gallery_template, tmp_path_factory.mktemp("fuzz") / "index")
    config = settings_for(
        run_dir,
        index,
        max_body_bytes=64 * 1024,
        max_image_pixels=250_000,
        max_form_parts=16,
        api_key="fuzz-reader",
        admin_key=ADMIN_KEY,
    )
    with running_server(config) as server:
        yield server


# Schema-valid yet refused requests are expected here: no schema can say "a decodable image" or which task
# names the loaded model has, so a 400/404/415/422 for such input is correct, not a failure.
EXCLUDED = [positive_data_acceptance]
ADMIN_KEY = "fuzz-admin"  # keys are on, so schemathesis also checks that bad keys are refused


def test_api_conforms_to_its_schema(fuzzed_server: Server) -> None:
    # schemathesis' pytest plugin does not load under this pytest; its strategies are driven directly.
    # With keys on, the schema itself is behind the key (MODRET_PUBLIC_DOCS=false, the default).
    api = schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json", headers={"X-API-Key": ADMIN_KEY})
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 11
    failures: dict[str, str] = {}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            case.call_and_validate(headers={"X-API-Key": ADMIN_KEY}, excluded_checks=EXCLUDED)

        try:
            check()
        except Exception as exc:  # collect every operation's failure, then report them all
            failures[operation.label] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{label}: {text}" for label, text in failures.items())
    with fuzzed_server.client() as client:
        assert client.get("/v2/health/ready").status_code == 200
