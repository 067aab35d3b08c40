"""Every QAT method on one featurizer at W3A3: pacs_qat_w4a4 with the 3-bit grids."""

SWEEP = {
    "extends": "pacs_qat_w4a4",
    "paper": "PACS W3A3: ERM Full; LSQ, SAGM+LSQ, SAQ, QT-DoG, GAQAT on one featurizer",
    "bits": [3, 3],
}
