"""The layout change keeps behaviour: every paper config plans the jobs it planned before (the
same train args, run folders and commands), and the tables of the same runs are the same.
The stored plans were written by ``plan_snapshot.py`` from the code before the change."""

import json

import pytest
from plan_snapshot import CONFIGS, STORED, CurrentAPI, snapshot


@pytest.fixture(scope="module")
def now() -> dict:
    return snapshot(CurrentAPI)


@pytest.mark.parametrize("name", CONFIGS)
def test_jobs_and_tables_equal_the_stored_plan(now, name):
    stored = json.loads(STORED.read_text())[name]
    assert sorted(now[name]["stages"]) == sorted(stored["stages"])
    for stage, commands in stored["stages"].items():
        assert now[name]["stages"][stage] == commands, stage
    assert now[name]["tables"] == stored["tables"]
