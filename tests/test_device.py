"""Device-clean: every module, buffer and tool tensor is on the device of the model it serves,
and a step reads no device value on the host.

Without a GPU the ``meta`` device stands in (tensors with shapes and no values): a tensor made
on the CPU beside meta tensors raises, as one beside CUDA tensors does, and so does a host read
of a device value (``item``, ``tolist``, ``bool``). Models are built on the CPU and moved as to
a GPU (``bench.move``: the parameter objects the optimizer holds are kept).

PyTorch's meta kernels of ``div(out=)`` and ``clamp`` are Python (about 10 ms and 2 ms a call
here), so MSE range initialisation (100 candidates, 6 ops each, per quantizer) costs about a
second per quantizer on meta: it runs there for the quantized conv (each kind of quantizer);
the algorithms start from initialised scales (their range initialisation is the quantizer's).
``test_bench.py`` runs the sync check, which initialises, on the CPU. The ``cuda`` tests run the
same on a GPU (``scripts/gpu_check.sh``).
"""

import pytest
import torch
import torchvision
from torch import nn

from domainbed_gaqat import bench, cli
from domainbed_gaqat.optim.sagm import sagm_step
from domainbed_gaqat.plugin.algorithms import ALGORITHMS
from domainbed_gaqat.quant.config import QuantConfig
from domainbed_gaqat.quant.modules import QuantConv2d, quantizers
from domainbed_gaqat.quant.transform import QuantPolicy, quantize
from domainbed_gaqat.traces import TraceRecorder

META = torch.device("meta")
CONFIGS = {  # (weight, activation) quantizers of a conv: each kind the featurizers use
    "paper": (QuantConfig(4, True), QuantConfig(4, False)),
    "stem": (None, QuantConfig(4, True)),
    "qtdog": (QuantConfig(7, True, granularity="channel", range_init="lsq_mean",
                          grad_scale_n="tensor"), None),
    "lsq_mean": (QuantConfig(3, True, range_init="lsq_mean"),
                 QuantConfig(3, False, range_init="lsq_mean")),
}


def quick_args(*argv: str):
    return bench.resolve(cli.command_parser("bench")[0].parse_args(["--quick", *argv]))


def off_device(module: nn.Module, device: torch.device, optimizers=()) -> list[str]:
    """Names of the parameters, gradients, buffers and optimizer states not on ``device``;
    Adam's step counters excepted (a CPU scalar by PyTorch's design, read without a sync)."""
    named = [*module.named_parameters(), *module.named_buffers()]
    named += [(f"{n}.grad", p.grad) for n, p in module.named_parameters() if p.grad is not None]
    for optimizer in optimizers:
        named += [(f"optimizer[{i}].{k}", v) for i, state in enumerate(optimizer.state.values())
                  for k, v in state.items() if k != "step" and isinstance(v, torch.Tensor)]
    return [n for n, t in named if t.device != device]


def initialised(name: str, device: torch.device, args=None):
    """``name`` built on the CPU with :data:`bench.SYNC_HPARAMS`, its quantizers marked
    initialised (state dict), then moved to ``device``."""
    args = args or quick_args()
    alg = bench.build(name, args, torch.device("cpu"), **bench.SYNC_HPARAMS)
    state = alg.state_dict()
    alg.load_state_dict({k: torch.ones_like(v) if k.endswith("_quant.initialized") else v
                         for k, v in state.items()})
    bench.move(alg, device)
    return alg, args


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_quant_conv_is_made_on_its_conv_device(kind):
    """A conv already on a device gets its quantizers there; the forward (range
    initialisation included) and backward stay there; scale gradients are float32."""
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=kind == "stem", device=META)
    qconv = QuantConv2d(conv, *CONFIGS[kind])
    assert off_device(qconv, META) == []
    x = torch.randn(2, 8, 6, 6, device=META, requires_grad=True)
    qconv(x).sum().backward()
    assert x.grad.device == META and off_device(qconv, META) == []
    for _, q in quantizers(qconv):
        assert q.scale.grad.dtype == torch.float32 and not q.initialization_failed(wait=True)


def test_policy_applied_to_a_model_on_a_device_keeps_it_there():
    with torch.device(META):
        net = torchvision.models.resnet18(weights=None)
    quantize(net, QuantPolicy(weight=QuantConfig(4, True), activation=QuantConfig(4, False),
                              first_input=QuantConfig(4, True)))
    assert sum(1 for _ in quantizers(net)) == 2 * 20 - 1
    assert off_device(net, META) == []


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_algorithm_steps_on_the_meta_device(name):
    """Every registered algorithm through the sync check's phases (step 0, a plain step, a
    GAQAT K boundary, QT-DoG's quant_start): statistics as 0-d tensors on the device, and
    parameters, gradients, buffers and optimizer state still there."""
    alg, args = initialised(name, META)
    batch = bench.make_batch(args, META)
    for _ in range(max(bench.sync_phases(name)) + 1):
        stats = alg.update_tensors(batch)
        assert stats and all(v.device == META and v.dim() == 0 for v in stats.values())
    assert off_device(alg, META, [alg.optimizer]) == []


def test_trace_recorder_keeps_its_state_on_the_algorithm_device():
    """Trackers and block sums on the algorithm's device; a closed disorder window is not
    read by the host before its block is flushed."""
    alg, args = initialised("LSQ", META)
    recorder = TraceRecorder(alg, every=10, K=2)
    for tracker in recorder.trackers.values():
        assert off_device(tracker, META) == []
    batch = bench.make_batch(args, META)
    for _ in range(3):  # the third update closes the first window (K = 2)
        alg.update_tensors(batch)
    assert recorder.step == 3 and recorder.trackers["task"].K == 2
    assert recorder.rows == [] and recorder.disorder_rows == []  # read at the flush only


@pytest.mark.parametrize("n_scales", [0, 2])
def test_sagm_step_returns_tensors_on_the_model_device(n_scales):
    """The SAGM step's loss and scale gradients (empty without scales) on the model's device."""
    model = nn.Linear(3, 2, device=META)
    scales = [nn.Parameter(torch.ones((), device=META)) for _ in range(n_scales)]
    x = torch.randn(4, 3, device=META)

    def loss():
        out = model(x)
        return sum((s * out).sum() for s in scales) if scales else out.sum()

    results = sagm_step(loss, model, list(model.parameters()), scales, rho=0.05, alpha=0.001)
    assert [t.device for t in results] == [META] * 3
    assert [tuple(t.shape) for t in results[1:]] == [(n_scales,)] * 2


# --- on a CUDA device ---------------------------------------------------------------------


@pytest.mark.cuda
def test_every_algorithm_is_device_clean_on_cuda():
    """The sync check on CUDA (its sync debug mode set to error) passes every phase, and the
    state stays on the GPU."""
    results = bench.sync_check(quick_args("--device", "cuda"), torch.device("cuda"))
    assert results == {name: dict.fromkeys(bench.sync_phases(name).values(), "ok")
                       for name in ALGORITHMS}


@pytest.mark.cuda
def test_quant_conv_and_traces_on_cuda():
    cuda = torch.device("cuda", torch.cuda.current_device())
    qconv = QuantConv2d(nn.Conv2d(8, 16, 3, device=cuda), *CONFIGS["paper"])
    assert off_device(qconv, cuda) == []
    alg, args = initialised("GAQAT", cuda)
    recorder = TraceRecorder(alg, every=2, K=2)
    batch = bench.make_batch(args, cuda)
    for _ in range(3):
        alg.update(batch)
    recorder.close()
    grads, disorder = recorder.frames()
    assert len(grads) == 2 * len(alg.scales) and len(disorder) == 2 * len(alg.scales)
    assert off_device(alg, cuda, [alg.optimizer]) == []
