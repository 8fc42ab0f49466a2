"""Shared fixtures: the med3d binary under test and the reference data."""
import json
import os
import subprocess
from pathlib import Path

import nibabel as nib
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("MED3D_BIN", ROOT / "target" / "release" / "med3d"))
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
DEMO = ROOT / "data" / "demo"


def med3d(*args, check=True):
    """Runs the binary; returns CompletedProcess (text)."""
    p = subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"med3d {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def med3d_info(path):
    return json.loads(med3d("info", path, "--json").stdout)


@pytest.fixture(scope="session")
def binary():
    assert BIN.exists(), f"{BIN} missing: run `make build`"
    return BIN
