"""QT-DoG's own protocol (its Table 1) on VLCS, with EoQ over 5 seeds and the SWAD rows:
`qtdog_pacs` on VLCS.
Reported: 78.4, EoQ 79.5; SWAD (Cha et al. 2021) 79.1.
"""

SWEEP = {
    "extends": "qtdog_pacs",
    "paper": "QT-DoG Table 1 (VLCS): QT-DoG, its SWAD model and EoQ (5 models); SWAD",
    "dataset": "VLCS",
}
