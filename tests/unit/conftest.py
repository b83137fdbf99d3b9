"""Fixtures the unit tests share: the embedded model served in-process (one engine and one test client per
module that asks for them: test_serve.py, test_serve_tools.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def engine():
    from finemed_cli.config.serve import ServeConfig
    from finemed_cli.serve.engine import ServeEngine

    engine = ServeEngine(ServeConfig("embedded:smollm2-135m", name="m", n_ctx=512, max_tokens=24))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def client(engine):
    from fastapi.testclient import TestClient

    from finemed_cli.serve.app import create_app

    with TestClient(create_app(engine)) as c:
        yield c
