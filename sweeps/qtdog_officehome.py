"""QT-DoG's own protocol (its Table 1) on OfficeHome, with EoQ over 5 seeds:
`qtdog_pacs` on OfficeHome.
Reported: 68.9, EoQ 72.3.
"""

SWEEP = {
    "extends": "qtdog_pacs",
    "paper": "QT-DoG Table 1 (OfficeHome): QT-DoG and EoQ (5 models)",
    "dataset": "OfficeHome",
}
