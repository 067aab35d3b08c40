"""Paper Table 3, DomainNet: the ERM "Full" row and the W3A3 rows (LSQ, SAGM+LSQ, GAQAT).

The W4A4 protocol (domainnet_w4a4) at 3 bits: the "paper" grids become the 3-bit ones
(r in {0.02, 0.03}, K in {200, 300}); the "fp" stage is the same jobs as domainnet_w4a4's.
"""

SWEEP = {
    "extends": "domainnet_w4a4",
    "paper": "Table 3 (DomainNet): ERM Full; LSQ, SAGM+LSQ, GAQAT at W3A3",
    "bits": [3, 3],
}
