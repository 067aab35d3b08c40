"""QT-DoG's own protocol (its Table 1) on TerraIncognita, with EoQ over 5 seeds and the SWAD rows:
`qtdog_pacs` on TerraIncognita.
Reported: 50.8, EoQ 53.2; SWAD (Cha et al. 2021) 50.0.
"""

SWEEP = {
    "extends": "qtdog_pacs",
    "paper": "QT-DoG Table 1 (TerraIncognita): QT-DoG, its SWAD model and EoQ (5 models); SWAD",
    "dataset": "TerraIncognita",
}
