"""Paper Table 4, PACS W4A4 ablation of the freezing rule, at K = 350 and r = 0.30 (sec. 4.3).

Rows: SAGM+LSQ, GAQAT with Reverse Ratio (freeze disorder >= r), GAQAT w/o Unfreeze, GAQAT.
Stages fp and qat are those of pacs_w4a4 (the same jobs: launched once when both use the same
--output_dir), the qat stage restricted to SAGM+LSQ, whose chosen lr is the ablations' base lr.
The GAQAT run (r = 0.30, K = 350) is also a grid point of pacs_w4a4.
"""

SWEEP = {
    "extends": "pacs_w4a4",
    "paper": "Table 4 (PACS, W4A4): freezing strategies at K=350, r=0.30",
    "stages": [
        {"name": "fp"},
        {"name": "qat", "algorithms": ["SAGM_LSQ"]},
        {
            "name": "ablation",
            "from": "gaqat",
            "algorithms": ["GAQAT_ReverseRatio", "GAQAT_NoUnfreeze", "GAQAT"],
            "hparams": {"gaqat_r": 0.30, "gaqat_K": 350},
            "grid": {},
        },
    ],
    "table": {"algorithms": ["SAGM_LSQ", "GAQAT_ReverseRatio", "GAQAT_NoUnfreeze", "GAQAT"]},
}
