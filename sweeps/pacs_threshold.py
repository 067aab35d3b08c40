"""Paper Table 6, PACS W4A4: GAQAT for thresholds r in {0.28, 0.30, 0.32} at K = 350 (sec. 4.3).

One row per r (the table splits rows by gaqat_r). The paper fixes the freeze steps without
saying which; K = 350 is Table 4's choice (its 0.30 row matches Table 5's K = 350 row in art
and sketch but not in cartoon and photo). Stages fp and qat (SAGM+LSQ, for the base lr) are those
of pacs_ablation, and every GAQAT run here is a grid point of pacs_w4a4.
"""

SWEEP = {
    "extends": "pacs_ablation",
    "paper": "Table 6 (PACS, W4A4): GAQAT, threshold r at K=350",
    "stages": [
        {"name": "fp"},
        {"name": "qat"},
        {"name": "threshold", "from": "ablation", "algorithms": ["GAQAT"],
         "hparams": {"gaqat_K": 350}, "grid": {"gaqat_r": "paper"}},
    ],
    "table": {"algorithms": ["GAQAT"], "split_by": ["gaqat_r"]},
}
