"""Loss surfaces (paper Figure 6): filter-normalised directions over the latent weights, the
centre point is the model's loss, two checkpoints side by side."""

import os

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from support.helpers import gaqat, tiny_hparams
from support.inspect_fixtures import assert_png, gaqat_w4, lsq_w3

from domainbed_gaqat import surface
from domainbed_gaqat.plugin import model_files, registry
from domainbed_gaqat.plugin.data import Data
from domainbed_gaqat.quant.modules import quantizers


def test_directions_are_filter_normalised() -> None:
    alg = registry.algorithm_class("GAQAT")((3, 32, 32), 10, 5, tiny_hparams("GAQAT"))
    named = surface.latent_weights(alg)
    scale_ids = {id(q.scale) for _, q in quantizers(alg)}
    assert scale_ids and not scale_ids & {id(p) for _, p in named}
    assert [id(p) for _, p in named] == [id(p) for p in alg.weights]  # the algorithm's own list
    params = [p for _, p in named]
    d = surface.filter_normalized_direction(params, torch.Generator().manual_seed(3))
    again = surface.filter_normalized_direction(params, torch.Generator().manual_seed(3))
    other = surface.filter_normalized_direction(params, torch.Generator().manual_seed(4), "weight")
    n_filtered = 0
    for (name, p), di, dj, dk in zip(named, d, again, other):
        assert di.shape == p.shape and torch.equal(di, dj), name
        if p.dim() > 1:  # one norm per conv filter / classifier output unit
            n_filtered += 1
            w_norms = p.detach().flatten(1).norm(dim=1)
            torch.testing.assert_close(di.flatten(1).norm(dim=1), w_norms, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(dk.flatten(1).norm(dim=1), w_norms, rtol=1e-5, atol=1e-7)
            assert not torch.allclose(di, dk)
        else:  # BatchNorm affine and biases: zero (ignore='biasbn'), or the weight itself
            assert torch.equal(di, torch.zeros_like(p)) and torch.equal(dk, p.detach()), name
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in alg.modules())
    assert n_filtered == convs + 1  # every conv and the classifier
    with pytest.raises(ValueError, match="bn_bias 'nope'"):
        surface.filter_normalized_direction(params, torch.Generator(), "nope")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[str]:
    return [os.path.join(gaqat_w4(tmp_path_factory), "model.pkl"),
            os.path.join(lsq_w3(tmp_path_factory), "model.pkl")]


def test_two_checkpoints_centre_is_the_model_loss(models, tmp_path) -> None:
    n = 24
    assert gaqat("surface", *models, "--labels", "GAQAT W4", "LSQ W3", "--max_samples", str(n),
                 "--points", "3", "--points_2d", "3", "--extent", "0.5", "--quiet",
                 "--output_dir", str(tmp_path)) == 0
    for name in ("surface_1d.png", "surface_2d.png"):
        assert_png(str(tmp_path / name))
    grid = np.load(tmp_path / "surface.npz")
    np.testing.assert_array_equal(grid["alphas_1d"], [-0.5, 0.0, 0.5])
    rows_1d = pd.read_csv(tmp_path / "surface_1d.csv")
    rows_2d = pd.read_csv(tmp_path / "surface_2d.csv")
    assert len(rows_1d) == 2 * 3 and len(rows_2d) == 2 * 9
    assert list(grid["labels"]) == ["GAQAT W4", "LSQ W3"]
    # the first checkpoint's data: env 5 (its test env), DomainBed's 'in' split
    data = Data.from_checkpoint(model_files.load_checkpoint(models[0]))
    split = data.split(5, "in")
    x = torch.stack([split[i][0] for i in range(n)])
    y = torch.tensor([split[i][1] for i in range(n)])
    for m, path in enumerate(models):
        algorithm, _ = model_files.load_algorithm(path)
        with torch.no_grad():
            want = F.cross_entropy(algorithm.predict(x), y).item()
        assert grid[f"loss_1d_{m}"][1] == pytest.approx(want, rel=1e-5)
        assert grid[f"loss_2d_{m}"][1, 1] == pytest.approx(want, rel=1e-5)
        assert not np.allclose(grid[f"loss_2d_{m}"], want)  # the surface is not flat
        assert rows_1d[rows_1d["model"] == ["GAQAT W4", "LSQ W3"][m]]["loss"].iloc[1] == \
            pytest.approx(want, rel=1e-5)


def test_surface_restores_the_model(models) -> None:
    algorithm, ckpt = model_files.load_algorithm(models[1])
    before = {k: v.clone() for k, v in algorithm.state_dict().items()}
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    loss, acc = surface.surface(algorithm, [(x, y)], surface.coordinates(1.0, 3), None,
                                progress=False)
    assert loss.shape == acc.shape == (3,) and np.isfinite(loss).all()
    after = algorithm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="points >= 2"):
        surface.coordinates(1.0, 1)
