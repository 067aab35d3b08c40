"""Paper Table 4, PACS W4A4 ablation of the freezing rule, at K = 350 and r = 0.30 (sec. 4.3).

Rows: SAGM+LSQ, GAQAT with Reverse Ratio (freeze disorder >= r), GAQAT w/o Unfreeze, GAQAT.
Stages fp and qat are those of pacs_w4a4 (the same jobs: launched once when both use the same
--output_dir), the qat stage restricted to SAGM+LSQ, whose chosen lr is the ablations' base lr.
The GAQAT run (r = 0.30, K = 350) is also a grid point of pacs_w4a4.
"""

SWEEP = {
    "paper": "Table 4 (PACS, W4A4): freezing strategies at K=350, r=0.30",
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
            "name": "ablation",
            "algorithms": ["GAQAT_ReverseRatio", "GAQAT_NoUnfreeze", "GAQAT"],
            "steps": 20000,
            "checkpoint_freq": 300,
            "init_from": {"stage": "fp", "algorithm": "ERM_FP"},
            "hparams_from": {"stage": "qat", "algorithm": "SAGM_LSQ", "keys": ["lr"]},
            "hparams": {"gaqat_r": 0.30, "gaqat_K": 350},
            "slurm": {"time_min": 720},
        },
    ],
    "table": {"algorithms": ["SAGM_LSQ", "GAQAT_ReverseRatio", "GAQAT_NoUnfreeze", "GAQAT"]},
}
