"""Low-bit ONNX export of a trained quantized model (the paper's deployment motivation, sec. 1).

The graph is the algorithm's ``predict``, traced with ``torch.fx`` (the quantized layers kept
whole) and walked node by node into ONNX (opset 21), so every tensor is what the quantized
PyTorch model computes in eval mode, for any featurizer built from convolutions, BatchNorm,
ReLU, pooling, additions and a linear classifier (the shared ResNet, under any of the plugin's
algorithms or DomainBed's on it):

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
(the model :func:`~domainbed_gaqat.quant.transform.dequantize` gives back) is written
alongside for the size comparison, and both are checked with onnxruntime on CPU against
PyTorch (argmax agreement, max abs logit error) on random inputs. Nodes are named after their
modules (the shared ResNet's by its own names: ``layer1.0.conv1``).

    gaqat export runs/gaqat_w4/model.pkl --output_dir export/gaqat_w4
"""

import copy
import json
import operator
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

try:
    import ml_dtypes
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as err:  # the optional 'export' extra
    raise ImportError(f"gaqat export needs onnx, onnxruntime and ml_dtypes: pip install "
                      f"'domainbed-gaqat[export]' ({err})") from err
from torch import nn

from domainbed_gaqat import options
from domainbed_gaqat.experiments import outputs
from domainbed_gaqat.plugin.data import Data, load_batches
from domainbed_gaqat.plugin.model_files import load_algorithm, require_quantized
from domainbed_gaqat.plugin.registry import quantized_algorithms
from domainbed_gaqat.quant.modules import (
    LSQQuantizer,
    QuantConv2d,
    QuantizedWeights,
    Scale,
    quantization_disabled,
    quantizers,
)
from domainbed_gaqat.quant.transform import dequantize

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


def conv(g: GraphBuilder, x: str, module: nn.Conv2d, name: str) -> str:
    """A conv, quantized as its twin says: activations through Q/DQ, weights integer +
    DequantizeLinear; a plain ``nn.Conv2d`` (or a twin's float parts) in float."""
    quantized = isinstance(module, QuantConv2d)
    if quantized and module.a_quant is not None:
        x = quantize_activation(g, x, module.a_quant, name)
    if quantized and module.w_quant is not None:
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


def maxpool(g: GraphBuilder, x: str, mp: nn.MaxPool2d, name: str) -> str:
    k, s, p = (v if isinstance(v, int) else v[0] for v in (mp.kernel_size, mp.stride, mp.padding))
    if mp.ceil_mode or mp.dilation not in (1, (1, 1)):
        raise ValueError(f"{name}: maxpool with ceil_mode or dilation is not exported")
    return g.op("MaxPool", [x], name, kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)


def linear(g: GraphBuilder, x: str, fc: nn.Linear, name: str) -> str:
    inputs = [x, g.constant(f"{name}.weight", _f32(fc.weight))]
    inputs += [g.constant(f"{name}.bias", _f32(fc.bias))] if fc.bias is not None else []
    return g.op("Gemm", inputs, f"{name}.out" if name != "classifier" else "logits", transB=1)


class _Predict(nn.Module):
    """``algorithm.predict`` as a module (what is traced and exported)."""

    def __init__(self, algorithm: nn.Module) -> None:
        super().__init__()
        self.algorithm = algorithm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.algorithm.predict(x)


class _Tracer(fx.Tracer):
    """``torch.fx`` tracing with the quantized layers as leaves (their ONNX is written by
    :func:`conv`, not traced)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantizedWeights) or super().is_leaf_module(m, qualname)


def _layer_name(qualname: str) -> str:
    """An ONNX name from a module's name in the algorithm: the shared ResNet's layers by their
    own names (``algorithm.featurizer.network.layer1.0.conv1`` -> ``layer1.0.conv1``)."""
    return qualname.removeprefix("algorithm.").removeprefix("featurizer.network.").removeprefix(
        "network.0.network.")


MODULES = {  # module type -> its ONNX (None: the identity in eval mode)
    nn.Conv2d: conv, nn.BatchNorm2d: batchnorm, nn.MaxPool2d: maxpool, nn.Linear: linear,
    nn.ReLU: lambda g, x, m, name: g.op("Relu", [x], name),
    nn.AdaptiveAvgPool2d: lambda g, x, m, name: g.op("GlobalAveragePool", [x], name),
    nn.Flatten: lambda g, x, m, name: g.op("Flatten", [x], name, axis=m.start_dim),
    nn.Dropout: None, nn.Identity: None}
FUNCTIONS = {operator.add: "Add", operator.iadd: "Add", torch.add: "Add", torch.relu: "Relu",
             F.relu: "Relu", torch.flatten: "Flatten"}


def _module(g: GraphBuilder, x: str, module: nn.Module, name: str) -> str:
    kind = nn.Conv2d if isinstance(module, QuantConv2d) else type(module)
    if kind not in MODULES:
        raise ValueError(f"{name}: a {type(module).__name__} is not exported (convolutions, "
                         "BatchNorm, ReLU, max and global average pooling, additions, dropout "
                         "and float linear layers are)")
    if kind is nn.AdaptiveAvgPool2d and module.output_size not in (1, (1, 1)):
        raise ValueError(f"{name}: adaptive pooling to {module.output_size}: only to 1x1")
    return x if MODULES[kind] is None else MODULES[kind](g, x, module, name)


def _function(g: GraphBuilder, node: fx.Node, values: dict) -> str:
    op = FUNCTIONS.get(node.target)
    tensors = [values[a] for a in node.args if isinstance(a, fx.Node)]
    if op == "Flatten" and tuple(node.args[1:]) + tuple(node.kwargs.values()) in ((1,), (1, -1)):
        return g.op("Flatten", tensors, node.name, axis=1)
    if op == "Add" and len(tensors) == 2 or op == "Relu" and len(tensors) == 1:
        return g.op(op, tensors, node.name)
    raise ValueError(f"{node.format_node()}: not exported (additions, ReLU and flattening from "
                     "dim 1 are)")


def _trace(model: _Predict) -> fx.Graph:
    try:
        return _Tracer().trace(model.eval())
    except Exception as err:  # fx's TraceError and what the traced code raises
        raise ValueError(f"{type(model.algorithm).__name__}.predict cannot be traced into a "
                         f"graph ({type(err).__name__}: {err})") from err


def exported_modules(algorithm: nn.Module) -> list[nn.Module]:
    """The layers ``algorithm.predict`` calls (what the export holds), in call order."""
    model = _Predict(algorithm)
    found = {}
    for node in _trace(model).nodes:
        if node.op == "call_module":
            found.setdefault(node.target, model.get_submodule(node.target))
    return list(found.values())


def build_model(algorithm: nn.Module, quantize: bool = True) -> onnx.ModelProto:
    """The ONNX model of ``algorithm.predict`` in eval mode (see module docstring); with
    ``quantize=False`` of the float model of the same latent weights."""
    if quantize and not any(True for _ in quantizers(algorithm)):
        raise ValueError(f"{type(algorithm).__name__} has no quantizers: expected a quantized "
                         f"model ({', '.join(quantized_algorithms())})")
    model = _Predict(algorithm if quantize else dequantize(copy.deepcopy(algorithm)))
    graph = _trace(model)
    g = GraphBuilder()
    values, inputs, logits, classes = {}, [], None, None
    for node in graph.nodes:
        if node.op == "placeholder":
            values[node] = g.name("input")
        elif node.op == "call_module":
            module = model.get_submodule(node.target)
            if not inputs and isinstance(module, nn.Conv2d):
                inputs = [helper.make_tensor_value_info(values[node.args[0]], TensorProto.FLOAT,
                                                        ["N", module.in_channels, None, None])]
            if isinstance(module, nn.Linear):
                classes = module.out_features
            values[node] = _module(g, values[node.args[0]], module, _layer_name(node.target))
        elif node.op == "call_function":
            values[node] = _function(g, node, values)
        elif node.op == "output":
            logits = values[node.args[0]]
        else:
            raise ValueError(f"{node.format_node()}: not exported")
    outputs = [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", classes])]
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
    weights/biases/statistics, classifier) as float32, plus the scales and zero points."""
    layers = exported_modules(algorithm)
    qconvs = [m for m in layers if isinstance(m, QuantConv2d) and m.w_quant is not None]
    q_ids = {id(m.weight) for m in qconvs}
    n_quant = sum(m.weight.numel() for m in qconvs)
    packed = sum((m.weight.numel() * container_bits(m.w_quant.bits) + 7) // 8 for m in qconvs)
    floats = [t for m in layers for t in m.parameters()
              if id(t) not in q_ids and not isinstance(t, Scale)]
    floats += [b for m in layers for n, b in m.named_buffers()
               if n.endswith(("running_mean", "running_var"))]
    n_float = sum(t.numel() for t in floats)
    # per scale a float32 and a 1-byte zero point; an activation's clip bounds (2 x float32)
    extra = sum(5 * q.scale.numel() + 8 for m in layers for _, q in quantizers(m))
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
