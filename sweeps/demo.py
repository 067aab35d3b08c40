"""The offline demo (`make demo`): the two-stage protocol of the paper on RotatedDigits, on CPU.

RotatedDigits: scikit-learn's 8x8 digits in six domains rotated 0..75 degrees, 32x32, a
ResNet-18 from random init (no download, no pretrained weights). Test domain: 75 degrees.
Stage fp trains the full-precision model, stage qat starts LSQ and SAGM+LSQ from it at W4A4,
stage gaqat starts GAQAT from it with the lr chosen for SAGM+LSQ (K = 10: which scales are
frozen is re-decided every 10 steps). Far fewer steps than the paper's (150 and 30 instead
of 5,000 and 20,000), so that the whole sweep takes about four minutes on two CPU cores.
"""

SWEEP = {
    "paper": "demo: the Table 2 protocol on RotatedDigits, W4A4, CPU-sized",
    "dataset": "RotatedDigits",
    "test_envs": [[5]],
    "trials": 1,
    "bits": [4, 4],
    "selection": "test",
    "hparams": {"resnet18": True, "init": "none", "batch_size": 32, "weight_decay": 0.0},
    "stages": [
        {
            "name": "fp",
            "algorithms": ["ERM_FP"],
            "steps": 150,
            "checkpoint_freq": 50,
            "grid": {"lr": [1e-3]},
        },
        {
            "name": "qat",
            "algorithms": ["LSQ", "SAGM_LSQ"],
            "steps": 30,
            "checkpoint_freq": 15,
            "init_from": {"stage": "fp", "algorithm": "ERM_FP"},
            "grid": {"lr": [1e-4]},
        },
        {
            "name": "gaqat",
            "algorithms": ["GAQAT"],
            "steps": 30,
            "checkpoint_freq": 15,
            "init_from": {"stage": "fp", "algorithm": "ERM_FP"},
            "hparams_from": {"stage": "qat", "algorithm": "SAGM_LSQ", "keys": ["lr"]},
            "hparams": {"gaqat_r": 0.30, "gaqat_K": 10},
        },
    ],
}
