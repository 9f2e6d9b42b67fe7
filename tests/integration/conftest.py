from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A temporary Prefect server and database for the session, stopped before pytest closes its streams; task
    results (the content-keyed cache) in a fresh folder, for this process and the flows it starts, so no test
    reuses a result computed by an earlier session."""
    import os

    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    results = tmp_path_factory.mktemp("prefect-results")
    previous = os.environ.get("PREFECT_LOCAL_STORAGE_PATH")
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(results)
    try:
        with (
            temporary_settings({PREFECT_LOCAL_STORAGE_PATH: results}),
            prefect_test_harness(server_startup_timeout=120),
        ):
            yield
    finally:
        if previous is None:
            os.environ.pop("PREFECT_LOCAL_STORAGE_PATH", None)
        else:
            os.environ["PREFECT_LOCAL_STORAGE_PATH"] = previous
