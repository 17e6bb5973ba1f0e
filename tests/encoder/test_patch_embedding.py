"""`PatchLinear`: a patch convolution as unfold + GEMM gives the convolution's output, shape and layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from encoder_service.engines.patch_embedding import PatchLinear, is_patch_convolution


@pytest.mark.parametrize(
    ("patch", "bias", "height", "width"),
    [
        (14, False, 28, 42),  # CLIP: no bias, a non-square image
        (14, True, 384, 384),  # SigLIP 384/14: the conv drops a 6-pixel strip at the bottom and right
        (16, True, 32, 48),  # padding="valid", as SigLIP declares it (below)
        ((4, 2), True, 9, 7),  # rectangular patches, remainders on both axes
    ],
)
@torch.no_grad()
def test_matches_the_convolution(patch, bias, height, width):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, patch, patch, bias=bias, padding="valid" if patch == 16 else 0)
    pixels = torch.randn(2, 3, height, width)
    expected = conv(pixels)
    got = PatchLinear(conv)(pixels)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # HF flattens and transposes the conv output; the same view must give the same rows
    torch.testing.assert_close(got.flatten(2).transpose(1, 2), expected.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_shares_the_convolution_weights():
    conv = nn.Conv2d(3, 8, 4, 4)
    linear = PatchLinear(conv)
    assert linear.weight.data_ptr() == conv.weight.data_ptr()
    assert linear.weight.shape == (8, 3 * 4 * 4) and not linear.weight.requires_grad


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 8, 4, 2),  # overlapping windows
        nn.Conv2d(3, 8, 4, 4, padding=1),
        nn.Conv2d(4, 8, 4, 4, groups=2),
        nn.Conv2d(3, 8, 4, 4, dilation=2),
        nn.Linear(3, 8),
    ],
)
def test_rejects_what_is_not_a_patch_convolution(conv):
    assert not is_patch_convolution(conv)
    with pytest.raises(ValueError, match="not a patch convolution"):
        PatchLinear(conv)
