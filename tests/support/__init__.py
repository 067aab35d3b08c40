"""The test suite's helpers (fixtures stay in ``tests/conftest.py``):

- :mod:`support.helpers`: subprocesses in this environment, ``gaqat`` in process, tiny hparams,
  a run folder as train.py writes it;
- :mod:`support.references`: the independent references the tests compare against;
- :mod:`support.image_folders`: tiny DomainBed image folders and a MoCo-style file;
- :mod:`support.inspect_fixtures`: tiny trained runs shared by the inspection tests;
- :mod:`support.slurm_cluster`: the one-node Slurm cluster fixture;
- :mod:`support.plan_snapshot`: the stored plans (``python tests/support/plan_snapshot.py``);
- :mod:`support.status_tree`: generated sweep trees (``gaqat sweep status``, ``--plots``);
- :mod:`support.mutmut_plugin`: the pytest plugin of ``make mutation``.

The tests import them as ``support.<module>`` (``tests/`` is on ``sys.path`` under pytest).
"""
