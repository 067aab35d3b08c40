"""Every paper config plans the jobs it planned before (the same train args, run folders and
commands), and the tables of the same runs are the same.

The stored plans were written by ``plan_snapshot.py`` from the code before the package's
layout changed, then once more for two deliberate changes (and only those, checked when they
were written): the jobs run through ``domainbed_gaqat.train``, and DomainNet's QAT stages pass
``--eval_from 45000`` with checkpoints every 1,000 steps. Two entries were added later, the
other entries unchanged: ``pacs_qat_w4a4`` and ``qtdog_pacs`` (with its table), the seed
systems as their releases run them (QT-DoG's scale init and gradient scale, SAQ's activation
scales, SWAD_QTDoG and SWAD_FP with their SWAD rows); then ``qtdog_dg_methods`` and
``pacs_dg_methods_w4a4`` with their tables (DomainBed's methods on the shared featurizer,
``<Name>_FP`` / ``_QTDoG`` / ``_LSQ``), the other entries unchanged."""

import json

import pytest
from support.plan_snapshot import CONFIGS, STORED, CurrentAPI, snapshot


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


@pytest.mark.parametrize("name", ["domainnet_w4a4", "domainnet_w3a3"])
def test_domainnet_qat_evaluates_from_step_45000(now, name):
    for stage in ("qat", "gaqat"):
        assert all("--checkpoint_freq 1000 " in c and "--eval_from 45000 " in c
                   for c in now[name]["stages"][stage])
    assert not any("--eval_from" in c for c in now[name]["stages"]["fp"])
