"""The trained-step marker, `last-logged-step.json`, read directly on real directories: whatever is
found under its name that is not a record of a step reads as "unknown" and is set aside with a
warning, never followed, never fatal. The FIFO, which would hang a reader, and a real run's resume
past a bad marker are in tests/process/test_advisory_files.py."""

from __future__ import annotations

import json

import pytest
from structlog.testing import capture_logs

from daemon.ckpt.layout import LOGGED_STEP_FILE
from daemon.ckpt.logged_step import LoggedStep

NOT_A_STEP = {
    "nested past the parser's depth": "[" * 200_000,
    "not JSON": "{" * 1000,
    "larger than its limit": json.dumps({"global_step": 1, "padding": "x" * 2000}),
    "a step that is not a count": '{"global_step": "x"}',
    "a negative step": '{"global_step": -3}',
    "not a record": "[]",
    "a bool": '{"global_step": true}',
}


@pytest.mark.parametrize("content", NOT_A_STEP.values(), ids=NOT_A_STEP.keys())
def test_a_marker_that_is_not_a_step_reads_unknown_and_is_set_aside(tmp_path, content):
    (tmp_path / LOGGED_STEP_FILE).write_text(content)

    with capture_logs() as logs:
        assert LoggedStep(tmp_path).read() is None

    (invalid,) = [log for log in logs if log["event"] == "advisory_file_invalid"]
    assert invalid["moved_to"] == str(tmp_path / (LOGGED_STEP_FILE + ".invalid"))
    assert (tmp_path / (LOGGED_STEP_FILE + ".invalid")).read_text() == content
    LoggedStep(tmp_path).mark(7)
    assert LoggedStep(tmp_path).read() == 7


@pytest.mark.parametrize("kind", ["directory", "link out of the directory", "link loop"])
def test_a_marker_that_is_not_a_regular_file_is_moved_not_followed(tmp_path, kind):
    marker, outside = tmp_path / LOGGED_STEP_FILE, tmp_path.parent / f"{tmp_path.name}-elsewhere.json"
    outside.write_text(json.dumps({"global_step": 99}))
    if kind == "directory":
        (marker / "inside").mkdir(parents=True)
    elif kind == "link out of the directory":
        marker.symlink_to(outside)
    else:
        marker.symlink_to(marker.name)

    with capture_logs() as logs:
        assert LoggedStep(tmp_path).read() is None  # 99 would be the link's target, followed

    assert [log["event"] for log in logs] == ["advisory_file_invalid"]
    assert not marker.exists() and not marker.is_symlink()
    LoggedStep(tmp_path).mark(7)
    assert LoggedStep(tmp_path).read() == 7
    assert json.loads(outside.read_text()) == {"global_step": 99}  # never written through the link
    outside.unlink()
