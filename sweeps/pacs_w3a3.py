"""Paper Table 2, PACS: the ERM "Full" row and the W3A3 rows (LSQ, SAGM+LSQ, GAQAT).

The W4A4 protocol (pacs_w4a4) at 3 bits: the "paper" grids become the 3-bit ones
(K in {100, 150, 200}); the "fp" stage is the same jobs as pacs_w4a4's.
"""

SWEEP = {
    "extends": "pacs_w4a4",
    "paper": "Table 2 (PACS): ERM Full; LSQ, SAGM+LSQ, GAQAT at W3A3",
    "bits": [3, 3],
}
