"""The one-organ self-supervision probe (bench/organ_ssl_probe.py): exact crops, shapes, a tiny run."""

from __future__ import annotations

import sys

import pytest
import torch

from bench import organ_ssl_probe as probe


def test_crops_are_exact_windows_of_their_own_image() -> None:
    x = torch.arange(3 * 24 * 24, dtype=torch.float32).view(3, 1, 24, 24)
    out = probe.crops(x, 16, torch.Generator().manual_seed(0))
    assert out.shape == (3, 1, 16, 16)
    for a in range(3):
        # Every value of the crop is a pixel of image a (no resampling), and a 16 x 16 block of it.
        values = out[a].flatten()
        assert torch.isin(values, x[a].flatten()).all()
        rows = {int(v) // 24 % 24 for v in values.tolist()}
        cols = {int(v) % 24 for v in values.tolist()}
        assert len(rows) == len(cols) == 16 and max(rows) - min(rows) == max(cols) - min(cols) == 15


@pytest.mark.parametrize("grid", [24, 32, 16])
def test_stem_encoder_pools_any_grid_to_one_vector(grid: int) -> None:
    assert probe.StemEncoder()(torch.randn(5, 1, grid, grid)).shape == (5, 64)


def test_rendered_images_are_standardised_with_their_factors() -> None:
    images, factors = probe.render("kidney", 6, seed=3)
    assert images.shape == (6, 1, 24, 24)
    assert torch.allclose(images.mean(dim=(1, 2, 3)), torch.zeros(6), atol=1e-4)
    assert all(len(factors[f]) == 6 for f in probe.READ["kidney"])


def test_a_tiny_run_prints_both_readings(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["organ_ssl_probe", "--organ", "spleen", "--steps", "2", "--batch", "8",
                                      "--train", "16", "--eval", "30"])
    probe.main()
    out = capsys.readouterr().out
    assert "random init (stem)  R^2 {'splenic':" in out and "SimCLR 2 steps  R^2 {'splenic':" in out



def test_crop_whole_pairs_each_crop_with_its_own_whole_image() -> None:
    # Image k has mean k; an "encoder" mapping the mean to an angle tells the six images apart, so
    # with the right pairs the loss is near 0 (about 0.3), with any wrong pair above log 6.
    x = 0.1 * torch.randn(6, 1, 24, 24, generator=torch.Generator().manual_seed(0)) + torch.arange(6.0).view(6, 1, 1, 1)

    class MeanAngle(torch.nn.Module):
        def forward(self, im: torch.Tensor) -> torch.Tensor:
            m = im.mean(dim=(1, 2, 3))
            return torch.stack([torch.cos(m), torch.sin(m)], dim=1)

    for pair in ("crop-whole", "crops"):
        loss = probe.info_nce(MeanAngle(), torch.nn.Identity(), x, 16, pair, torch.Generator().manual_seed(1))
        assert 0.0 < float(loss) < 0.6, pair
