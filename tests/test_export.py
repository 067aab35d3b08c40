"""Low-bit ONNX export: integer initializers, onnxruntime vs PyTorch, size vs the float export.

Stated tolerance, from the integer grid. The integer graph makes the rounding decisions LSQ
makes (same float32 division, round half to even, saturation); its convolutions sum in another
order, so an activation within float32 noise of a rounding tie (``x / s = k + 1/2``) can land
one grid step apart. Hence, on the export report's own 32 random inputs:

(1) every onnxruntime activation code is exactly LSQ's ``clamp(round(x / s), l, u)`` of
    onnxruntime's own input ``x``, and equals PyTorch's, except where an example first diverges,
    at a tie (``|x/s - (k + 1/2)| < 1e-4``; later layers of that example may then differ);
(2) with every rounding decision shared (PyTorch fed onnxruntime's dequantized codes at every
    activation quantizer), the logits differ by float32 rounding only:
    ``|error| <= 4608 * 2^-24 * max|logit|`` (about 2.7e-4), the worst case ``n * eps`` of the
    longest dot product (3 x 3 x 512 terms, layer4); same argmax on every input;
(3) examples whose codes all agree meet the same bound without the replay, and the report's
    numbers are these; (4) the float export (no quantization) within 1e-4 relative of PyTorch
    with the quantizers turned off. Measured: ~3e-7 relative, no tie flip on these inputs.
"""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from support.helpers import gaqat, tiny_hparams
from support.inspect_fixtures import gaqat_w4, lsq_w3

from domainbed_gaqat import export
from domainbed_gaqat.plugin import model_files, registry
from domainbed_gaqat.quant.modules import QuantConv2d, quantizers


@pytest.fixture(scope="module", params=["gaqat_w4", "lsq_w3"])
def exported(request, tmp_path_factory) -> dict:
    run = gaqat_w4 if request.param == "gaqat_w4" else lsq_w3
    pkl = os.path.join(run(tmp_path_factory), "model.pkl")
    out = tmp_path_factory.mktemp(f"export_{request.param}")
    assert gaqat("export", pkl, "--n_random", "32", "--output_dir", str(out)) == 0
    report = json.loads((out / "export.json").read_text())
    algorithm, _ = model_files.load_algorithm(pkl)
    return {"report": report, "dir": str(out), "algorithm": algorithm,
            "bits": 4 if request.param == "gaqat_w4" else 3}


FLOAT32_BOUND = 3 * 3 * 512 * 2.0**-24  # n * eps of the longest dot product (layer4's 3x3)


def _tie_distance(ratio: np.ndarray) -> np.ndarray:
    return np.abs(ratio - np.floor(ratio) - 0.5)


@pytest.fixture(scope="module")
def ort_run(exported) -> dict:
    """onnxruntime on the report's random inputs (``gaqat export``'s seed 0), with every
    activation quantizer's float input and dequantized output exposed; PyTorch on the same
    inputs: its quantizers' inputs, its logits, and its logits when each activation quantizer
    returns onnxruntime's dequantized codes instead ("replay")."""
    algorithm = exported["algorithm"]
    model = onnx.load(os.path.join(exported["dir"], "model_int.onnx"))
    producer = {n.output[0]: n for n in model.graph.node}
    taps = {}  # layer -> (float input of the quantizer, dequantized output)
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0].endswith(".a_dq"):
            quant = producer[node.input[0]]
            x = quant.input[0]
            if x in producer and producer[x].op_type == "Min":  # the clip: Max -> Min
                x = producer[producer[x].input[0]].input[0]
            taps[node.output[0].removesuffix(".a_dq")] = (x, node.output[0])
    extra = {n for pair in taps.values() for n in pair} - {"input"}
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                              for n in sorted(extra))
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    n = exported["report"]["random_check"]["n_inputs"]
    x = torch.randn((n, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {"input": x.numpy()})))
    outputs["input"] = x.numpy()
    activations = [(name, q) for name, q in quantizers(algorithm) if not q.is_weight]
    layer = {name: name.removeprefix("featurizer.network.").removesuffix(".a_quant")
             for name, _ in activations}
    inputs, hooks = {}, []
    for name, q in activations:
        hooks.append(q.register_forward_pre_hook(
            lambda m, a, name=name: inputs.__setitem__(name, a[0].detach().clone())))
    algorithm.eval()
    with torch.no_grad():
        logits = algorithm.predict(x).numpy()
    for h in hooks:
        h.remove()
    hooks = [q.register_forward_hook(lambda m, a, o, name=name: torch.from_numpy(
        outputs[taps[layer[name]][1]]).clone()) for name, q in activations]
    with torch.no_grad():
        replay = algorithm.predict(x).numpy()
    for h in hooks:
        h.remove()
    return {"outputs": outputs, "ort_logits": outputs[names[0]], "logits": logits,
            "replay": replay, "inputs": inputs, "taps": taps, "layer": layer,
            "activations": activations, "n": n}


def check_codes(ort_run: dict) -> np.ndarray:
    """(1) at every activation quantizer; returns, per example, whether any activation code
    differs between onnxruntime and PyTorch."""
    outputs, diverged = ort_run["outputs"], np.zeros(ort_run["n"], dtype=bool)
    for name, q in ort_run["activations"]:
        x_name, dq_name = ort_run["taps"][ort_run["layer"][name]]
        s = np.float32(q.scale.item())
        got = np.round(outputs[dq_name] / s)
        assert got.min() >= q.lower and got.max() <= q.upper, name
        ratio_ort = outputs[x_name] / s
        off = got != np.clip(np.round(ratio_ort), q.lower, q.upper)
        assert (_tie_distance(ratio_ort[off]) < 1e-5).all(), name  # LSQ of its own input
        ratio = (ort_run["inputs"][name] / q.scale).detach().numpy()
        codes = np.clip(np.round(ratio), q.lower, q.upper)
        fresh = (got != codes) & ~diverged.reshape(-1, *[1] * (got.ndim - 1))
        assert (_tie_distance(ratio[fresh]) < 1e-4).all(), name  # PyTorch's, but at ties
        diverged |= (got != codes).reshape(len(got), -1).any(1)
    return diverged


def test_activation_integers_are_lsq_codes(ort_run) -> None:
    """(1): onnxruntime's codes are LSQ's of its own inputs, and PyTorch's but at ties."""
    assert check_codes(ort_run).shape == (32,)


def test_logits_differ_by_float32_rounding_only(exported, ort_run) -> None:
    """(2) and (3): the replay within the float32 bound everywhere, the plain comparison on
    every example whose codes agree; the report's numbers are this comparison."""
    diverged = check_codes(ort_run)
    got, want, replay = ort_run["ort_logits"], ort_run["logits"], ort_run["replay"]
    scale = np.abs(want).max()
    assert np.abs(got - replay).max() <= FLOAT32_BOUND * scale
    assert (got.argmax(1) == replay.argmax(1)).all()
    agree = ~diverged
    assert np.abs(got - want)[agree].max(initial=0) <= FLOAT32_BOUND * scale
    assert (got.argmax(1) == want.argmax(1))[agree].all()
    r = exported["report"]
    assert (r["w_bits"], r["a_bits"]) == (exported["bits"],) * 2
    check = r["random_check"]
    assert check["n_inputs"] == len(got)
    assert check["max_abs_logit_error"] == pytest.approx(float(np.abs(got - want).max()),
                                                         rel=1e-6, abs=1e-9)
    assert check["max_abs_logit"] == pytest.approx(float(scale), rel=1e-6)
    assert check["argmax_agreement"] == float((got.argmax(1) == want.argmax(1)).mean())
    float_check = r["float_random_check"]
    assert float_check["argmax_agreement"] == 1.0
    assert float_check["max_abs_logit_error"] <= 1e-4 * float_check["max_abs_logit"]


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
    alg = registry.algorithm_class("ERM_FP")((3, 32, 32), 10, 5, tiny_hparams("ERM_FP"))
    with pytest.raises(ValueError, match="no quantizers"):
        export.build_model(alg, quantize=True)
    with pytest.raises(ValueError, match="expected a quantized model"):
        model_files.require_quantized({"args": {"algorithm": "ERM_FP"}}, "x/model.pkl")


def _built(name: str, x: torch.Tensor):
    torch.manual_seed(0)
    overrides = {"quant_start": 0} if name.endswith("QTDoG") else {}
    algorithm = registry.algorithm_class(name)((3, 32, 32), 10, 3,
                                              tiny_hparams(name, **overrides))
    algorithm.eval()
    with torch.no_grad():
        algorithm.predict(x)  # calibrates the scales
    return algorithm


def _ort(path: str, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("name", ["CORAL_LSQ", "SagNet_QTDoG"])
def test_domainbeds_algorithms_on_the_shared_featurizer_export(name, tmp_path) -> None:
    """The graph is ``predict`` traced: DomainBed's CORAL (its ``network`` Sequential) exports
    the very graph of the plugin's LSQ of the same weights; SagNet (``network_c(network_f(x))``,
    7-bit per-channel weights in INT8, float activations) agrees with PyTorch to float32
    rounding (no activation is rounded)."""
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    algorithm = _built(name, x)
    paths = {}
    for quantize in (True, False):
        paths[quantize] = str(tmp_path / f"{quantize}.onnx")
        onnx.save(export.build_model(algorithm, quantize), paths[quantize])
    model = onnx.load(paths[True])
    convs = [n.output[0].removesuffix(".out") for n in model.graph.node if n.op_type == "Conv"]
    featurizer, prefix = ((algorithm.featurizer, "") if name.startswith("CORAL")
                          else (algorithm.network_f, "network_f.network."))
    assert convs == [prefix + n for n, m in featurizer.network.named_modules()
                     if isinstance(m, QuantConv2d)]  # the shared ResNet's by its own names
    int_weights = {t.data_type for t in model.graph.initializer if t.name.endswith(".w_int")}
    if name.startswith("CORAL"):
        assert int_weights == {TensorProto.INT4}
        onnx.save(export.build_model(_built("LSQ", x)), str(tmp_path / "lsq.onnx"))
        np.testing.assert_array_equal(_ort(paths[True], x), _ort(str(tmp_path / "lsq.onnx"), x))
    else:
        assert int_weights == {TensorProto.INT8}
        check = export.compare(paths[True], algorithm, x)
        assert check["max_abs_logit_error"] <= 1e-4 * check["max_abs_logit"]
        assert check["argmax_agreement"] == 1.0
    float_check = export.compare(paths[False], algorithm, x, quantized=False)
    assert float_check["max_abs_logit_error"] <= 1e-4 * float_check["max_abs_logit"]
    assert float_check["argmax_agreement"] == 1.0


@pytest.mark.parametrize("name,why", [("MTL_LSQ", "MTL_LSQ.predict cannot be traced.*'len'"),
                                      ("ARM_LSQ", "ARM_LSQ.predict cannot be traced")])
def test_a_predict_that_is_not_a_plain_graph_is_refused(name, why) -> None:
    algorithm = registry.algorithm_class(name)((3, 32, 32), 10, 3, tiny_hparams(name))
    with pytest.raises(ValueError, match=why):
        export.build_model(algorithm)
