"""QT-DoG's own protocol (Javed et al. 2024, its Table 1) on PACS, with EoQ over 5 seeds, and
the SWAD rows its release reports.

QT-DoG: LSQ on the conv weights only, 7 bits, one scale per output channel, classifier (and
stem weights) full precision; a torchvision ImageNet ResNet-50, frozen BatchNorm, Adam lr 5e-5,
weight decay 0, batch 32 per domain, dropout 0; quantization switches on at step 2,000 of
5,001; training-domain validation; DomainBed's leave-one-domain-out and 3 trials; evaluations
every 200 steps (the release's, which its SWAD segments follow). Each job runs 5 times with
different seeds ("members"): the table's rows average them, and `gaqat ensemble --config
qtdog_pacs` sums their logits (EoQ). `QTDoG` is the method without SWAD; `SWAD_QTDoG` is QT-DoG
as released (SWAD on, restarted when quantization starts): its records give the last iterate's
row and its averaged model the `SWAD_QTDoG (SWAD)` row. `SWAD_FP` is Table 1's SWAD baseline
(ERM with SWAD, full precision, one model per job, as the release's config). Reported: PACS
87.8, EoQ 89.3; SWAD 88.1.
"""

SWEEP = {
    "paper": "QT-DoG Table 1 (PACS): QT-DoG, its SWAD model and EoQ (5 models); SWAD",
    "dataset": "PACS",
    "test_envs": [[0], [1], [2], [3]],
    "trials": 3,
    "bits": [7],
    "selection": "train",
    "hparams": {"batch_size": 32},
    "stages": [
        {
            "name": "qtdog",
            "algorithms": ["QTDoG", "SWAD_QTDoG"],
            "steps": 5001,
            "checkpoint_freq": 200,
            "members": 5,
            "hparams": {"init": "torchvision", "quant_start": 2000},
            "slurm": {"time_min": 360},
        },
        {
            "name": "swad",
            "algorithms": ["SWAD_FP"],
            "steps": 5001,
            "checkpoint_freq": 200,
            "hparams": {"init": "torchvision", "weight_decay": 0.0},
            "slurm": {"time_min": 360},
        },
    ],
}
