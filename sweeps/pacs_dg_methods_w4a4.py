"""DomainBed's DG methods at W4A4 with LSQ: the GAQAT paper's PACS protocol (`pacs_w4a4`) for
CORAL, Mixup, SagNet and GroupDRO next to ERM.

Each method's full-precision model (`<Name>_FP`, MoCo-v2 init, 5,000 steps, lr grid) starts
its own W4A4 LSQ stage (`<Name>_LSQ`, 20,000 steps, lr grid) with the same test domain and
trial: the methods' whole models (their second heads and discriminators too) carry over. ERM's
rows are `ERM_FP` and `LSQ` (`ERM_LSQ` is the same class), as in Table 2. The methods' own
hyperparameters are DomainBed's defaults; everything else is the paper's (sec. 4.1): Adam,
dropout 0, batch 32 per domain, weight decay 1e-4, scale lr 1e-5, test-domain validation.
"""

SWEEP = {
    "extends": "pacs_w4a4",
    "paper": "PACS W4A4 LSQ: ERM, CORAL, Mixup, SagNet, GroupDRO (full precision and LSQ)",
    "stages": [
        {"name": "fp", "algorithms": ["ERM_FP", "CORAL_FP", "Mixup_FP", "SagNet_FP",
                                      "GroupDRO_FP"]},
        {"name": "qat", "algorithms": ["LSQ"]},
        {"name": "coral", "from": "qat", "algorithms": ["CORAL_LSQ"],
         "init_from": {"stage": "fp", "algorithm": "CORAL_FP"}},
        {"name": "mixup", "from": "qat", "algorithms": ["Mixup_LSQ"],
         "init_from": {"stage": "fp", "algorithm": "Mixup_FP"}},
        {"name": "sagnet", "from": "qat", "algorithms": ["SagNet_LSQ"],
         "init_from": {"stage": "fp", "algorithm": "SagNet_FP"}},
        {"name": "groupdro", "from": "qat", "algorithms": ["GroupDRO_LSQ"],
         "init_from": {"stage": "fp", "algorithm": "GroupDRO_FP"}},
    ],
}
