"""Every QAT method on one featurizer: the GAQAT paper's PACS W4A4 protocol (pacs_w4a4) with
SAQ and QT-DoG added as rows.

SAQ (W4A4, rho 0.1) searches the lr with LSQ and SAGM+LSQ in the "qat" stage. QT-DoG (its
weight-only per-channel LSQ at the config's W bits; activations full precision, so its runs go
to OUT/PACS/w4) starts from the same full-precision ERM model as the others, quantized from the
first step (quant_start 0: the ERM stage already is its full-precision phase), with the lr grid.
"""

SWEEP = {
    "extends": "pacs_w4a4",
    "paper": "PACS W4A4: ERM Full; LSQ, SAGM+LSQ, SAQ, QT-DoG, GAQAT on one featurizer",
    "stages": [
        {"name": "fp"},
        {"name": "qat", "algorithms": ["LSQ", "SAGM_LSQ", "SAQ"]},
        {"name": "qtdog", "from": "qat", "algorithms": ["QTDoG"],
         "hparams": {"quant_start": 0}},
        {"name": "gaqat"},
    ],
}
