"""Paper Table 2, PACS: the ERM "Full" row and the W3A3 rows (LSQ, SAGM+LSQ, GAQAT).

Sec. 4.1: full-precision ERM from MoCo-v2 for 5,000 steps, then QAT from that model for 20,000
steps; Adam, lr grid {1e-5, 3e-5, 5e-5}, dropout 0, batch 32 per domain, weight decay 1e-4,
rho 0.05, alpha 0.001, scale lr 1e-5; test-domain validation. Shared hparams first, then GAQAT's
own: the "qat" stage searches the lr of LSQ and SAGM+LSQ; GAQAT (SAGM+LSQ plus freezing) takes
the lr chosen for SAGM+LSQ (same test domain, trial) and searches r x K (3-bit grid).
The paper gives no number of trials: DomainBed's 3. Checkpoints: DomainBed's PACS default, 300.
"""

SWEEP = {
    "paper": "Table 2 (PACS): ERM Full; LSQ, SAGM+LSQ, GAQAT at W3A3",
    "dataset": "PACS",
    "test_envs": [[0], [1], [2], [3]],  # leave-one-domain-out: art, cartoon, photo, sketch
    "trials": 3,
    "bits": [3, 3],
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
            "algorithms": ["LSQ", "SAGM_LSQ"],
            "steps": 20000,
            "checkpoint_freq": 300,
            "init_from": {"stage": "fp", "algorithm": "ERM_FP"},
            "grid": {"lr": [1e-5, 3e-5, 5e-5]},
            "slurm": {"time_min": 720},
        },
        {
            "name": "gaqat",
            "algorithms": ["GAQAT"],
            "steps": 20000,
            "checkpoint_freq": 300,
            "init_from": {"stage": "fp", "algorithm": "ERM_FP"},
            "hparams_from": {"stage": "qat", "algorithm": "SAGM_LSQ", "keys": ["lr"]},
            "grid": {"gaqat_r": [0.28, 0.30, 0.32], "gaqat_K": [100, 150, 200]},
            "slurm": {"time_min": 720},
        },
    ],
}
