"""QT-DoG's own protocol (its Table 1) on TerraIncognita, with EoQ over 5 seeds:
`qtdog_pacs` on TerraIncognita.
Reported: 50.8, EoQ 53.2.
"""

SWEEP = {
    "extends": "qtdog_pacs",
    "paper": "QT-DoG Table 1 (TerraIncognita): QT-DoG and EoQ (5 models)",
    "dataset": "TerraIncognita",
}
