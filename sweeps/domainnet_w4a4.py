"""Paper Table 3, DomainNet: the ERM "Full" row and the W4A4 rows (LSQ, SAGM+LSQ, GAQAT).

The PACS protocol (pacs_w4a4) on DomainNet, leave-one-group-out over (clipart, infograph),
(painting, quickdraw), (real, sketch): every run has two test domains. Full-precision ERM for
15,000 steps, then QAT for 50,000; the registry's DomainNet defaults (batch 24 per domain,
weight decay 1e-6, alpha 0.0005) and its 4-bit grid (r in {0.20, 0.25}, K in {3000, 4000}).

"QAT evaluates only from step 45,000 on": the jobs run through domainbed_gaqat.train, whose
--eval_from 45000 skips the evaluations before it; with DomainBed's DomainNet checkpoint
frequency (1,000) the choice is among steps 45,000, 46,000, ..., 49,000 and 49,999.
"""

SWEEP = {
    "extends": "pacs_w4a4",
    "paper": "Table 3 (DomainNet): ERM Full; LSQ, SAGM+LSQ, GAQAT at W4A4",
    "dataset": "DomainNet",
    # env indices: clipart 0, infograph 1, painting 2, quickdraw 3, real 4, sketch 5
    "test_envs": [[0, 1], [2, 3], [4, 5]],
    "stages": [
        {"name": "fp", "steps": 15000, "checkpoint_freq": 1000, "slurm": {"time_min": 720}},
        {"name": "qat", "steps": 50000, "checkpoint_freq": 1000, "eval_from": 45000,
         "slurm": {"time_min": 2880}},
        {"name": "gaqat", "steps": 50000, "checkpoint_freq": 1000, "eval_from": 45000,
         "slurm": {"time_min": 2880}},
    ],
}
