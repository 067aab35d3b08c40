"""Low-bit ONNX export: integer initializers, onnxruntime vs PyTorch, size vs the float export.

Stated tolerance. The integer graph computes what LSQ computes (same float32 division, round
half to even, saturation), but convolutions sum in a different order in onnxruntime, so an
activation lying within float32 noise of a rounding tie can land one level apart. The tests
therefore require: (1) every activation integer code equal to PyTorch's except at ties
(|x/s - (k + 1/2)| < 1e-4, at most 0.1% of codes), (2) argmax agreement >= 95% and
max |logit error| <= 5% of max |logit| on random inputs, (3) the float export (same graph
builder, no quantization) within 1e-4 relative of PyTorch with the quantizers turned off.
"""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_hparams
from inspect_fixtures import gaqat_w4, lsq_w3
from onnx import TensorProto, helper, numpy_helper

from domainbed_gaqat import export, runtools
from domainbed_gaqat.networks import QuantConv2d, quantizers


@pytest.fixture(scope="module", params=["gaqat_w4", "lsq_w3"])
def exported(request, tmp_path_factory) -> dict:
    run = gaqat_w4 if request.param == "gaqat_w4" else lsq_w3
    pkl = os.path.join(run(tmp_path_factory), "model.pkl")
    out = tmp_path_factory.mktemp(f"export_{request.param}")
    report = export.main([pkl, "--n_random", "32", "--output_dir", str(out)])
    algorithm, _ = runtools.load_algorithm(pkl)
    return {"report": report, "dir": str(out), "algorithm": algorithm,
            "bits": 4 if request.param == "gaqat_w4" else 3}


def test_onnxruntime_matches_pytorch(exported) -> None:
    r = exported["report"]
    assert (r["w_bits"], r["a_bits"]) == (exported["bits"],) * 2
    check = r["random_check"]
    assert check["n_inputs"] == 32 and check["argmax_agreement"] >= 0.95
    assert check["max_abs_logit_error"] <= 0.05 * check["max_abs_logit"]
    float_check = r["float_random_check"]
    assert float_check["argmax_agreement"] == 1.0
    assert float_check["max_abs_logit_error"] <= 1e-4 * float_check["max_abs_logit"]


def test_activation_integers_equal_pytorch_except_at_ties(exported) -> None:
    """The integer codes onnxruntime computes at every activation quantizer."""
    algorithm = exported["algorithm"]
    model = onnx.load(os.path.join(exported["dir"], "model_int.onnx"))
    dq = [n.output[0] for n in model.graph.node
          if n.op_type == "DequantizeLinear" and n.output[0].endswith(".a_dq")]
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                              for n in dq)
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    outputs = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, {"input": x.numpy()})))
    inputs, hooks = {}, []
    for name, q in quantizers(algorithm):
        if not q.is_weight:
            hooks.append(q.register_forward_pre_hook(
                lambda m, a, name=name: inputs.__setitem__(name, a[0].detach().clone())))
    with torch.no_grad():
        algorithm.predict(x)
    for h in hooks:
        h.remove()
    total = mismatched = 0
    for name, q in quantizers(algorithm):
        if q.is_weight:
            continue
        layer = name.removeprefix("featurizer.network.").removesuffix(".a_quant")
        s = np.float32(q.scale.item())
        ratio = (inputs[name] / q.scale).detach().numpy()
        want = np.clip(np.round(ratio), q.lower, q.upper)
        got = np.round(outputs[f"{layer}.a_dq"] / s)
        assert got.min() >= q.lower and got.max() <= q.upper, layer
        off = got != want
        assert (np.abs(got - want)[off] == 1).all(), layer
        assert (np.abs(ratio[off] - np.floor(ratio[off]) - 0.5) < 1e-4).all(), layer
        total, mismatched = total + off.size, mismatched + off.sum()
    assert mismatched <= 1e-3 * total


def test_quantized_convs_store_int4_weights(exported) -> None:
    algorithm, bits = exported["algorithm"], exported["bits"]
    model = onnx.load(os.path.join(exported["dir"], "model_int.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    producer = {n.output[0]: n for n in model.graph.node}
    net = algorithm.featurizer.network
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == sum(isinstance(m, QuantConv2d) for m in net.modules())
    n_int4 = 0
    for node in convs:
        module = net.get_submodule(node.output[0].removesuffix(".out"))
        weight = node.input[1]
        if module.w_quant is None:  # the stem: float weights, signed INT4 input
            assert module is net.conv1 and inits[weight].data_type == TensorProto.FLOAT
            zero_type = TensorProto.INT4
        else:
            dq = producer[weight]
            assert dq.op_type == "DequantizeLinear"
            codes = inits[dq.input[0]]
            assert codes.data_type == TensorProto.INT4
            values = numpy_helper.to_array(codes).astype(np.int32)
            assert values.min() >= lo and values.max() <= hi
            w = module.weight.detach().numpy()
            s = np.float32(module.w_quant.scale.item())
            np.testing.assert_array_equal(values, np.clip(np.round(w / s), lo, hi))
            assert numpy_helper.to_array(inits[dq.input[1]]) == s
            n_int4 += 1
            zero_type = TensorProto.UINT4
        # its input: [clip: Max -> Min ->] QuantizeLinear -> DequantizeLinear, learned scale
        a_dq = producer[node.input[0]]
        quant = producer[a_dq.input[0]]
        assert (a_dq.op_type, quant.op_type) == ("DequantizeLinear", "QuantizeLinear")
        assert inits[quant.input[2]].data_type == zero_type
        s_a = np.float32(module.a_quant.scale.item())
        assert numpy_helper.to_array(inits[quant.input[1]]) == s_a
        clip_hi = producer.get(quant.input[0])
        if bits < 4:
            clip_lo = producer[clip_hi.input[0]]
            assert (clip_lo.op_type, clip_hi.op_type) == ("Max", "Min")
            bounds = [numpy_helper.to_array(inits[n.input[1]]) for n in (clip_lo, clip_hi)]
            assert bounds == [module.a_quant.lower * s_a, module.a_quant.upper * s_a]
            assert (module.a_quant.lower, module.a_quant.upper) == (
                (-4, 3) if module is net.conv1 else (0, 7))
        else:
            assert clip_hi is None or clip_hi.op_type not in ("Min", "Max", "Clip")
    assert n_int4 == len(convs) - 1
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert all(inits[i].data_type == TensorProto.FLOAT for i in gemm.input[1:])
    assert model.opset_import[0].version == 21


def test_size_ratio_matches_the_parameter_count(exported) -> None:
    """Float export: 4 bytes a value. Integer export: quantized conv weights at 4 bits
    (half a byte), the rest (stem conv, BatchNorm, classifier) float. ResNet-18: ~7.8x."""
    algorithm, r = exported["algorithm"], exported["report"]
    net = algorithm.featurizer.network
    quantized = [m.weight for m in net.modules() if isinstance(m, QuantConv2d)
                 and m.w_quant is not None]
    n_q = sum(w.numel() for w in quantized)
    n_all = (sum(p.numel() for p in algorithm.parameters())
             + sum(b.numel() for n, b in net.named_buffers() if n.endswith("running_var")) * 2
             - sum(q.scale.numel() for _, q in quantizers(algorithm)))
    n_f = n_all - n_q
    expected = 4 * n_all / (n_q / 2 + 4 * n_f)
    assert 7.5 < expected < 8
    assert r["ratio"] == pytest.approx(expected, rel=0.01)
    assert r["int_bytes"] < r["float_bytes"]
    assert os.path.getsize(os.path.join(exported["dir"], "model_int.onnx")) == r["int_bytes"]
    assert n_q / 2 + 4 * n_f <= r["int_bytes"] <= 1.01 * (n_q / 2 + 4 * n_f)


def test_unquantized_model_is_a_clear_error() -> None:
    alg = runtools.algorithm_class("ERM_FP")((3, 32, 32), 10, 5, tiny_hparams("ERM_FP"))
    with pytest.raises(ValueError, match="no quantizers"):
        export.build_model(alg, quantize=True)
    with pytest.raises(ValueError, match="expected a quantized model"):
        runtools.require_quantized({"args": {"algorithm": "ERM_FP"}}, "x/model.pkl")
