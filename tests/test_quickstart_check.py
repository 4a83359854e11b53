""".ci/check_ap50.sh, the CI gate on the quick start's printed AP50: it passes and fails."""
import subprocess
from pathlib import Path

import pytest

CHECK = Path(__file__).resolve().parents[1] / ".ci" / "check_ap50.sh"
FLOOR = "0.5"


def _check(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    log = tmp_path / "quickstart.log"
    log.write_text(text)
    return subprocess.run(["bash", str(CHECK), str(log), FLOOR], capture_output=True, text=True)


@pytest.mark.parametrize("ap50, passes", [("0.7000", True), ("0.5000", True), ("0.4999", False), ("0.0235", False)])
def test_floor_on_the_last_ap_line(tmp_path, ap50, passes):
    result = _check(tmp_path, f"Training completed.\nbbox AP: 0.1000  AP50: {ap50}  AP75: 0.0500\n")
    assert (result.returncode == 0) == passes, result.stdout + result.stderr
    assert ap50 in result.stdout


@pytest.mark.parametrize("text", ["Training completed.\n", "bbox AP: 0.9000  AP50: 0.9000  AP75: 0.9000\nTraceback\n"])
def test_fails_without_a_final_ap_line(tmp_path, text):
    result = _check(tmp_path, text)
    assert result.returncode == 1 and "does not end with an AP line" in result.stdout
