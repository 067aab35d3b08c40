"""QT-DoG's own protocol (its Table 1) on OfficeHome, with EoQ over 5 seeds and the SWAD rows:
`qtdog_pacs` on OfficeHome.
Reported: 68.9, EoQ 72.3; SWAD (Cha et al. 2021) 70.6.
"""

SWEEP = {
    "extends": "qtdog_pacs",
    "paper": "QT-DoG Table 1 (OfficeHome): QT-DoG, its SWAD model and EoQ (5 models); SWAD",
    "dataset": "OfficeHome",
}
