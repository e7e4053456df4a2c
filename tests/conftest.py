import pytest


@pytest.fixture(scope="session")
def reactor():
    # Imported lazily: pytest-twisted installs its reactor first.
    from twisted.internet import reactor as r

    return r


@pytest.fixture
def node_dir(tmp_path):
    d = tmp_path / "node"
    d.mkdir()
    return d
