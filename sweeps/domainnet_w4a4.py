"""Paper Table 3, DomainNet: the ERM "Full" row and the W4A4 rows (LSQ, SAGM+LSQ, GAQAT).

Sec. 4.1: leave-one-group-out over (clipart, infograph), (painting, quickdraw), (real, sketch):
every run has two test domains. Full-precision ERM from MoCo-v2 for 15,000 steps, then QAT
for 50,000 steps; Adam, lr grid {1e-5, 3e-5, 5e-5}, dropout 0, batch 24 per domain, weight
decay 1e-6, rho 0.05, alpha 0.0005, scale lr 1e-5; test-domain validation. Shared hparams
first (stage "qat"), then GAQAT's r x K (4-bit grid) at the lr chosen for SAGM+LSQ.

"QAT evaluates only from step 45,000 on": DomainBed's train.py evaluates at every multiple of
checkpoint_freq (step 0 included) and at the last step, and cannot skip. checkpoint_freq 45,000
gives evaluations at steps 0, 45,000 and 49,999 (the fewest possible), and eval_from 45,000
makes model selection and the tables ignore step 0: the choice is among steps 45,000 and 49,999.
(A finer window costs evaluations before 45,000: checkpoint_freq 2,500 adds step 47,500 and 18
ignored evaluations of the whole dataset.) The FP stage uses DomainBed's DomainNet default, 1,000.
The paper gives no number of trials: DomainBed's 3.
"""

SWEEP = {
    "paper": "Table 3 (DomainNet): ERM Full; LSQ, SAGM+LSQ, GAQAT at W4A4",
    "dataset": "DomainNet",
    # env indices: clipart 0, infograph 1, painting 2, quickdraw 3, real 4, sketch 5
    "test_envs": [[0, 1], [2, 3], [4, 5]],
    "trials": 3,
    "bits": [4, 4],
    "selection": "test",
    "hparams": {
        "resnet18": False,
        "resnet_dropout": 0.0,
        "batch_size": 24,
        "weight_decay": 1e-6,
        "scale_lr": 1e-5,
        "rho": 0.05,
        "alpha": 0.0005,
    },
    "stages": [
        {
            "name": "fp",
            "algorithms": ["ERM_FP"],
            "steps": 15000,
            "checkpoint_freq": 1000,
            "hparams": {"init": "moco"},  # file: $DOMAINBED_GAQAT_MOCO
            "grid": {"lr": [1e-5, 3e-5, 5e-5]},
            "slurm": {"time_min": 720},
        },
        {
            "name": "qat",
            "algorithms": ["LSQ", "SAGM_LSQ"],
            "steps": 50000,
            "checkpoint_freq": 45000,
            "eval_from": 45000,
            "init_from": {"stage": "fp", "algorithm": "ERM_FP"},
            "grid": {"lr": [1e-5, 3e-5, 5e-5]},
            "slurm": {"time_min": 2880},
        },
        {
            "name": "gaqat",
            "algorithms": ["GAQAT"],
            "steps": 50000,
            "checkpoint_freq": 45000,
            "eval_from": 45000,
            "init_from": {"stage": "fp", "algorithm": "ERM_FP"},
            "hparams_from": {"stage": "qat", "algorithm": "SAGM_LSQ", "keys": ["lr"]},
            "grid": {"gaqat_r": [0.20, 0.25], "gaqat_K": [3000, 4000]},
            "slurm": {"time_min": 2880},
        },
    ],
}
