"""Every DomainBed algorithm on the shared featurizer, quantized (``plugin/generic.py``):
``<Name>_FP``, ``<Name>_LSQ``, ``<Name>_QTDoG`` for each algorithm of DomainBed's list at the
pinned commit. Each resolves through DomainBed's own ``get_algorithm_class`` and hparams
registry, builds on RotatedDigits (and, its LSQ variant, on Debug224) with the shared
featurizer, keeps every scale in exactly one param group at ``scale_lr`` without weight decay
(in every optimizer it builds or steps, those rebuilt or made inside an update included),
moves every scale in two updates, and round-trips its ``state_dict`` strictly; what cannot
work is refused when built, naming why. The two updates of the cases outside ``make test``
run in ``make coverage`` (marker ``coverage``), beside docs/coverage.md's runs."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from domainbed import algorithms as db_algorithms
from domainbed import hparams_registry, networks
from domainbed.lib import wide_resnet
from support.helpers import PYTHON, run, tiny_hparams
from support.references import assert_collect_results_row
from torch.optim.optimizer import register_optimizer_step_post_hook

from domainbed_gaqat.plugin import generic
from domainbed_gaqat.plugin.featurizer import Featurizer
from domainbed_gaqat.plugin.hooks import hosted
from domainbed_gaqat.plugin.registry import plugin_spec
from domainbed_gaqat.quant.modules import QuantizedWeights, Scale, quantizers

# DomainBed's ALGORITHMS at the pinned commit b93c22a (domainbed/algorithms.py), written out
PINNED = ["ERM", "ERMPlusPlus", "Fish", "IRM", "GroupDRO", "Mixup", "MLDG", "CORAL", "MMD",
          "DANN", "CDANN", "MTL", "SagNet", "ARM", "VREx", "RSC", "SD", "ANDMask", "SANDMask",
          "IGA", "SelfReg", "Fishr", "TRM", "IB_ERM", "IB_IRM", "CAD", "CondCAD", "Transfer",
          "CausIRL_CORAL", "CausIRL_MMD", "EQRM", "RDM", "ADRMX", "URM"]
VARIANTS = ["FP", "LSQ", "QTDoG"]
CASES = [(base, variant) for base in PINNED for variant in VARIANTS]
# refused when built, and the words of the reason (docs/coverage.md)
REFUSED = {**{("URM", v): "output activation" for v in VARIANTS},
           ("Fish", "LSQ"): "bool flags", ("Fish", "QTDoG"): "bool flags"}
# DomainBed's own requirements, not met on a CPU machine without its optional dependency
NEEDS = {"TRM": "CUDA (DomainBed's TRM calls .cuda())", "RDM": "CUDA (DomainBed's RDM calls "
         ".cuda())", "Fishr": "backpack-for-pytorch (DomainBed's Fishr asserts it)"}
# hparams that make every optimizer rebuild happen within the two updates, and keep it small
TEST_HPARAMS = {"IRM": {"irm_penalty_anneal_iters": 1}, "VREx": {"vrex_penalty_anneal_iters": 1},
                "IB_ERM": {"ib_penalty_anneal_iters": 1},
                "IB_IRM": {"irm_penalty_anneal_iters": 1, "ib_penalty_anneal_iters": 1},
                "EQRM": {"eqrm_burnin_iters": 1}, "RDM": {"rdm_penalty_anneal_iters": 1},
                "Fishr": {"penalty_anneal_iters": 1}, "Transfer": {"d_steps_per_g": 1},
                "ERMPlusPlus": {"linear_steps": 0},  # else 500 steps of the classifier alone
                "ANDMask": {"tau": 0.0}, "SANDMask": {"tau": 0.0}}  # tau 1: envs must agree
SHAPE, N_CLASSES, N_DOMAINS, BATCH = (3, 32, 32), 10, 3, 2  # RotatedDigits' images


def _met(base: str) -> bool:
    if base in ("TRM", "RDM"):
        return torch.cuda.is_available()
    if base == "Fishr":
        return db_algorithms.backpack is not None
    return True


def _hparams(name: str) -> dict:
    base, variant = generic.split(name)
    overrides = {"batch_size": BATCH, **TEST_HPARAMS.get(base, {})}
    if variant == "QTDoG":
        overrides["quant_start"] = 0
    return tiny_hparams(name, **overrides)


def _build(name: str, shape=SHAPE, classes=N_CLASSES, domains=N_DOMAINS, **hparams):
    cls = db_algorithms.get_algorithm_class(name)  # DomainBed's own lookup
    with hosted():
        return cls(shape, classes, domains, {**_hparams(name), **hparams})


def _minibatches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, *SHAPE, generator=gen),
             torch.randint(0, N_CLASSES, (BATCH,), generator=gen)) for _ in range(N_DOMAINS)]


def _groups_with_scales(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [g for g in optimizer.param_groups if any(isinstance(p, Scale) for p in g["params"])]


def _check_scale_group(optimizer: torch.optim.Optimizer, scale_lr: float) -> None:
    """Every group that holds a scale holds only scales, at ``scale_lr``, without weight decay;
    there is one such group."""
    groups = _groups_with_scales(optimizer)
    assert len(groups) <= 1, [len(g["params"]) for g in optimizer.param_groups]
    for g in groups:
        assert all(isinstance(p, Scale) for p in g["params"])
        assert g["lr"] == scale_lr and g.get("weight_decay", 0.0) == 0.0, g["lr"]


def test_domainbeds_list_is_the_pinned_commits():
    assert generic.domainbed_bases() == PINNED


@pytest.mark.parametrize("base,variant", CASES)
def test_names_resolve_through_domainbed(base, variant):
    name = f"{base}_{variant}"
    cls = db_algorithms.get_algorithm_class(name)
    assert cls is db_algorithms.get_algorithm_class(name) is getattr(db_algorithms, name)
    assert name not in db_algorithms.ALGORITHMS or base == "ERM" and variant == "FP"
    spec = cls.SPEC
    assert spec.quantized == (variant != "FP")
    hparams = hparams_registry.default_hparams(name, "PACS")
    assert ("a_bits" in hparams) == (variant == "LSQ")
    assert ("quant_start" in hparams) == (variant == "QTDoG")
    if base == "ERM":  # the plugin's own classes
        assert cls.__name__ == {"FP": "ERM_FP", "LSQ": "LSQ", "QTDoG": "QTDoG"}[variant]
        return
    assert issubclass(cls, getattr(db_algorithms, base)) and spec.base == base
    # DomainBed's own hparams of the base, default and random draw (DomainBed's seed scheme)
    own = hparams_registry.default_hparams(base, "PACS")
    drawn = hparams_registry.random_hparams(base, "PACS", 7)
    mine = hparams_registry.random_hparams(name, "PACS", 7)
    for key in set(own) - {"resnet18", "resnet_dropout", "lr", "weight_decay", "batch_size",
                           "freeze_bn", "resnet50_augmix", "dinov2", "vit", "vit_attn_tune",
                           "vit_dropout"}:
        assert hparams[key] == own[key] and mine[key] == drawn[key], key
    assert hparams["freeze_bn"] is True and "vit" not in hparams
    assert hparams["init"] == "moco"  # the shared featurizer's, on PACS


def test_aliases_are_the_canonical_classes():
    for alias, canonical in generic.ALIASES.items():
        assert db_algorithms.get_algorithm_class(alias) is db_algorithms.get_algorithm_class(
            canonical)
    assert plugin_spec("SWAD_LSQ").families == ("swad", "quant")
    assert plugin_spec("SAGM_QTDoG").families == ("sagm", "qtdog")
    with pytest.raises(NotImplementedError):  # DomainBed's own error for a name that is none
        db_algorithms.get_algorithm_class("NoSuchMethod_LSQ")


@pytest.mark.parametrize("base,variant", CASES)
def test_builds_on_debug224_and_rotated_digits_with_its_scales_in_one_group(base, variant):
    name = f"{base}_{variant}"
    if (base, variant) in REFUSED:
        with pytest.raises(ValueError, match=f"{name} is not supported: .*"
                                             f"{REFUSED[base, variant]}"):
            _build(name)
        return
    if not _met(base):
        pytest.skip(f"{base} needs {NEEDS[base]}")
    if variant == "LSQ":  # Debug224 (DomainBed's ResNet size), once per algorithm: the
        big = _build(name, (3, 224, 224), 2, 2)  # shared featurizer, nothing downloaded
        assert [m for m in big.modules() if isinstance(m, Featurizer)]
        domainbeds = (networks.ResNet, networks.MNIST_CNN, wide_resnet.Wide_ResNet)
        assert not [m for m in big.modules() if isinstance(m, domainbeds)]
        del big
    _check_optimizers(_build(name), variant)


def _check_optimizers(algorithm, variant: str) -> None:
    """A layer the optimizers train has its scales in exactly one group, of scales only, at
    ``scale_lr`` without weight decay; a layer they do not (ERM++'s moving-average copy) has
    them in none."""
    scale_lr = algorithm.hparams.get("scale_lr")
    optimizers = [v for v in vars(algorithm).values() if isinstance(v, torch.optim.Optimizer)]
    assert optimizers
    trained = {id(p) for o in optimizers for g in o.param_groups for p in g["params"]}
    expected = [id(q.scale) for m in algorithm.modules() if isinstance(m, QuantizedWeights)
                if id(m.weight) in trained for q in (m.w_quant, m.a_quant) if q is not None]
    placed = [id(p) for o in optimizers for g in _groups_with_scales(o) for p in g["params"]]
    assert sorted(placed) == sorted(expected) and bool(expected) == (variant != "FP")
    for optimizer in optimizers:
        _check_scale_group(optimizer, scale_lr)


# Two updates of a case cost about 2 s on 2 cores: the fast suite (and `make test`) runs the
# LSQ variant of the algorithms that build their optimizers in distinct ways and QT-DoG's
# per-channel scales in several, one per update and one rebuilt at the anneal step;
# `make coverage` every other case (docs/testing.md: the time budget).
FAST = {("ERM", "LSQ"), ("CORAL", "LSQ"), ("Mixup", "LSQ"), ("SagNet", "LSQ"), ("MLDG", "LSQ"),
        ("IRM", "LSQ"), ("DANN", "LSQ"), ("ADRMX", "LSQ"), ("SagNet", "QTDoG"),
        ("MLDG", "QTDoG"), ("IRM", "QTDoG"), ("SAGM", "QTDoG")}
PLUGIN_CASES = [(base, variant) for base in ("SAGM", "SWAD") for variant in VARIANTS]


def _update_marks(base: str, variant: str) -> tuple:
    return () if (base, variant) in FAST else (pytest.mark.slow, pytest.mark.coverage)


@pytest.mark.parametrize("base,variant", [
    pytest.param(b, v, marks=_update_marks(b, v))
    for b, v in CASES + PLUGIN_CASES if (b, v) not in REFUSED])
def test_two_updates_move_every_scale_and_the_state_round_trips(base, variant):
    name = f"{base}_{variant}"
    if not _met(base):
        pytest.skip(f"{base} needs {NEEDS[base]}")
    torch.manual_seed(0)
    algorithm = _build(name)
    scale_lr = algorithm.hparams.get("scale_lr")
    scales = [q.scale for _, q in quantizers(algorithm)]
    batches = _minibatches()
    with torch.no_grad():  # one batch calibrates every scale first (range initialisation)
        for featurizer in [m for m in algorithm.modules() if isinstance(m, Featurizer)]:
            channels = featurizer.network.conv1.in_channels  # ARM's: image and context
            featurizer(torch.randn(BATCH, channels, *SHAPE[1:]))
    values = [[s.detach().clone() for s in scales]]
    stepped = []

    def check(optimizer, args, kwargs):
        stepped.append(optimizer)
        _check_scale_group(optimizer, scale_lr)

    handle = register_optimizer_step_post_hook(check)
    try:
        for _ in range(2):
            stats = algorithm.update(batches)
            values.append([s.detach().clone() for s in scales])
    finally:
        handle.remove()
    assert stats and stepped
    # each scale moves in one of the updates (IRM's restarted Adam may move it back exactly)
    unmoved = [i for i in range(len(scales))
               if all(torch.equal(a[i], b[i]) for a, b in zip(values, values[1:]))]
    assert not unmoved, f"{len(unmoved)} of {len(scales)} scales did not move"

    state = algorithm.state_dict()
    fresh = _build(name)
    if base == "Fish":  # DomainBed's Fish registers its inner copy at its first update
        fresh.update(_minibatches(seed=1))
    fresh.load_state_dict(state)  # strict
    assert _same(state, fresh.state_dict())


def _same(a, b) -> bool:
    """Equal states: tensors bit for bit, containers (SWAD's extra state) entry by entry."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


# --- the shared featurizer, refusals, QT-DoG's schedule ------------------------------------


def test_domainbeds_own_algorithms_keep_domainbeds_featurizers():
    """``networks.Featurizer`` is DomainBed's outside the plugin's generic classes."""
    assert hasattr(networks.Featurizer, "__wrapped__")  # wrapped once, at import
    hparams = hparams_registry.default_hparams("CORAL", "Debug28")
    own = db_algorithms.get_algorithm_class("CORAL")((3, 28, 28), 2, 2, hparams)
    assert isinstance(own.featurizer, networks.MNIST_CNN)
    assert isinstance(networks.Featurizer((3, 32, 32), hparams), wide_resnet.Wide_ResNet)
    shared = _build("CORAL_FP", (3, 28, 28), 2, 2)
    assert isinstance(shared.featurizer, Featurizer) and shared.network[0] is shared.featurizer
    assert isinstance(networks.Featurizer((3, 28, 28), hparams), networks.MNIST_CNN)


@pytest.mark.cuda
def test_a_non_finite_range_initialisation_is_an_error_on_cuda():
    """On a GPU the initialising forward may not know yet (no host sync there); the generic
    class reports it once DomainBed's update has read its losses."""
    algorithm = _build("CORAL_LSQ").cuda()
    batches = [(torch.full_like(x, float("nan")).cuda(), y.cuda()) for x, y in _minibatches()]
    with pytest.raises(ValueError, match="cannot initialise a quantizer scale from a tensor "
                                         "with inf/nan values"):
        algorithm.update(batches)


@pytest.mark.parametrize("name", ["CORAL_QTDoG", "SAGM_QTDoG"])
def test_qtdog_release_is_refused_beside_qtdog(name):
    with pytest.raises(ValueError, match="qtdog_release"):
        _build(name, qtdog_release=True)


def test_an_unknown_or_out_of_range_hparam_is_refused():
    with pytest.raises(ValueError, match="'mmd_gama' is not a hyperparameter of CORAL_LSQ: "
                                         "did you mean 'mmd_gamma'"):
        _build("CORAL_LSQ", mmd_gama=1.0)
    with pytest.raises(ValueError, match=r"hparams\['w_bits'\]=9 for CORAL_LSQ"):
        _build("CORAL_LSQ", w_bits=9)
    with pytest.raises(ValueError, match=r"hparams\['freeze_bn'\]=False"):
        _build("CORAL_FP", freeze_bn=False)


def test_qtdog_schedule_counts_updates_and_resumes():
    torch.manual_seed(0)
    algorithm = _build("Mixup_QTDoG", quant_start=1)
    named = [q for _, q in quantizers(algorithm)]
    algorithm.update(_minibatches())
    assert int(algorithm.steps_done) == 1
    assert not any(bool(q.enabled) or bool(q.initialized) for q in named)  # the identity
    saved = {k: v.clone() for k, v in algorithm.state_dict().items()}
    algorithm.update(_minibatches(1))
    assert int(algorithm.steps_done) == 2 and all(bool(q.enabled) for q in named)

    resumed = _build("Mixup_QTDoG", quant_start=1)
    resumed.load_state_dict(saved)
    fresh = [q for _, q in quantizers(resumed)]
    assert not any(bool(q.enabled) for q in fresh)
    resumed.update(_minibatches(1))  # the same update switches quantization on
    assert int(resumed.steps_done) == 2 and all(bool(q.enabled) for q in fresh)


# --- two stages ------------------------------------------------------------------------------


def _model_pkl(algorithm, name: str, path, shape=SHAPE) -> str:
    """``model.pkl`` as DomainBed's ``train.py`` writes it (``save_checkpoint``)."""
    torch.save({"args": {"algorithm": name}, "model_input_shape": shape,
                "model_num_classes": N_CLASSES, "model_num_domains": N_DOMAINS,
                "model_hparams": algorithm.hparams, "model_dict": algorithm.state_dict()},
               path)
    return str(path)


@pytest.mark.parametrize("base", ["CORAL", "GroupDRO", "SagNet"])
@pytest.mark.parametrize("variant", ["LSQ", "QTDoG"])
def test_second_stage_starts_from_the_first_stages_whole_model(tmp_path, base, variant):
    torch.manual_seed(0)
    first = _build(f"{base}_FP")
    first.update(_minibatches())  # GroupDRO makes its q at the first update
    path = _model_pkl(first, f"{base}_FP", tmp_path / "model.pkl")
    torch.manual_seed(1)
    second = _build(f"{base}_{variant}", init="domainbed", init_path=path)
    own = second.state_dict()
    for key, value in first.state_dict().items():
        assert torch.equal(own[key], value), key
    added = set(own) - set(first.state_dict())
    assert added and all("_quant." in k or k == "steps_done" for k in added)
    assert not any(bool(q.initialized) for _, q in quantizers(second))  # they calibrate
    second.update(_minibatches(1))


def test_a_model_of_another_algorithm_is_refused_naming_the_keys(tmp_path):
    sagnet = _build("SagNet_FP")
    path = _model_pkl(sagnet, "SagNet_FP", tmp_path / "model.pkl")
    with pytest.raises(ValueError) as info:
        _build("CORAL_LSQ", init="domainbed", init_path=path)
    message = str(info.value)
    assert path in message and "missing ['featurizer." in message
    assert "unexpected ['network_f." in message


def test_second_stage_from_domainbeds_own_model_at_224_pixels(tmp_path, monkeypatch):
    """DomainBed's own CORAL on its ResNet (torchvision's, read from the hub cache: random
    weights here) saves a model.pkl that CORAL_LSQ starts from, every key in place."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = __import__("torchvision").models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.manual_seed(3)
    torch.save(__import__("torchvision").models.resnet18().state_dict(), cached)
    hparams = {**hparams_registry.default_hparams("CORAL", "PACS"), "resnet18": True,
               "resnet50_augmix": False}
    shape = (3, 224, 224)
    theirs = db_algorithms.get_algorithm_class("CORAL")(shape, N_CLASSES, N_DOMAINS, hparams)
    assert isinstance(theirs.featurizer, networks.ResNet)
    path = _model_pkl(theirs, "CORAL", tmp_path / "model.pkl", shape)
    ours = _build("CORAL_LSQ", shape, init="domainbed", init_path=path, resnet18=True)
    own = ours.state_dict()
    for key, value in theirs.state_dict().items():
        assert torch.equal(own[key], value), key
    ours.update([(torch.randn(BATCH, *SHAPE), torch.tensor([0, 1]))] * N_DOMAINS)


# --- DomainBed's own scripts ---------------------------------------------------------------


@pytest.mark.slow
def test_domainbeds_sweep_and_collect_results_on_generic_names(tmp_path):
    """``python -m domainbed.scripts.sweep launch --algorithms CORAL_LSQ Mixup_LSQ`` (DomainBed's
    local launcher, its train.py) and ``collect_results``: the rows of both, each test env's
    number the training-domain validation choice among the runs' own records."""
    out = tmp_path / "sweep"
    run([PYTHON, "-m", "domainbed.scripts.sweep", "launch", "--datasets", "Debug28",
         "--algorithms", "CORAL_LSQ", "Mixup_LSQ", "--n_hparams", "1", "--n_trials", "1",
         "--single_test_envs", "--steps", "2", "--command_launcher", "local",
         "--skip_confirmation", "--output_dir", str(out), "--data_dir", str(tmp_path)],
        timeout=1800)
    folders = [p for p in out.iterdir() if p.is_dir()]
    assert len(folders) == 6 and all((f / "done").exists() for f in folders)
    report = run([PYTHON, "-m", "domainbed.scripts.collect_results", "--input_dir",
                  str(out)]).stdout
    assert "Total records: 12" in report  # 6 runs, steps 0 and 1
    assert "Dataset: Debug28, model selection method: training-domain" in report
    for algorithm in ("CORAL_LSQ", "Mixup_LSQ"):
        for folder in folders:  # the runs' hparams are LSQ's
            first = json.loads((folder / "results.jsonl").read_text().splitlines()[0])
            assert first["args"]["algorithm"] != algorithm or "a_bits" in first["hparams"]
        assert_collect_results_row(report, algorithm, folders, 3)


@pytest.mark.slow
@pytest.mark.coverage
def test_coverage_page_is_what_the_runs_give(tmp_path):
    """docs/coverage.md's table equals what ``scripts/coverage.py`` measures now: every
    algorithm x variant trained for two steps through DomainBed's train.py (SWAD and one
    more through gaqat train). The page was measured on a CPU machine without backpack.
    ``make coverage`` runs it (about 10 minutes on 2 cores), ``make test`` does not: there,
    :func:`test_coverage_page_agrees_with_the_registry` checks the page's decisions."""
    if torch.cuda.is_available() or db_algorithms.backpack is not None:
        pytest.skip("the page is measured without CUDA and backpack (TRM, RDM, Fishr fail)")
    repo = Path(__file__).resolve().parents[1]
    proc = run([PYTHON, str(repo / "scripts" / "coverage.py"), "--output_dir",
                str(tmp_path / "runs"), "--check", str(repo / "docs" / "coverage.md")],
               check=False, timeout=3600, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("base", ["ANDMask", "SANDMask", "IGA"])
def test_a_later_quant_start_is_refused_where_every_parameter_is_differentiated(base):
    """Before ``quant_start`` a quantizer is the identity and its scale is not in the graph;
    these updates take ``autograd.grad`` of every parameter (no ``allow_unused``)."""
    with pytest.raises(ValueError, match=f"{base}_QTDoG is not supported: quant_start 1: "):
        _build(f"{base}_QTDoG", quant_start=1)


# --- docs/coverage.md against the registry (fast; the runs themselves: ``make coverage``) ----

REPO = Path(__file__).resolve().parents[1]


def _coverage_script():
    spec = importlib.util.spec_from_file_location("coverage_script",
                                                  REPO / "scripts" / "coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _page() -> tuple[dict[str, list[str]], dict[int, str]]:
    """docs/coverage.md's table: ``{base: [FP cell, LSQ cell, QTDoG cell]}`` in page order,
    and its notes ``{number: text}``."""
    script = _coverage_script()
    block = (REPO / "docs" / "coverage.md").read_text().split(script.BEGIN)[1].split(
        script.END)[0]
    rows = {}
    for line in [line for line in block.splitlines() if line.startswith("|")][2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4:
            rows[cells[0]] = cells[1:]
    notes = {int(m[1]): m[2] for m in re.finditer(r"^\[(\d+)\] (.*?)\s*$", block, re.MULTILINE)}
    return rows, notes


def test_coverage_page_agrees_with_the_registry():
    """Each row of docs/coverage.md is an algorithm of DomainBed's list (then SAGM, SWAD);
    each name resolves through DomainBed's lookup; a cell is "refused" exactly where the build
    refuses with the hparams the page's runs use (``scripts/coverage.py``), its note the
    build's own message; "fails" only where DomainBed's own requirement (a GPU, backpack) is
    missing; every other cell "works". Fails when a refusal is added or dropped in the code but
    not on the page, a reason reworded, or DomainBed's list changes."""
    rows, notes = _page()
    assert list(rows) == generic.domainbed_bases() + ["SAGM", "SWAD"]
    script = _coverage_script()
    for base, cells in rows.items():
        for variant, cell in zip(VARIANTS, cells):
            name = f"{base}_{variant}"
            cls = db_algorithms.get_algorithm_class(name)
            canonical = generic.ALIASES.get(name) or (
                generic.PLUGIN_BASES.get(base) if variant == "FP" else None)
            same = re.search(r"\(= `(\w+)`\)", cell)
            assert (same and same[1]) == (canonical if canonical != name else None), cell
            if same:
                assert cls is db_algorithms.get_algorithm_class(canonical)
            hparams = json.loads(script.train_args(name, "", "")[-1])
            reason = (generic.refusal(name, hparams)
                      if issubclass(cls, generic.OnSharedFeaturizer) else None)
            status = cell.split()[0]
            note = notes.get(int(re.search(r"\[(\d+)\]", cell)[1])) if "[" in cell else None
            if reason is not None:
                message = f"{name} is not supported: {reason}"
                assert status == "refused" and note == f"ValueError: {message}".replace(
                    name, "<Name>"), (name, cell, note)
                with pytest.raises(ValueError, match=re.escape(message)):
                    _build(name, **hparams)
            elif status == "fails":
                assert base in NEEDS, (name, note)
            else:
                assert status == "works", (name, cell)
