"""A data-repository task says it is done only once its report is written: the CLI
prints the report's path as soon as it sees a final state."""

from __future__ import annotations

import types

from lustrefuse.repository import DataRepository


def repository(tmp_path) -> DataRepository:
    mds = types.SimpleNamespace(ns=None, config={}, data_dir=str(tmp_path))
    return DataRepository(mds)


def new_task(kind: str = "release") -> dict:
    return {"id": 1, "type": kind, "paths": [], "state": "PENDING", "total": 0,
            "succeeded": 0, "failed": 0, "released_bytes": 0, "report": None, "error": ""}


def test_state_turns_final_after_the_report(tmp_path, monkeypatch):
    repo = repository(tmp_path)
    task = new_task()
    seen = []
    write = repo._write_report

    def watching(t, failures):
        seen.append(t["state"])  # what a poller could read while the report is written
        return write(t, failures)

    monkeypatch.setattr(repo, "_write_report", watching)
    repo._run_task(task, roots=[])
    assert seen == ["EXECUTING"]
    assert task["state"] == "SUCCEEDED"
    assert open(task["report"]).read().strip() == "FilePath,FileStatus,ErrorCode"


def test_a_report_that_cannot_be_written_fails_the_task(tmp_path):
    blocker = tmp_path / "reports"
    blocker.write_text("a file where the reports directory should be")
    repo = repository(tmp_path)
    task = new_task()
    repo._run_task(task, roots=[])
    assert task["state"] == "FAILED"
    assert task["report"] is None and "cannot write the report" in task["error"]
