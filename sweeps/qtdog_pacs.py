"""QT-DoG's own protocol (Javed et al. 2024, its Table 1) on PACS, with EoQ over 5 seeds.

QT-DoG: LSQ on the conv weights only, 7 bits, one scale per output channel, classifier (and
stem weights) full precision; a torchvision ImageNet ResNet-50, frozen BatchNorm, Adam lr 5e-5,
weight decay 0, batch 32 per domain, dropout 0; quantization switches on at step 2,000 of
5,001; training-domain validation; DomainBed's leave-one-domain-out and 3 trials. Each job
runs 5 times with different seeds ("members"): the table's QTDoG row averages them, and
`gaqat ensemble --config qtdog_pacs` sums their logits (EoQ). Reported: PACS 87.8, EoQ 89.3.
"""

SWEEP = {
    "paper": "QT-DoG Table 1 (PACS): QT-DoG and EoQ (5 models)",
    "dataset": "PACS",
    "test_envs": [[0], [1], [2], [3]],
    "trials": 3,
    "bits": [7],
    "selection": "train",
    "hparams": {"batch_size": 32},
    "stages": [
        {
            "name": "qtdog",
            "algorithms": ["QTDoG"],
            "steps": 5001,
            "checkpoint_freq": 300,
            "members": 5,
            "hparams": {"init": "torchvision", "quant_start": 2000},
            "slurm": {"time_min": 360},
        },
    ],
}
