"""QT-DoG's own protocol (its Table 1) on DomainNet, with EoQ over 5 seeds and the SWAD rows:
`qtdog_pacs` on DomainNet's six domains (leave-one-domain-out), 15,001 steps, checkpoints every
1,000 (as DomainBed and the release), batch 32 per domain. Reported: 45.1, EoQ 47.9; SWAD (Cha
et al. 2021) 46.5.
"""

SWEEP = {
    "extends": "qtdog_pacs",
    "paper": "QT-DoG Table 1 (DomainNet): QT-DoG, its SWAD model and EoQ (5 models); SWAD",
    "dataset": "DomainNet",
    "test_envs": [[0], [1], [2], [3], [4], [5]],
    "stages": [{"name": "qtdog", "steps": 15001, "checkpoint_freq": 1000,
                "slurm": {"time_min": 1440}},
               {"name": "swad", "steps": 15001, "checkpoint_freq": 1000,
                "slurm": {"time_min": 1440}}],
}
