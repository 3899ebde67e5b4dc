"""How the suite shares its two workers (tests/conftest.py): what one fixture builds, one worker uses."""

import pytest


@pytest.fixture(scope="module")
def built_once_per_module():
    return object()


def test_a_module_fixtures_tests_are_one_xdist_group(request, built_once_per_module):
    """Under `--dist loadgroup` (`make test`) the group is part of the id xdist schedules by. Lost, as it was
    between pytest 9 and pytest-xdist 3.8, every worker builds the module's fixtures and trains its own tiny world."""
    assert request.node.get_closest_marker("xdist_group").args == ("test_scheduling.py",)
    grouped = request.config.getoption("loadgroup", False)  # set on xdist's workers under --dist loadgroup
    assert request.node.nodeid.endswith("@test_scheduling.py") == grouped, request.node.nodeid

