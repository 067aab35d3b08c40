"""QT-DoG's own protocol (its Table 1) on VLCS, with EoQ over 5 seeds:
`qtdog_pacs` on VLCS.
Reported: 78.4, EoQ 79.5.
"""

SWEEP = {
    "extends": "qtdog_pacs",
    "paper": "QT-DoG Table 1 (VLCS): QT-DoG and EoQ (5 models)",
    "dataset": "VLCS",
}
