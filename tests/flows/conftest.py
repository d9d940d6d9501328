"""A real local Prefect server, shared by the integration tests of this folder."""

from __future__ import annotations

import pytest

from tests.flows.servers import prefect_server


@pytest.fixture(scope="session")
def local_server(tmp_path_factory):
    """The API URL of a real `prefect server start` on a free local port, stopped after the session."""
    with prefect_server(tmp_path_factory.mktemp("server-home")) as url:
        yield url
