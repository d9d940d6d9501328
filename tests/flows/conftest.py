"""A real local Prefect server, shared by the integration tests of this folder."""

from __future__ import annotations

import pytest

from tests.flows.servers import prefect_server


@pytest.fixture(scope="session")
def local_server(tmp_path_factory):
    """The API URL of a real `prefect server start` on a free local port, stopped after the session."""
    # A queued event run retries its deployment's slot after 5 s instead of 30: the tests wait less.
    with prefect_server(tmp_path_factory.mktemp("server-home"), slot_wait_s=5) as url:
        yield url
