"""The paper's protocol, pinned (paper sec. 4.1 and 4.3): every hyperparameter
as DomainBed's registry returns it and as every sweep config expands it.

:data:`PAPER` is the one table of values, written from the paper's text; a set is a grid (the
values searched), anything else a fixed value. Tests read the registry (``default_hparams``,
``random_hparams`` over many seeds, and a run's draw for 3 bits) and the configs
(``load_config`` and ``plan``: the stage-1 jobs' ``--hparams``, the later stages' resolved
grids and fixed hparams).
"""

import json
from dataclasses import replace

import pytest
from domainbed import datasets, hparams_registry

from domainbed_gaqat.experiments.configs import StageRef, config_names, load_config
from domainbed_gaqat.experiments.sweep import plan
from domainbed_gaqat.plugin.algorithms import ALGORITHMS
from domainbed_gaqat.plugin.hparams import train_hparams

LR = {1e-5, 3e-5, 5e-5}  # "The search space of learning rate is {1e-5, 3e-5, 5e-5}"
PAPER = {  # dataset -> hparam -> value or grid; the family that reads it
    "PACS": {
        "lr": (LR, None), "resnet_dropout": (0.0, None), "batch_size": (32, None),
        "weight_decay": (1e-4, None), "resnet18": (False, None), "init": ("moco", None),
        "rho": (0.05, "sagm"), "alpha": (0.001, "sagm"), "scale_lr": (1e-5, "quant"),
        "lsq_grad_scale": (True, "quant"), "w_bits": (4, "quant"), "a_bits": (4, "quant"),
    },
    "DomainNet": {
        "lr": (LR, None), "resnet_dropout": (0.0, None), "batch_size": (24, None),
        "weight_decay": (1e-6, None), "resnet18": (False, None), "init": ("moco", None),
        "rho": (0.05, "sagm"), "alpha": (0.0005, "sagm"), "scale_lr": (1e-5, "quant"),
        "lsq_grad_scale": (True, "quant"), "w_bits": (4, "quant"), "a_bits": (4, "quant"),
    },
}
QTDOG = {"weight_decay": 0.0, "w_bits": 7, "w_per_channel": True, "quant_start": 2000,
         "quant_stem_weight": False, "qtdog_release": False, "scale_lr": 1e-5,
         "lsq_grad_scale": True,  # weight-only 7-bit per-channel LSQ from step 2000
         "w_scale_init": "lsq_mean", "w_grad_scale_n": "tensor"}  # its release's LsqQuan
SWAD = {"swad_n_converge": 3, "swad_n_tolerance": 6, "swad_tolerance_ratio": 0.3}  # LossValley
OWN = {  # the seed systems' own settings (their public releases), over the shared protocol above
    "QTDoG": QTDOG,
    "SAQ": {"rho": {0.05, 0.1, 0.3, 0.4},  # SAM radius 0.1 by default, 0.3-0.4 on ImageNet
            "saq_perturb_act_scales": True},  # its include_aclip=True
    "SWAD_FP": SWAD, "SWAD_LSQ": SWAD, "SWAD_QTDoG": {**QTDOG, **SWAD},
}
OWN_DEFAULTS = {("SAQ", "rho"): 0.1}
GAQAT_GRIDS = {  # (dataset, bits) -> r and K ("freeze steps") grids
    ("PACS", 4): {"gaqat_r": {0.28, 0.30, 0.32}, "gaqat_K": {300, 350, 400}},
    ("PACS", 3): {"gaqat_r": {0.28, 0.30, 0.32}, "gaqat_K": {100, 150, 200}},
    ("DomainNet", 4): {"gaqat_r": {0.20, 0.25}, "gaqat_K": {3000, 4000}},
    ("DomainNet", 3): {"gaqat_r": {0.02, 0.03}, "gaqat_K": {200, 300}},
}
STEPS = {"PACS": {"fp": 5000, "qat": 20000}, "DomainNet": {"fp": 15000, "qat": 50000}}
EVAL_FROM = {"PACS": 0, "DomainNet": 45000}  # QAT stages: DomainNet evaluates from 45,000
TEST_ENVS = {"PACS": [[0], [1], [2], [3]],  # leave one domain out
             "DomainNet": [[0, 1], [2, 3], [4, 5]]}  # leave one group out
ABLATION = {"gaqat_r": 0.30, "gaqat_K": 350}  # Table 4; Tables 5 / 6 fix one of them
CONFIGS = {  # config -> dataset, bits, stages -> algorithms
    "pacs_w4a4": ("PACS", 4, {"fp": ["ERM_FP"], "qat": ["LSQ", "SAGM_LSQ"], "gaqat": ["GAQAT"]}),
    "pacs_w3a3": ("PACS", 3, {"fp": ["ERM_FP"], "qat": ["LSQ", "SAGM_LSQ"], "gaqat": ["GAQAT"]}),
    "domainnet_w4a4": ("DomainNet", 4, {"fp": ["ERM_FP"], "qat": ["LSQ", "SAGM_LSQ"],
                                        "gaqat": ["GAQAT"]}),
    "domainnet_w3a3": ("DomainNet", 3, {"fp": ["ERM_FP"], "qat": ["LSQ", "SAGM_LSQ"],
                                        "gaqat": ["GAQAT"]}),
    "pacs_ablation": ("PACS", 4, {"fp": ["ERM_FP"], "qat": ["SAGM_LSQ"], "ablation": [
        "GAQAT_ReverseRatio", "GAQAT_NoUnfreeze", "GAQAT"]}),
    "pacs_freeze_steps": ("PACS", 4, {"fp": ["ERM_FP"], "qat": ["SAGM_LSQ"],
                                      "freeze_steps": ["GAQAT"]}),
    "pacs_threshold": ("PACS", 4, {"fp": ["ERM_FP"], "qat": ["SAGM_LSQ"],
                                   "threshold": ["GAQAT"]}),
}
SEEDS = range(40)


def expected(dataset: str, algorithm: str, bits: int = 4) -> dict:
    """Every pinned hparam of ``algorithm`` on ``dataset``: value or grid."""
    families = ALGORITHMS[algorithm].families
    out = {k: v for k, (v, family) in PAPER[dataset].items() if family in (None, *families)}
    out.update(OWN.get(algorithm, {}))
    if "gaqat" in families:
        out.update(GAQAT_GRIDS[dataset, bits])
    if bits != 4:
        out.update(w_bits=bits, a_bits=bits)
    if "qtdog" in families:
        out.pop("a_bits", None)  # weight-only: no activation quantizer to pin
    return out


def assert_pinned(name: str, drawn: list, want) -> None:
    """Fixed: every draw equals it. Grid: every draw in it, and every value drawn."""
    if isinstance(want, set):
        assert set(drawn) == want, name
    else:
        assert all(type(v) is type(want) and v == want for v in drawn), (name, set(drawn))


@pytest.mark.parametrize("dataset", sorted(PAPER))
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_registry_defaults_and_draws_are_the_papers(algorithm: str, dataset: str) -> None:
    default = hparams_registry.default_hparams(algorithm, dataset)
    draws = [hparams_registry.random_hparams(algorithm, dataset, seed) for seed in SEEDS]
    for name, want in expected(dataset, algorithm).items():
        value = default[name]
        assert value in want if isinstance(want, set) else value == want, (name, value)
        assert value == OWN_DEFAULTS.get((algorithm, name), value), (name, value)
        assert_pinned(name, [h[name] for h in draws], want)
    three = {"w_bits": 3, "a_bits": 3}  # a run's draw for train.py's --hparams of 3 bits
    draws = [train_hparams(algorithm, dataset, seed, 0, three) for seed in SEEDS]
    default = train_hparams(algorithm, dataset, overrides=three)
    for name, want in expected(dataset, algorithm, bits=3).items():
        assert_pinned(name, [h[name] for h in draws], want)
        if isinstance(want, set):
            assert default[name] in want, name


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sweep_configs_expand_to_the_papers_protocol(name: str, tmp_path) -> None:
    dataset, bits, algorithms = CONFIGS[name]
    config = load_config(name)
    assert config.dataset == dataset and config.bits == (bits, bits)
    assert config.test_envs == tuple(map(tuple, TEST_ENVS[dataset]))
    assert config.selection == "test"
    stages = {s.name: s for s in config.stages}
    assert {k: list(s.algorithms) for k, s in stages.items()} == algorithms
    for stage_name, stage in stages.items():
        kind = "fp" if stage_name == "fp" else "qat"
        assert stage.steps == STEPS[dataset][kind], stage_name
        assert stage.eval_from == (0 if kind == "fp" else EVAL_FROM[dataset]), stage_name

    # stage 1: its DomainBed jobs, every --hparams in full
    fp = plan(config, str(tmp_path / "out"), str(tmp_path / "data"))[0]
    assert fp.name == "fp" and not fp.blocked
    hparams = [json.loads(job.train_args["hparams"]) for job in fp.jobs]
    assert len(fp.jobs) == len(LR) * len(TEST_ENVS[dataset]) * 3  # x 3 trials
    assert {tuple(job.train_args["test_envs"]) for job in fp.jobs} == {
        tuple(g) for g in TEST_ENVS[dataset]}
    for key, want in expected(dataset, "ERM_FP").items():
        assert_pinned(key, [h[key] for h in hparams], want)

    # later stages: what they search and fix, and what they inherit
    for stage_name in list(stages)[1:]:
        stage = stages[stage_name]
        grid = {k: set(v) for k, v in stage.grid.axes.items()}
        if stage_name == "qat":
            assert grid == {"lr": LR} and stage.hparams_from is None
        else:
            assert stage.hparams_from == StageRef("qat", "SAGM_LSQ", ("lr",))
            fixed = {k: v for k, v in stage.hparams.items() if k.startswith("gaqat_")}
            full = GAQAT_GRIDS[dataset, bits]
            want_grid = {"gaqat": full, "ablation": {},
                         "freeze_steps": {"gaqat_K": full["gaqat_K"]},
                         "threshold": {"gaqat_r": full["gaqat_r"]}}[stage_name]
            assert grid == want_grid, stage_name
            assert fixed == {k: v for k, v in ABLATION.items() if k not in grid}, stage_name
        assert stage.init_from == StageRef("fp", "ERM_FP")


QTDOG_CONFIGS = {"qtdog_pacs": ("PACS", 5001, 200), "qtdog_vlcs": ("VLCS", 5001, 200),
                 "qtdog_officehome": ("OfficeHome", 5001, 200),
                 "qtdog_terra": ("TerraIncognita", 5001, 200),
                 "qtdog_domainnet": ("DomainNet", 15001, 1000)}  # steps, checkpoint freq
RELEASE_RUN = {"lr": 5e-5, "weight_decay": 0.0, "batch_size": 32, "resnet_dropout": 0.0,
               "init": "torchvision"}  # its hparams_registry and config, ImageNet init
QTDOG_RUN = {**RELEASE_RUN, "w_bits": 7, "w_per_channel": True, "quant_start": 2000,
             "w_scale_init": "lsq_mean", "w_grad_scale_n": "tensor"}
QTDOG_STAGES = {  # stage -> algorithms and their own settings, members
    "qtdog": ({"QTDoG": QTDOG_RUN, "SWAD_QTDoG": {**QTDOG_RUN, **SWAD}}, 5),
    "swad": ({"SWAD_FP": {**RELEASE_RUN, **SWAD}}, 1),  # Table 1's SWAD: one model
}


@pytest.mark.parametrize("name", sorted(QTDOG_CONFIGS))
def test_qtdog_configs_expand_to_its_protocol(name: str, tmp_path) -> None:
    """QT-DoG's Table 1 protocol (its public release): leave-one-domain-out, 3 trials x 5 members,
    training-domain validation, 5,001 steps (DomainNet 15,001) evaluated every 200 (1,000),
    Adam 5e-5, no weight decay, 7-bit per-channel weights from step 2,000 (LSQ's init and
    whole-tensor gradient scale), ImageNet init; QT-DoG as released (SWAD on, its official
    constants) next to it, and the SWAD baseline."""
    dataset, steps, freq = QTDOG_CONFIGS[name]
    config = load_config(name)
    n_envs = len(datasets.get_dataset_class(dataset).ENVIRONMENTS)
    assert (config.dataset, config.bits, config.selection) == (dataset, (7,), "train")
    assert config.test_envs == tuple((e,) for e in range(n_envs)) and config.trials == 3
    stages = {s.name: s for s in config.stages}
    assert list(stages) == list(QTDOG_STAGES)
    planned = {s.name: s for s in plan(config, str(tmp_path / "out"), str(tmp_path / "data"))}
    for stage_name, (algorithms, members) in QTDOG_STAGES.items():
        stage = stages[stage_name]
        assert (stage.algorithms, stage.steps, stage.checkpoint_freq,
                stage.members) == (tuple(algorithms), steps, freq, members)
        jobs = planned[stage_name].jobs
        assert len(jobs) == n_envs * 3 * members * len(algorithms)
        assert len({(job.train_args["algorithm"], job.train_args["seed"]) for job in jobs}) \
            == len(jobs)
        for job in jobs:
            assert job.train_args["steps"] == steps
            hparams = json.loads(job.train_args["hparams"])
            want = algorithms[job.train_args["algorithm"]]
            assert {k: hparams[k] for k in want} == want


@pytest.mark.parametrize("bits", [4, 3])
def test_every_qat_method_config_adds_rows_to_the_papers(bits: int, tmp_path) -> None:
    """``pacs_qat_w{b}a{b}``: the GAQAT protocol's stages with SAQ searched next to LSQ and
    SAGM+LSQ, and QT-DoG quantized from its first step off the same ERM model."""
    config, paper = load_config(f"pacs_qat_w{bits}a{bits}"), load_config(f"pacs_w{bits}a{bits}")
    stages = {s.name: s for s in config.stages}
    assert stages["qat"].algorithms == ("LSQ", "SAGM_LSQ", "SAQ")
    assert stages["qtdog"].algorithms == ("QTDoG",)
    assert stages["qtdog"].hparams["quant_start"] == 0
    assert set(stages["qtdog"].grid.axes["lr"]) == LR
    assert stages["qtdog"].init_from == StageRef("fp", "ERM_FP")
    for stage in paper.stages:
        mine = stages[stage.name]
        if stage.name == "qat":
            mine = replace(mine, algorithms=stage.algorithms)
        assert mine == stage, stage.name


# DomainBed's own defaults of the methods' hparams (hparams_registry.py at b93c22a, written out)
DOMAINBED_DEFAULTS = {"CORAL": {"mmd_gamma": 1.0}, "Mixup": {"mixup_alpha": 0.2},
                      "SagNet": {"sag_w_adv": 0.1}, "GroupDRO": {"groupdro_eta": 1e-2}}
DG_FP = ["ERM_FP", "CORAL_FP", "Mixup_FP", "SagNet_FP"]


def _method(algorithm: str) -> str:
    """``CORAL_LSQ`` -> ``CORAL``."""
    return algorithm.rsplit("_", 1)[0]


def test_qtdog_with_dg_methods_is_qtdogs_protocol_for_each(tmp_path) -> None:
    """``qtdog_dg_methods``: ERM, CORAL, Mixup, SagNet and SWAD, full precision and with
    QT-DoG's quantization from step 2,000, under QT-DoG's PACS protocol (``qtdog_pacs``'s,
    one model per job), each method with DomainBed's defaults."""
    config = load_config("qtdog_dg_methods")
    assert (config.dataset, config.bits, config.selection, config.trials) == (
        "PACS", (7,), "train", 3)
    assert config.test_envs == tuple(map(tuple, TEST_ENVS["PACS"]))
    stages = {"fp": ({**{a: RELEASE_RUN for a in DG_FP}, "SWAD_FP": {**RELEASE_RUN, **SWAD}}),
              "qtdog": {"QTDoG": QTDOG_RUN, "CORAL_QTDoG": QTDOG_RUN,
                        "Mixup_QTDoG": QTDOG_RUN, "SagNet_QTDoG": QTDOG_RUN,
                        "SWAD_QTDoG": {**QTDOG_RUN, **SWAD}}}
    planned = {s.name: s for s in plan(config, str(tmp_path / "out"), str(tmp_path / "data"))}
    assert list(planned) == list(stages)
    for name, algorithms in stages.items():
        stage = planned[name].stage
        assert (stage.algorithms, stage.steps, stage.checkpoint_freq, stage.members) == (
            tuple(algorithms), 5001, 200, 1)
        jobs = planned[name].jobs
        assert len(jobs) == 4 * 3 * len(algorithms)
        for job in jobs:
            algorithm = job.train_args["algorithm"]
            hparams = json.loads(job.train_args["hparams"])
            want = {**algorithms[algorithm], **DOMAINBED_DEFAULTS.get(_method(algorithm), {})}
            assert {k: hparams[k] for k in want} == want, algorithm
            assert ("a_bits" in hparams) is False


def test_dg_methods_at_w4a4_start_from_their_own_full_precision_models(tmp_path) -> None:
    """``pacs_dg_methods_w4a4``: Table 2's protocol for each method; ``<Name>_LSQ`` starts
    from ``<Name>_FP`` of the same test domain and trial."""
    from support.plan_snapshot import fabricate

    config = load_config("pacs_dg_methods_w4a4")
    assert (config.dataset, config.bits, config.selection) == ("PACS", (4, 4), "test")
    methods = {"coral": "CORAL", "mixup": "Mixup", "sagnet": "SagNet", "groupdro": "GroupDRO"}
    stages = {s.name: s for s in config.stages}
    assert list(stages) == ["fp", "qat", *methods]
    assert stages["fp"].algorithms == (*DG_FP, "GroupDRO_FP")
    assert stages["qat"].algorithms == ("LSQ",)
    assert stages["qat"].init_from == StageRef("fp", "ERM_FP")
    for name, method in methods.items():
        stage = stages[name]
        assert stage.algorithms == (f"{method}_LSQ",) and stage.steps == STEPS["PACS"]["qat"]
        assert stage.init_from == StageRef("fp", f"{method}_FP")
        assert {k: set(v) for k, v in stage.grid.axes.items()} == {"lr": LR}
    out, data = str(tmp_path / "out"), str(tmp_path / "data")
    fp = plan(config, out, data)[0]
    assert len(fp.jobs) == len(LR) * 4 * 3 * 5
    for job in fp.jobs:
        algorithm = job.train_args["algorithm"]
        hparams = json.loads(job.train_args["hparams"])
        want = {**{k: v for k, v in expected("PACS", "ERM_FP").items() if k != "lr"},
                **DOMAINBED_DEFAULTS.get(_method(algorithm), {})}
        assert {k: hparams[k] for k in want} == want, algorithm
        assert hparams["lr"] in LR and job.train_args["steps"] == STEPS["PACS"]["fp"]
        fabricate(job, 4)
    for planned in plan(config, out, data)[1:]:
        for job in planned.jobs:
            hparams = json.loads(job.train_args["hparams"])
            source = json.loads(open(hparams["init_path"].replace("model.pkl",
                                                                  "results.jsonl")).readline())
            assert source["args"]["algorithm"] == f"{_method(job.train_args['algorithm'])}_FP" \
                or (job.train_args["algorithm"], source["args"]["algorithm"]) == ("LSQ", "ERM_FP")
            assert (source["args"]["test_envs"], source["args"]["trial_seed"]) == (
                job.train_args["test_envs"], job.train_args["trial_seed"])
            assert hparams["w_bits"] == hparams["a_bits"] == 4 and hparams["scale_lr"] == 1e-5


def test_every_sweep_config_is_pinned() -> None:
    """A new config in sweeps/ gets its protocol pinned here."""
    assert set(config_names()) - {"demo"} == set(CONFIGS) | set(QTDOG_CONFIGS) | {
        "pacs_qat_w4a4", "pacs_qat_w3a3", "qtdog_dg_methods", "pacs_dg_methods_w4a4"}
