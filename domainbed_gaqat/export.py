"""Low-bit ONNX export of a trained quantized model (the paper's deployment motivation, sec. 1).

The graph is built node by node from the module tree (opset 21), so every tensor is what the
quantized PyTorch model computes in eval mode:

- quantized conv weights are **integer initializers** ``clamp(round(w / s_w), l, u)`` in the
  INT4 container for 2-4 bits (3-bit codes lie in ``[-4, 3]``) or INT8 for 5-8 bits, feeding
  ``DequantizeLinear`` with the learned weight scale (zero point 0);
- conv inputs pass ``QuantizeLinear`` / ``DequantizeLinear`` with the learned activation scale:
  UINT4 (UINT8 above 4 bits) after a ReLU, INT4 (INT8) for the stem's signed image input.
  QuantizeLinear saturates to the container, so below 4 (8) bits an explicit clip to the
  grid ``[l * s, u * s]`` comes first (onnxruntime runs int4 QDQ in float), so
  the integer tensor holds the 3-bit codes (``[0, 7]``, ``[-4, 3]`` for the stem). The clip is
  written ``Min(Max(x, l * s), u * s)``: onnxruntime 1.32's ``ClipQuantFusion`` (a default
  CPU graph optimization) fails the session on a ``Clip`` feeding a 4-bit QuantizeLinear
  ("Unexpected data type for QuantizeLinear input y_zero_point"), and an ONNX ``Clip`` after
  the QuantizeLinear is impossible (Clip has no int4 type);
- the stem conv's weights and the linear classifier stay float (paper sec. 4.1), BatchNorm
  stays ``BatchNormalization`` with the frozen statistics (it follows the conv, so it cannot be
  folded into the integer weights), then Relu, MaxPool, Add, GlobalAveragePool, Flatten, Gemm.

PyTorch's ``round`` and ONNX's QuantizeLinear both round half to even and saturate after
rounding, as LSQ's ``clamp(round(v / s), l, u)``. A float export of the same latent weights
(no quantization) is written alongside for the size comparison, and both are checked with
onnxruntime on CPU against PyTorch (argmax agreement, max abs logit error) on random inputs.

    gaqat export runs/gaqat_w4/model.pkl --output_dir export/gaqat_w4
"""

import json
import os

import numpy as np
import torch

try:
    import ml_dtypes
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as err:  # the optional 'export' extra
    raise ImportError(f"gaqat export needs onnx, onnxruntime and ml_dtypes: pip install "
                      f"'domainbed-gaqat[export]' ({err})") from err
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from domainbed_gaqat import options
from domainbed_gaqat.experiments import outputs
from domainbed_gaqat.plugin.data import Data, load_batches
from domainbed_gaqat.plugin.model_files import load_algorithm, require_quantized
from domainbed_gaqat.plugin.registry import quantized_algorithms
from domainbed_gaqat.quant.modules import (
    LSQQuantizer,
    QuantConv2d,
    quantization_disabled,
    quantizers,
)

OPSET = 21
INT_DTYPES = {  # (signed, container bits) -> numpy dtype
    (True, 4): ml_dtypes.int4, (False, 4): ml_dtypes.uint4,
    (True, 8): np.int8, (False, 8): np.uint8,
}


def container_bits(bits: int) -> int:
    """Storage width of a ``bits``-bit integer: 4 (INT4/UINT4) up to 4 bits, else 8."""
    return 4 if bits <= 4 else 8


class GraphBuilder:
    """Collects ONNX nodes and initializers; names are unique and readable."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def name(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def constant(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, **attrs) -> str:
        out = self.name(base)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy()


def _scale(q: LSQQuantizer) -> np.float32:
    return np.float32(q.scale.detach().cpu().float().item())


def quantize_activation(g: GraphBuilder, x: str, q: LSQQuantizer, name: str) -> str:
    """Clip (``Max``/``Min``, below the container width) -> QuantizeLinear -> DequantizeLinear."""
    s = _scale(q)
    signed = q.lower < 0
    dtype = INT_DTYPES[(signed, container_bits(q.bits))]
    scale = g.constant(f"{name}.a_scale", np.array(s, dtype=np.float32))
    zero = g.constant(f"{name}.a_zero_point", np.array(0, dtype=dtype))
    if q.bits < container_bits(q.bits):
        lo = g.constant(f"{name}.a_min", np.float32(q.lower) * s)
        hi = g.constant(f"{name}.a_max", np.float32(q.upper) * s)
        x = g.op("Max", [x, lo], f"{name}.a_clip_lo")  # Clip, as Max/Min: see the docstring
        x = g.op("Min", [x, hi], f"{name}.a_clip_hi")
    xq = g.op("QuantizeLinear", [x, scale, zero], f"{name}.a_int")
    return g.op("DequantizeLinear", [xq, scale, zero], f"{name}.a_dq")


def weight_integers(conv: QuantConv2d) -> np.ndarray:
    """The conv's integer weight codes ``clamp(round(w / s), l, u)`` in their container type."""
    q = conv.w_quant
    with torch.no_grad():
        codes = q.integers(conv.weight).cpu().numpy().astype(np.int16)
    return codes.astype(INT_DTYPES[(True, container_bits(q.bits))])


def conv(g: GraphBuilder, x: str, module: nn.Conv2d, name: str, quantize: bool) -> str:
    """A (quantized) conv: activations through Q/DQ, weights integer + DequantizeLinear."""
    if isinstance(module, QuantConv2d) and quantize and module.a_quant is not None:
        x = quantize_activation(g, x, module.a_quant, name)
    if isinstance(module, QuantConv2d) and quantize and module.w_quant is not None:
        q = module.w_quant
        codes = g.constant(f"{name}.w_int", weight_integers(module))
        scales = q.scale.detach().cpu().float().numpy()  # 0-d, or one per output channel
        scale = g.constant(f"{name}.w_scale", scales)
        zero = g.constant(f"{name}.w_zero_point",
                          np.zeros(scales.shape, INT_DTYPES[(True, container_bits(q.bits))]))
        axis = {"axis": 0} if scales.ndim else {}
        weight = g.op("DequantizeLinear", [codes, scale, zero], f"{name}.w_dq", **axis)
    else:
        weight = g.constant(f"{name}.weight", _f32(module.weight))
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise ValueError(f"{name}: padding {module.padding!r} / {module.padding_mode!r}: only "
                         "explicit zero padding is exported")
    inputs = [x, weight] + ([g.constant(f"{name}.bias", _f32(module.bias))]
                            if module.bias is not None else [])
    pads = list(module.padding) * 2
    return g.op("Conv", inputs, f"{name}.out", kernel_shape=list(module.kernel_size),
                strides=list(module.stride), pads=pads, dilations=list(module.dilation),
                group=module.groups)


def batchnorm(g: GraphBuilder, x: str, bn: nn.BatchNorm2d, name: str) -> str:
    """Frozen (eval-mode) BatchNorm with its running statistics."""
    inputs = [x] + [g.constant(f"{name}.{k}", _f32(getattr(bn, k)))
                    for k in ("weight", "bias", "running_mean", "running_var")]
    return g.op("BatchNormalization", inputs, f"{name}.out", epsilon=float(bn.eps))


def block(g: GraphBuilder, x: str, m: nn.Module, name: str, quantize: bool) -> str:
    """A torchvision BasicBlock / Bottleneck, as its ``forward``."""
    convs = ["conv1", "conv2"] + (["conv3"] if isinstance(m, Bottleneck) else [])
    out = x
    for i, c in enumerate(convs):
        out = conv(g, out, getattr(m, c), f"{name}.{c}", quantize)
        out = batchnorm(g, out, getattr(m, f"bn{i + 1}"), f"{name}.bn{i + 1}")
        if i < len(convs) - 1:
            out = g.op("Relu", [out], f"{name}.relu{i + 1}")
    identity = x
    if m.downsample is not None:
        identity = conv(g, x, m.downsample[0], f"{name}.downsample.0", quantize)
        identity = batchnorm(g, identity, m.downsample[1], f"{name}.downsample.1")
    out = g.op("Add", [out, identity], f"{name}.add")
    return g.op("Relu", [out], f"{name}.relu")


def build_model(algorithm: nn.Module, quantize: bool = True) -> onnx.ModelProto:
    """The ONNX model of ``algorithm.predict`` in eval mode (see module docstring)."""
    net = algorithm.featurizer.network
    if quantize and not any(True for _ in quantizers(net)):
        raise ValueError(f"{type(algorithm).__name__} has no quantizers: expected a quantized "
                         f"model ({', '.join(quantized_algorithms())})")
    g = GraphBuilder()
    x = g.name("input")
    out = conv(g, x, net.conv1, "conv1", quantize)
    out = batchnorm(g, out, net.bn1, "bn1")
    out = g.op("Relu", [out], "relu")
    mp = net.maxpool
    k, s, p = (v if isinstance(v, int) else v[0] for v in (mp.kernel_size, mp.stride, mp.padding))
    if mp.ceil_mode or mp.dilation not in (1, (1, 1)):
        raise ValueError("maxpool with ceil_mode or dilation is not exported")
    out = g.op("MaxPool", [out], "maxpool", kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        for i, m in enumerate(getattr(net, layer)):
            if not isinstance(m, BasicBlock | Bottleneck):
                raise ValueError(f"{layer}.{i} is a {type(m).__name__}: expected a torchvision "
                                 "BasicBlock or Bottleneck")
            out = block(g, out, m, f"{layer}.{i}", quantize)
    out = g.op("GlobalAveragePool", [out], "avgpool")
    out = g.op("Flatten", [out], "flatten", axis=1)  # dropout: identity in eval mode
    fc = algorithm.classifier
    logits = g.op("Gemm", [out, g.constant("classifier.weight", _f32(fc.weight)),
                           g.constant("classifier.bias", _f32(fc.bias))], "logits", transB=1)
    c, h, w = algorithm.featurizer.network.conv1.weight.shape[1], None, None
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", c, h, w])]
    outputs = [helper.make_tensor_value_info(logits, TensorProto.FLOAT,
                                             ["N", fc.out_features])]
    kind = "quantized" if quantize else "float"
    graph = helper.make_graph(g.nodes, f"domainbed_gaqat_{kind}", inputs, outputs,
                              g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="domainbed_gaqat")
    onnx.checker.check_model(model, full_check=True)
    return model


# --- sizes and checks ----------------------------------------------------------------------


def expected_sizes(algorithm: nn.Module) -> dict[str, int]:
    """Bytes of the tensors each export stores, from counting parameters: quantized conv
    weights at their container width (4 or 8 bits), everything else (stem conv, BatchNorm
    weights/biases/statistics, classifier) as float32, plus the scalar scales/zero points."""
    net = algorithm.featurizer.network
    qconvs = [m for m in net.modules() if isinstance(m, QuantConv2d) and m.w_quant is not None]
    q_ids = {id(m.weight) for m in qconvs}
    n_quant = sum(m.weight.numel() for m in qconvs)
    packed = sum((m.weight.numel() * container_bits(m.w_quant.bits) + 7) // 8 for m in qconvs)
    floats = [t for t in list(net.parameters()) + list(algorithm.classifier.parameters())
              if id(t) not in q_ids and t.dim() > 0]
    floats += [b for n, b in net.named_buffers() if n.endswith(("running_mean", "running_var"))]
    n_float = sum(t.numel() for t in floats)
    # per scale a float32 and a 1-byte zero point; an activation's clip bounds (2 x float32)
    extra = sum(5 * q.scale.numel() + 8 for _, q in quantizers(net))
    int_bytes = packed + 4 * n_float + extra
    float_bytes = 4 * (n_quant + n_float)
    return {"quantized_conv_weights": n_quant, "float_values": n_float,
            "expected_int_bytes": int_bytes, "expected_float_bytes": float_bytes,
            "expected_ratio": float_bytes / int_bytes}


def compare(path: str, algorithm: nn.Module, x: torch.Tensor,
            quantized: bool = True) -> dict[str, float]:
    """onnxruntime (CPU) vs PyTorch eval-mode logits on ``x``: max abs error, the largest
    |logit|, and the fraction of equal argmax predictions."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    algorithm.eval()
    with torch.no_grad():
        if quantized:
            want = algorithm.predict(x).numpy()
        else:
            with quantization_disabled(algorithm):
                want = algorithm.predict(x).numpy()
    return {"max_abs_logit_error": float(np.abs(got - want).max()),
            "max_abs_logit": float(np.abs(want).max()),
            "argmax_agreement": float((got.argmax(1) == want.argmax(1)).mean()),
            "n_inputs": len(x)}


def bit_widths(algorithm: nn.Module) -> tuple[int, int | None]:
    """``(W, A)`` bits of the quantizers (A None: weights only)."""
    qs = [q for _, q in quantizers(algorithm)]
    w = {q.bits for q in qs if q.is_weight}
    a = {q.bits for q in qs if not q.is_weight}
    return max(w), max(a) if a else None


# --- command line --------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("model", help="a DomainBed model.pkl of a quantized algorithm")
    parser.add_argument("--n_random", type=options.positive_int, default=64,
                        help="random inputs for the onnxruntime check")
    parser.add_argument("--n_data", type=int, default=0,
                        help="also check on this many test-env examples (needs the dataset)")
    parser.add_argument("--seed", type=int, default=0)
    options.output(parser)


def run(args) -> int:
    names = ("model_int.onnx", "model_float.onnx", "export.json")
    paths = [os.path.join(args.output_dir, n) for n in names]
    outputs.check_new(paths, args.overwrite)
    algorithm, ckpt = load_algorithm(args.model, "cpu")
    require_quantized(ckpt, args.model)
    w_bits, a_bits = bit_widths(algorithm)
    report = {"model": os.path.abspath(args.model), "algorithm": ckpt["args"]["algorithm"],
              "w_bits": w_bits, "a_bits": a_bits, "opset": OPSET}
    for path, quantize in ((paths[0], True), (paths[1], False)):
        model = build_model(algorithm, quantize)
        outputs.atomic_write(path, lambda p, m=model: onnx.save(m, p), args.overwrite)
        print(f"{'quantized' if quantize else 'float'} model: {os.path.getsize(path)} bytes")
    report.update(expected_sizes(algorithm))
    report["int_bytes"] = os.path.getsize(paths[0])
    report["float_bytes"] = os.path.getsize(paths[1])
    report["ratio"] = report["float_bytes"] / report["int_bytes"]

    shape = tuple(ckpt["model_input_shape"])
    x = torch.randn((args.n_random, *shape), generator=torch.Generator().manual_seed(args.seed))
    report["random_check"] = compare(paths[0], algorithm, x)
    report["float_random_check"] = compare(paths[1], algorithm, x, quantized=False)
    if args.n_data > 0:
        data = Data.from_checkpoint(ckpt)
        batches = load_batches(data.split(data.test_envs[0], "in"), args.n_data, "cpu")
        report["data_check"] = compare(paths[0], algorithm, torch.cat([b for b, _ in batches]))
    text = json.dumps(report, indent=1)
    print(text)
    outputs.write_text(paths[2], text, args.overwrite)
    outputs.finish(paths)
    return 0


if __name__ == "__main__":
    from domainbed_gaqat.cli import run_as_module

    run_as_module("export")
