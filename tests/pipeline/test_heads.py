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


@pytest.mark.parametrize("layout,shape", [("nchw", (4, 6, 3, 3)), ("flat", (4, 6)), ("tokens", (4, 5, 6)),
                                          ("nhwc", (4, 3, 3, 6))])
def test_projector_pools_each_layout_and_projects_to_its_width(layout, shape):
    x = torch.randn(*shape)
    head = build_head("projector", 6, 10, width=12, layout=layout)
    assert head(x).shape == (4, 12)
    pooled = head.pool(x)
    assert pooled.shape == (4, 6)
    positions = {"nchw": (2, 3), "tokens": (1,), "nhwc": (1, 2)}  # flat features have none
    assert torch.allclose(pooled, x.mean(dim=positions[layout]) if layout in positions else x)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and all(m.bias is None for m in linears)  # the paper's three bias-free layers
