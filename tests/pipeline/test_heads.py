import pytest
import torch

from pipeline.heads import ConvLinearHead, Decoder, ETFHead, TokenLinearHead, build_head, simplex_etf


@pytest.mark.parametrize("dim,classes", [(9, 10), (64, 10), (128, 100)])
def test_etf_has_the_eq7_inner_products(dim, classes):
    frame = simplex_etf(dim, classes, seed=3).double()
    gram = frame.T @ frame
    expected = torch.full((classes, classes), -1.0 / (classes - 1), dtype=torch.float64)
    expected.fill_diagonal_(1.0)
    assert torch.allclose(gram, expected, atol=1e-5)


def test_etf_is_deterministic_per_seed_and_fixed():
    assert torch.equal(simplex_etf(16, 10, seed=1), simplex_etf(16, 10, seed=1))
    assert not torch.equal(simplex_etf(16, 10, seed=1), simplex_etf(16, 10, seed=2))
    head = ETFHead(16, 10)
    assert list(head.parameters()) == []
    assert head(torch.randn(4, 16, 3, 3)).shape == (4, 10)


def test_etf_needs_enough_feature_dimensions():
    with pytest.raises(ValueError, match="needs feature dim >= 9"):
        simplex_etf(8, 10)


def test_conv_linear_head_and_builder():
    head = ConvLinearHead(16, 10)
    assert head(torch.randn(2, 16, 8, 8)).shape == (2, 10)
    assert isinstance(build_head("etf", 16, 10), ETFHead)
    assert build_head("conv_linear", 16, 10, width=32).conv[0].out_channels == 32
    with pytest.raises(ValueError, match="unknown head"):
        build_head("mlp", 16, 10)


def test_token_linear_head_reads_vit_tokens_and_swin_maps():
    head = TokenLinearHead(16, 10)
    assert head(torch.randn(4, 5, 16)).shape == (4, 10)  # ViT: N, L, D
    assert head(torch.randn(4, 3, 3, 16)).shape == (4, 10)  # Swin: N, H, W, C
    assert isinstance(build_head("token_linear", 16, 10, layout="nhwc"), TokenLinearHead)


@pytest.mark.parametrize("kind,layout,fix", [("conv_linear", "tokens", "token_linear"), ("etf", "nhwc", "token_linear"),
                                             ("token_linear", "nchw", "conv_linear or etf")])
def test_a_head_for_another_feature_layout_is_refused(kind, layout, fix):
    with pytest.raises(ValueError, match=f"this model's are {layout}; use head {fix}$"):
        build_head(kind, 16, 10, layout=layout)


@pytest.mark.parametrize("upsampling", ["bilinear", "nearest"])
def test_infopro_decoder_gives_image_sized_logits_from_smaller_features(upsampling):
    decoder = Decoder(8, 3, width=5, upsampling=upsampling)
    assert decoder(torch.randn(2, 8, 4, 4), (16, 16)).shape == (2, 3, 16, 16)
