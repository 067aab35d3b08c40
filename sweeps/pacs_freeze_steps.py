"""Paper Table 5, PACS W4A4: GAQAT for freeze steps K in {300, 350, 400} at r = 0.30 (sec. 4.3).

One row per K (the table splits rows by gaqat_K). r = 0.30 as in Table 4, whose GAQAT row equals
Table 5's K = 350 row. Stages fp and qat (SAGM+LSQ, for the base lr) are those of pacs_w4a4, and
every GAQAT run here is a grid point of pacs_w4a4: with the same --output_dir nothing is rerun.
"""

SWEEP = {
    "paper": "Table 5 (PACS, W4A4): GAQAT, freeze steps K at r=0.30",
    "dataset": "PACS",
    "test_envs": [[0], [1], [2], [3]],  # leave-one-domain-out: art, cartoon, photo, sketch
    "trials": 3,
    "bits": [4, 4],
    "selection": "test",
    "hparams": {
        "resnet18": False,
        "resnet_dropout": 0.0,
        "batch_size": 32,
        "weight_decay": 1e-4,
        "scale_lr": 1e-5,
        "rho": 0.05,
        "alpha": 0.001,
    },
    "stages": [
        {
            "name": "fp",
            "algorithms": ["ERM_FP"],
            "steps": 5000,
            "checkpoint_freq": 300,
            "hparams": {"init": "moco"},  # file: $DOMAINBED_GAQAT_MOCO
            "grid": {"lr": [1e-5, 3e-5, 5e-5]},
            "slurm": {"time_min": 180},
        },
        {
            "name": "qat",
            "algorithms": ["SAGM_LSQ"],
            "steps": 20000,
            "checkpoint_freq": 300,
            "init_from": {"stage": "fp", "algorithm": "ERM_FP"},
            "grid": {"lr": [1e-5, 3e-5, 5e-5]},
            "slurm": {"time_min": 720},
        },
        {
            "name": "freeze_steps",
            "algorithms": ["GAQAT"],
            "steps": 20000,
            "checkpoint_freq": 300,
            "init_from": {"stage": "fp", "algorithm": "ERM_FP"},
            "hparams_from": {"stage": "qat", "algorithm": "SAGM_LSQ", "keys": ["lr"]},
            "hparams": {"gaqat_r": 0.30},
            "grid": {"gaqat_K": [300, 350, 400]},
            "slurm": {"time_min": 720},
        },
    ],
    "table": {"algorithms": ["GAQAT"], "split_by": ["gaqat_K"]},
}
