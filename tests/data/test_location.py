"""Where `make` reads the data from: the user's directory, else a local copy (offline), else the hub."""

import subprocess
import sys
from pathlib import Path

import pytest

from alignx.data import location
from alignx.data.location import locate

SCRIPT = Path(location.__file__)


def _never(_environ):
    raise AssertionError("the hub is probed only by --check, and only when it is the choice")


def test_the_users_directory_wins_and_is_left_as_it_is(tmp_path):
    mine, local = tmp_path / "mine", tmp_path / "shared"
    mine.mkdir(), local.mkdir()
    decision = locate({"ALIGNX_DATA_DIR": str(mine)}, local, reachable=_never)
    assert decision.data_dir == mine and decision.exports == {} and decision.problem is None
    missing = locate({"ALIGNX_DATA_DIR": str(tmp_path / "nope")}, local, check=True, reachable=_never)
    assert "does not exist" in missing.problem and "unset it" in missing.problem


def test_a_local_copy_is_used_offline_unless_the_user_said_otherwise(tmp_path):
    local = tmp_path / "shared"
    local.mkdir()
    assert locate({}, local, check=True, reachable=_never).exports == {"ALIGNX_DATA_DIR": str(local.resolve()), "HF_HUB_OFFLINE": "1"}
    assert locate({"HF_HUB_OFFLINE": "0"}, local, reachable=_never).exports == {"ALIGNX_DATA_DIR": str(local.resolve())}


@pytest.mark.parametrize(("environ", "reachable", "problem"), [
    ({}, True, None),
    ({}, False, "cannot be reached"),
    ({"HF_HUB_OFFLINE": "1"}, True, "HF_HUB_OFFLINE is set"),
])
def test_without_a_local_copy_the_hub_must_be_reachable(tmp_path, environ, reachable, problem):
    decision = locate(environ, tmp_path / "absent", check=True, reachable=lambda _: reachable)
    assert decision.data_dir is None and decision.exports == {}
    assert decision.problem is None if problem is None else problem in decision.problem and "ALIGNX_DATA_DIR" in decision.problem
    assert locate(environ, tmp_path / "absent", reachable=_never).problem is None  # --make decides without probing


def test_the_script_runs_on_the_standard_library_alone(tmp_path):  # the base interpreter: no torch, no alignx
    local = tmp_path / "shared"
    local.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    made = subprocess.run([sys._base_executable, "-I", str(SCRIPT), "--make", str(local)], capture_output=True, text=True, env=env)
    assert made.returncode == 0 and made.stdout.split() == [f"ALIGNX_DATA_DIR={local.resolve()}", "HF_HUB_OFFLINE=1"]
    failed = subprocess.run([sys._base_executable, "-I", str(SCRIPT), "--check", str(tmp_path / "absent")], capture_output=True,
                            text=True, env={**env, "HF_HUB_OFFLINE": "1"})
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1 and "no data" in failed.stderr
