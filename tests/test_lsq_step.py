"""The LSQ update step (paper sec. 2.1 and 4.1): optimizer param groups, every parameter trained,
scales at their own learning rate, each update exactly an Adam step on the batch loss, and
``update()`` returns plain floats."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from domainbed import algorithms as db_algorithms
from domainbed import datasets as db_datasets
from support.helpers import tiny_hparams

from domainbed_gaqat.quant.modules import quantizers

SHAPE, N_CLASSES, N_DOMAINS = (3, 32, 32), 10, 5
RESERVED = ("step", "epoch", "step_time", "mem_gb")  # keys DomainBed's train.py writes itself


def _build(name: str, **overrides) -> db_algorithms.Algorithm:
    cls = db_algorithms.get_algorithm_class(name)
    return cls(SHAPE, N_CLASSES, N_DOMAINS, tiny_hparams(name, **overrides))


@pytest.fixture(scope="module")
def minibatches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A small real problem: 12 RotatedDigits images from each of two training domains."""
    dataset = db_datasets.RotatedDigits("", [5], {})
    batches = []
    for env in (0, 2):
        xs, ys = zip(*[dataset[env][i] for i in range(12)])
        batches.append((torch.stack(xs), torch.stack(ys)))
    return batches


@pytest.fixture(scope="module")
def calibrated(minibatches) -> db_algorithms.Algorithm:
    """An LSQ model (ResNet-18, 32x32, weight decay on) whose quantizers calibrated on the
    first training batch; tests take a deep copy."""
    torch.manual_seed(0)
    algorithm = _build("LSQ", weight_decay=1e-4)
    with torch.no_grad():
        algorithm.predict(torch.cat([x for x, _ in minibatches]))
    assert all(bool(q.initialized) for _, q in quantizers(algorithm))
    return algorithm


@pytest.mark.parametrize("name", ["LSQ", "ERM_FP"])
def test_every_trainable_parameter_is_in_exactly_one_group(name):
    algorithm = _build(name, weight_decay=1e-4)  # before any forward: scales already exist
    trainable = [p for p in algorithm.parameters() if p.requires_grad]
    grouped = [p for group in algorithm.optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable)
    assert {id(p) for p in grouped} == {id(p) for p in trainable}

    scales = {id(q.scale) for _, q in quantizers(algorithm)}
    groups = algorithm.optimizer.param_groups
    if name == "ERM_FP":
        assert not scales and len(groups) == 1
    else:
        assert len(scales) == 39  # ResNet-18: 20 activation + 19 weight quantizers
        [scale_group] = [g for g in groups if {id(p) for p in g["params"]} == scales]
        assert scale_group["lr"] == 1e-5 and scale_group["weight_decay"] == 0.0
    [weight_group] = [g for g in groups if not scales & {id(p) for p in g["params"]}]
    assert weight_group["lr"] == algorithm.hparams["lr"]
    assert weight_group["weight_decay"] == 1e-4


def test_every_parameter_moves_and_scales_step_at_1e_5(calibrated, minibatches):
    algorithm = copy.deepcopy(calibrated)
    names = {id(p): n for n, p in algorithm.named_parameters()}
    scale_ids = {id(q.scale) for _, q in quantizers(algorithm)}
    before = {n: p.detach().clone() for n, p in algorithm.named_parameters() if p.requires_grad}

    algorithm.update(minibatches)
    # Adam's first step moves each entry by lr * g / (|g| + eps), i.e. by about lr.
    deltas = {n: (p.detach() - before[n]).abs() for n, p in algorithm.named_parameters()}
    scale_steps = torch.stack([deltas[names[i]] for i in scale_ids])
    assert scale_steps.max() <= 1.05e-5
    assert scale_steps.median() >= 0.9e-5
    weight_steps = torch.cat([d.flatten() for n, d in deltas.items()
                              if n not in {names[i] for i in scale_ids}])
    assert weight_steps.max() == pytest.approx(algorithm.hparams["lr"], rel=0.05)

    for _ in range(2):
        algorithm.update(minibatches)
    unchanged = [n for n, p in algorithm.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged
    assert len(before) == len(list(algorithm.parameters()))


def _adam_reference(params: list[torch.Tensor], grads: list[torch.Tensor], state: dict,
                    lr: float, weight_decay: float, betas=(0.9, 0.999), eps=1e-8) -> list:
    """One Adam step (Kingma & Ba 2015, Algorithm 1; L2 weight decay added to the gradient,
    as ``torch.optim.Adam``), in float64; ``state`` keeps t, m and v per parameter."""
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        p, g = p.double(), g.double() + weight_decay * p.double()
        t, m, v = state.get(i, (0, torch.zeros_like(p), torch.zeros_like(p)))
        t, m, v = t + 1, betas[0] * m + (1 - betas[0]) * g, betas[1] * v + (1 - betas[1]) * g * g
        state[i] = t, m, v
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        out.append(p - lr * m_hat / (v_hat.sqrt() + eps))
    return out


def test_update_is_adam_on_the_batch_loss(calibrated, minibatches):
    """Two ``update()`` calls: each moves every latent weight and every scale exactly as one
    Adam step on the cross-entropy of the concatenated minibatches at the current parameters
    (weights at ``lr`` with weight decay, scales at ``scale_lr`` without), and reports that
    loss before the step."""
    algorithm = copy.deepcopy(calibrated)
    x = torch.cat([x for x, _ in minibatches])
    y = torch.cat([y for _, y in minibatches])
    groups = [(algorithm.weights, algorithm.hparams["lr"], algorithm.hparams["weight_decay"]),
              (algorithm.scales, algorithm.hparams["scale_lr"], 0.0)]
    assert groups[0][2] > 0 and len(groups[1][0]) == 39
    states = [{}, {}]
    for _ in range(2):
        loss = F.cross_entropy(algorithm.predict(x), y)
        grads = torch.autograd.grad(loss, [p for params, _, _ in groups for p in params])
        expected, i = [], 0
        for (params, lr, wd), state in zip(groups, states):
            expected += _adam_reference([p.detach() for p in params], grads[i:i + len(params)],
                                        state, lr, wd)
            i += len(params)
        out = algorithm.update(minibatches)
        assert out["loss"] == pytest.approx(loss.item(), rel=1e-6)
        moved = [p.detach().double() for params, _, _ in groups for p in params]
        for got, want in zip(moved, expected):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["LSQ", "ERM_FP"])
def test_update_returns_json_serialisable_floats(calibrated, minibatches, name):
    algorithm = copy.deepcopy(calibrated) if name == "LSQ" else _build(name)
    x = torch.cat([x for x, _ in minibatches])
    y = torch.cat([y for _, y in minibatches])
    with torch.no_grad():
        expected = F.cross_entropy(algorithm.predict(x), y).item()
    out = algorithm.update(minibatches, None)
    json.loads(json.dumps(out))
    assert out and all(type(v) is float for v in out.values())
    assert not [k for k in out if k in RESERVED or k.startswith("env")]
    assert out["loss"] == pytest.approx(expected, rel=1e-5)  # the loss before the step


def test_update_is_update_tensors_read_once(calibrated, minibatches):
    """``update_tensors`` (what a sync-free training loop calls) takes the same step as
    ``update`` and returns its statistics as 0-d tensors, the same keys and values."""
    first, second = copy.deepcopy(calibrated), copy.deepcopy(calibrated)
    floats = first.update(minibatches, None)
    tensors = second.update_tensors(minibatches, None)
    assert list(tensors) == list(floats)
    assert all(isinstance(t, torch.Tensor) and t.dim() == 0 for t in tensors.values())
    assert {k: t.item() for k, t in tensors.items()} == floats
    for p, q in zip(first.parameters(), second.parameters()):
        assert torch.equal(p, q)
