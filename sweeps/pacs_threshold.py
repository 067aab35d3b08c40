"""Paper Table 6, PACS W4A4: GAQAT for thresholds r in {0.28, 0.30, 0.32} at K = 350 (sec. 4.3).

One row per r (the table splits rows by gaqat_r). The paper fixes the freeze steps without
saying which; K = 350 is Table 4's choice (its 0.30 row matches Table 5's K = 350 row in art
and sketch but not in cartoon and photo). Stages fp and qat (SAGM+LSQ, for the base lr) are those
of pacs_w4a4, and every GAQAT run here is a grid point of pacs_w4a4.
"""

SWEEP = {
    "paper": "Table 6 (PACS, W4A4): GAQAT, threshold r at K=350",
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
            "name": "threshold",
            "algorithms": ["GAQAT"],
            "steps": 20000,
            "checkpoint_freq": 300,
            "init_from": {"stage": "fp", "algorithm": "ERM_FP"},
            "hparams_from": {"stage": "qat", "algorithm": "SAGM_LSQ", "keys": ["lr"]},
            "hparams": {"gaqat_K": 350},
            "grid": {"gaqat_r": [0.28, 0.30, 0.32]},
            "slurm": {"time_min": 720},
        },
    ],
    "table": {"algorithms": ["GAQAT"], "split_by": ["gaqat_r"]},
}
