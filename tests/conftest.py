import pytest


@pytest.hookimpl(trylast=True)  # after pytest-twisted installed its reactor: foxnode imports one
def pytest_configure(config):
    from foxnode import testing

    # A bad FOXNODE_FRAMES stops the run at once, in one line.
    try:
        testing.frames_under_test()
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None


def pytest_report_header(config):
    from foxnode import frames, testing

    choice = testing.frames_under_test()
    used = frames.effective(choice)
    if used != choice:
        return f"foxnode frames: {choice}, but {used}: Autobahn lacks {', '.join(frames.MISSING)}"
    return f"foxnode frames: {choice}"


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
