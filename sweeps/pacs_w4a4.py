"""Paper Table 2, PACS: the ERM "Full" row and the W4A4 rows (LSQ, SAGM+LSQ, GAQAT).

Sec. 4.1: full-precision ERM from MoCo-v2 for 5,000 steps, then QAT from that model for 20,000
steps; test-domain validation. The hyperparameters are the registry's PACS defaults (Adam,
dropout 0, batch 32 per domain, weight decay 1e-4, rho 0.05, alpha 0.001, scale lr 1e-5) and
"paper" grids (lr {1e-5, 3e-5, 5e-5}; r and K for the config's bits). Shared hparams first,
then GAQAT's own: the "qat" stage searches the lr of LSQ and SAGM+LSQ; GAQAT (SAGM+LSQ plus
freezing) takes the lr chosen for SAGM+LSQ (same test domain, trial) and searches r x K.
The paper gives no number of trials: DomainBed's 3. Checkpoints: DomainBed's PACS default, 300.
"""

SWEEP = {
    "paper": "Table 2 (PACS): ERM Full; LSQ, SAGM+LSQ, GAQAT at W4A4",
    "dataset": "PACS",
    "test_envs": [[0], [1], [2], [3]],  # leave-one-domain-out: art, cartoon, photo, sketch
    "trials": 3,
    "bits": [4, 4],
    "selection": "test",
    "stages": [
        {
            "name": "fp",
            "algorithms": ["ERM_FP"],
            "steps": 5000,
            "checkpoint_freq": 300,
            "hparams": {"init": "moco"},  # file: $DOMAINBED_GAQAT_MOCO
            "grid": {"lr": "paper"},
            "slurm": {"time_min": 180},
        },
        {
            "name": "qat",
            "algorithms": ["LSQ", "SAGM_LSQ"],
            "steps": 20000,
            "checkpoint_freq": 300,
            "init_from": {"stage": "fp", "algorithm": "ERM_FP"},
            "grid": {"lr": "paper"},
            "slurm": {"time_min": 720},
        },
        {
            "name": "gaqat",
            "algorithms": ["GAQAT"],
            "steps": 20000,
            "checkpoint_freq": 300,
            "init_from": {"stage": "fp", "algorithm": "ERM_FP"},
            "hparams_from": {"stage": "qat", "algorithm": "SAGM_LSQ", "keys": ["lr"]},
            "grid": {"gaqat_r": "paper", "gaqat_K": "paper"},
            "slurm": {"time_min": 720},
        },
    ],
}
