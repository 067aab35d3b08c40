"""The run spec: a sweep job and the records its ``train.py`` writes are the same run, found by
the locator wherever the run folder went; members of an ensemble share one cell."""

import json
import shlex
import shutil

from domainbed_gaqat import cli, train
from domainbed_gaqat.ensemble import cell
from domainbed_gaqat.experiments import configs, sweep
from domainbed_gaqat.experiments.results import Locator, find_runs
from domainbed_gaqat.experiments.runs import RunSpec


def recorded(job) -> dict:
    """The first record train.py writes for ``job``: its command parsed by the train entry's
    own parser, the arguments as records hold them (DomainBed's defaults included)."""
    argv = shlex.split(job.command_str)[3:]  # PYTHON -m domainbed_gaqat.train ...
    args = cli.command_parser("train")[0].parse_args(argv)
    return {"step": 0, "args": train.recorded_args(args), "hparams": json.loads(args.hparams)}


def qtdog_stage(output_dir, data_dir) -> sweep.PlannedStage:
    """The planned stage ``qtdog`` of ``qtdog_pacs`` (five members per job)."""
    config = configs.load_config("qtdog_pacs")
    return next(s for s in sweep.plan(config, output_dir, data_dir) if s.name == "qtdog")


def test_a_jobs_records_are_the_same_run(tmp_path):
    stage = qtdog_stage(tmp_path, tmp_path)
    for job in stage.jobs[:10]:
        planned, ran = RunSpec.from_train_args(job.train_args), RunSpec.from_record(recorded(job))
        assert planned.identity == ran.identity and not planned.differences(ran)
        assert ran.uda_holdout_fraction == 0.0 and ran.member == job.train_args.get("member", 0)
    first, second = (RunSpec.from_record(recorded(j)) for j in stage.jobs[:2])
    assert first.identity != second.identity  # members: another member index
    assert cell(first).identity == cell(second).identity  # one ensemble cell


def test_the_locator_finds_a_moved_run(tmp_path):
    stage = qtdog_stage(tmp_path / "out", tmp_path)
    job = stage.jobs[3]
    (tmp_path / "elsewhere" / "x").mkdir(parents=True)
    record = {**recorded(job), **{f"env{e}_{s}_acc": 0.5 for e in range(4) for s in ("in", "out")}}
    (tmp_path / "elsewhere" / "x" / "results.jsonl").write_text(json.dumps(record) + "\n")
    locator = Locator(find_runs([str(tmp_path / "elsewhere")]))
    assert locator.find(job).path == str(tmp_path / "elsewhere" / "x")
    assert locator.state(job) == job.INCOMPLETE  # no done file yet
    assert all(locator.find(j) is None for j in stage.jobs if j is not job)
    shutil.rmtree(tmp_path / "elsewhere")
    assert Locator().find(job) is None  # in its own folder: never launched
