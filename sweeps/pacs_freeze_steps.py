"""Paper Table 5, PACS W4A4: GAQAT for freeze steps K in {300, 350, 400} at r = 0.30 (sec. 4.3).

One row per K (the table splits rows by gaqat_K). r = 0.30 as in Table 4, whose GAQAT row equals
Table 5's K = 350 row. Stages fp and qat (SAGM+LSQ, for the base lr) are those of pacs_ablation,
and every GAQAT run here is a grid point of pacs_w4a4: with the same --output_dir nothing is rerun.
"""

SWEEP = {
    "extends": "pacs_ablation",
    "paper": "Table 5 (PACS, W4A4): GAQAT, freeze steps K at r=0.30",
    "stages": [
        {"name": "fp"},
        {"name": "qat"},
        {"name": "freeze_steps", "from": "ablation", "algorithms": ["GAQAT"],
         "hparams": {"gaqat_r": 0.30}, "grid": {"gaqat_K": "paper"}},
    ],
    "table": {"algorithms": ["GAQAT"], "split_by": ["gaqat_K"]},
}
