"""QT-DoG combined with other DG methods (Javed et al. 2024: "can be combined with other DG
methods") on PACS: ERM, CORAL, Mixup, SagNet and SWAD, each full precision and with QT-DoG's
quantization, on the shared featurizer.

QT-DoG's own protocol (as `qtdog_pacs`): a torchvision ImageNet ResNet-50, frozen BatchNorm,
Adam lr 5e-5, weight decay 0, batch 32 per domain, 5,001 steps evaluated every 200,
training-domain validation, leave-one-domain-out, 3 trials. The "qtdog" stage quantizes each
method's conv weights (7 bits, per channel; LSQ's init and whole-tensor gradient scale) from
step 2,000 of the same run, as QT-DoG does; the "fp" stage is each method alone. The methods'
own hyperparameters are DomainBed's defaults (CORAL's mmd_gamma 1, Mixup's alpha 0.2, SagNet's
adversarial weight 0.1). `QTDoG` is ERM's row (`ERM_QTDoG` is the same class), `SWAD_QTDoG`
QT-DoG as released. One model per job (no EoQ members here: `qtdog_pacs` has them).
"""

SWEEP = {
    "paper": "QT-DoG combined with DG methods (PACS): ERM, CORAL, Mixup, SagNet, SWAD; full "
             "precision and QT-DoG",
    "dataset": "PACS",
    "test_envs": [[0], [1], [2], [3]],
    "trials": 3,
    "bits": [7],
    "selection": "train",
    "hparams": {"batch_size": 32, "init": "torchvision", "weight_decay": 0.0},
    "stages": [
        {
            "name": "fp",
            "algorithms": ["ERM_FP", "CORAL_FP", "Mixup_FP", "SagNet_FP", "SWAD_FP"],
            "steps": 5001,
            "checkpoint_freq": 200,
            "slurm": {"time_min": 360},
        },
        {
            "name": "qtdog",
            "algorithms": ["QTDoG", "CORAL_QTDoG", "Mixup_QTDoG", "SagNet_QTDoG", "SWAD_QTDoG"],
            "steps": 5001,
            "checkpoint_freq": 200,
            "hparams": {"quant_start": 2000},
            "slurm": {"time_min": 360},
        },
    ],
}
