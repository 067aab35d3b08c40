"""Scale perturbation probe (paper Table 1) on a model.pkl written by DomainBed's train.py."""

import os

import numpy as np
import pandas as pd
import pytest
import torch
from support.helpers import gaqat
from support.inspect_fixtures import gaqat_w4, last_results

from domainbed_gaqat import probe
from domainbed_gaqat.plugin import model_files


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    return gaqat_w4(tmp_path_factory)


def test_factor_one_reproduces_train_py_accuracies(run_dir, tmp_path, capsys) -> None:
    pkl = os.path.join(run_dir, "model.pkl")
    assert gaqat("probe", pkl, "--layers", "layer3.0.conv1", "--kind", "w", "--factors", "1.0",
                 "--output_dir", str(tmp_path), "--quiet") == 0
    df = pd.read_parquet(tmp_path / "probe.parquet")  # exact floats
    assert len(pd.read_csv(tmp_path / "probe.csv")) == len(df)
    assert list(df["scale"]) == ["origin", "layer3.0.conv1 w"]
    origin, one = df.iloc[0], df.iloc[1]
    assert one["factor"] == 1.0
    acc_columns = [c for c in df.columns if c.endswith("_acc")]
    assert {"id_acc", "ood_acc", "env5_in_acc", "env0_out_acc"} <= set(acc_columns)
    for column in acc_columns:
        assert one[column] == origin[column], column
    # the unperturbed accuracies are exactly those train.py logged for the saved model
    logged = last_results(run_dir)
    for i in range(5):
        assert origin[f"env{i}_out_acc"] == logged[f"env{i}_out_acc"]
    assert origin["ood_acc"] == logged["env5_in_acc"]
    assert origin["id_acc"] == pytest.approx(np.mean([logged[f"env{i}_out_acc"]
                                                      for i in range(5)]), abs=1e-12)
    table = (tmp_path / "probe.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| layer3.0.conv1 w |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == cells[2] == f"{100 * origin['id_acc']:.2f} / {100 * origin['ood_acc']:.2f}"
    assert "| scale | origin | 100% |" in table
    capsys.readouterr()
    assert gaqat("probe", pkl, "--output_dir", str(tmp_path), "--quiet") == 2
    assert "--overwrite" in capsys.readouterr().err.splitlines()[-1]


def test_perturbed_weight_scale_requantizes_the_weights(run_dir) -> None:
    algorithm, _ = model_files.load_algorithm(os.path.join(run_dir, "model.pkl"))
    [(name, q)] = probe.select_quantizers(algorithm, ["layer3.0.conv1"], "w")
    assert name.endswith("layer3.0.conv1.w_quant")
    conv = algorithm.featurizer.network.layer3[0].conv1
    w = conv.weight.detach().numpy()
    s = np.float32(q.scale.item())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, logits_before = q(conv.weight).clone(), algorithm.predict(x)

    def reference(scale: np.float32) -> tuple[np.ndarray, np.ndarray]:
        codes = np.clip(np.round(w / scale), -8, 7)  # numpy rounds half to even, as torch
        return codes, codes.astype(np.float32) * scale

    codes_before, _ = reference(s)
    with probe.perturbed([q], 0.8):
        s_new = np.float32(q.scale.item())
        assert s_new == s * np.float32(0.8)
        codes, want = reference(s_new)
        with torch.no_grad():
            np.testing.assert_array_equal(q(conv.weight).numpy(), want)
            np.testing.assert_array_equal(q.integers(conv.weight).numpy(), codes)
            assert not torch.equal(algorithm.predict(x), logits_before)
        assert (codes != codes_before).mean() > 0.01  # the integers were recomputed
        assert np.abs(codes).max() <= 8
    assert np.float32(q.scale.item()) == s
    with torch.no_grad():
        assert torch.equal(q(conv.weight), before)
        assert torch.equal(algorithm.predict(x), logits_before)


def test_bad_selections_are_clear_errors(run_dir) -> None:
    algorithm, _ = model_files.load_algorithm(os.path.join(run_dir, "model.pkl"))
    with pytest.raises(ValueError, match=r"layers \['layer9'\].*match no quantizer"):
        probe.select_quantizers(algorithm, ["layer9"], "w")
    with pytest.raises(ValueError, match="kind 'x'"):
        probe.select_quantizers(algorithm, ["layer1.0.conv1"], "x")
    assert [n.rsplit(".", 2)[-2:] for n, _ in
            probe.select_quantizers(algorithm, ["layer1.0.conv1"], "both")] == [
        ["conv1", "a_quant"], ["conv1", "w_quant"]]
    with pytest.raises(ValueError, match="positive"):
        with probe.perturbed([], 0.0):
            pass


def test_a_model_of_another_dataset_is_refused(run_dir, tmp_path, capsys) -> None:
    """``--dataset Debug28`` (2 classes, 28 px) for a RotatedDigits model: one line, exit 2,
    nothing written (it used to write a table of zero accuracies)."""
    pkl = os.path.join(run_dir, "model.pkl")
    assert gaqat("probe", pkl, "--dataset", "Debug28", "--test_envs", "0", "--layers",
                 "layer3.0.conv1", "--output_dir", str(tmp_path / "out"), "--quiet") == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "trained on 'RotatedDigits' (10 classes" in line and "'Debug28' has 2 classes" in line
    assert not (tmp_path / "out").exists()
