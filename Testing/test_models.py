"""FewShotSegLib.models: registry, backbones, prototype pieces, the three models.

Small inputs keep the file well under a minute on 2 CPU cores: ResNets at 32x32,
EfficientNet-Lite0 at 64x64 (the 256x256 shape checks run the backbone alone, no grad).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from FewShotSegLib.errors import FewShotSegError
from FewShotSegLib.models import available_models, build_backbone, build_model
from FewShotSegLib.models.backbones import EfficientNetLite0, effnet_lite0_weights_path
from FewShotSegLib.models.prototypes import (alp_prototypes, class_score, global_prototype,
                                             local_prototypes, mask_to_features)

torch.set_num_threads(2)

MODELS = ["alpnet", "crtpnet", "dfdt"]
SIZES = {"effnet-lite0": 64, "resnet50": 32, "resnet101": 32}


def episode(size, shots=1, queries=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    sup = torch.randn(shots, 1, size, size, generator=g)
    qry = torch.randn(queries, 1, size, size, generator=g)
    mask = torch.zeros(shots, size, size)
    mask[:, size // 4: 3 * size // 4, size // 8: 5 * size // 8] = 1.0
    return sup, mask, qry


def make(name, backbone, **kw):
    torch.manual_seed(0)
    return build_model(name, backbone=backbone, pretrained=False, **kw)


# ----------------------------------------------------------------------------- registry
def test_registry_lists_the_three_models():
    assert set(MODELS) <= set(available_models())


def test_unknown_model_raises():
    with pytest.raises(FewShotSegError, match="unknown model 'nope'; available: alpnet"):
        build_model("nope")


@pytest.mark.parametrize("config, match", [
    ({"backbone": "vgg"}, "unknown backbone 'vgg'"),
    ({"output_stride": 16}, "output_stride"),
    ({"feature_dimension": 3}, "has no option feature_dimension"),
    ({"fg_threshold": 1.5}, "fg_threshold"),
    ({"local_window_test": 0}, "local_window_test"),
])
def test_bad_options_raise(config, match):
    with pytest.raises(FewShotSegError, match=match):
        build_model("alpnet", pretrained=False, **config)


def test_dfdt_head_count_must_divide_width():
    with pytest.raises(FewShotSegError, match="pdet_dim"):
        build_model("dfdt", pretrained=False, pdet_dim=30, pdet_heads=4)


# ----------------------------------------------------------------------------- every model x backbone
@pytest.mark.parametrize("backbone", list(SIZES))
@pytest.mark.parametrize("name", MODELS)
def test_model_contract(name, backbone):
    size = SIZES[backbone]
    model = make(name, backbone)
    assert model.name == name

    # training step: shape, finite gradients reaching every parameter (DDP needs no unused ones)
    model.train()
    sup, mask, qry = episode(size)
    logits = model(sup, mask, qry)
    assert logits.shape == (2, 2, size, size)
    target = torch.zeros(2, size, size, dtype=torch.long)
    target[:, size // 4: 3 * size // 4, size // 8: 5 * size // 8] = 1
    torch.nn.functional.cross_entropy(logits, target).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.backbone.parameters())

    # eval: bit-identical repeats; K-shot with 3 supports; encode/segment = forward
    model.eval()
    sup3, mask3, qry3 = episode(size, shots=3, queries=2, seed=1)
    with torch.no_grad():
        a, b = model(sup3, mask3, qry3), model(sup3, mask3, qry3)
        split = model.segment(model.encode(sup3), mask3, model.encode(qry3))
    assert a.shape == (2, 2, size, size) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    torch.testing.assert_close(a, split, rtol=1e-4, atol=1e-4)

    # config: JSON-able and enough to rebuild the same architecture
    config = json.loads(json.dumps(model.config))
    with torch.device("meta"):  # architecture only: skips initialising 44M ResNet weights
        rebuilt = build_model(name, **config)
    assert list(rebuilt.state_dict()) == list(model.state_dict())
    assert all(a.shape == b.shape for a, b in zip(rebuilt.state_dict().values(),
                                                  model.state_dict().values()))
    assert rebuilt.config == model.config


@pytest.mark.parametrize("name", MODELS)
def test_checkpoint_style_rebuild_gives_same_outputs(name, tmp_path):
    model = make(name, "effnet-lite0").eval()
    path = tmp_path / "m.pt"
    torch.save({"config": model.config, "state": model.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    clone = build_model(name, **{**saved["config"], "pretrained": False})
    clone.load_state_dict(saved["state"], strict=True)
    clone.eval()
    sup, mask, qry = episode(64)
    with torch.no_grad():
        assert torch.equal(model(sup, mask, qry), clone(sup, mask, qry))


def test_same_seed_same_model():
    sup, mask, qry = episode(64)
    outs = []
    for _ in range(2):
        model = make("dfdt", "effnet-lite0").eval()
        with torch.no_grad():
            outs.append(model(sup, mask, qry))
    assert torch.equal(*outs)


@pytest.mark.parametrize("name, extra", [("alpnet", {}), ("crtpnet", {"attn_max_side": 8}),
                                         ("dfdt", {"window_size": 4, "pdet_rounds": 1})])
def test_stride_4_odd_size_empty_mask_and_soft_prototypes(name, extra):
    model = make(name, "effnet-lite0", output_stride=4, soft_local=True, **extra).eval()
    sup, mask, qry = episode(72)  # 18x18 features: windows do not tile evenly
    with torch.no_grad():
        assert model.encode(sup).shape == (1, 256, 18, 18)
        assert model(sup, mask, qry).shape == (2, 2, 72, 72)
        empty = model(sup, torch.zeros_like(mask), qry)
    assert torch.isfinite(empty).all()


def test_features_at_32_and_64_for_256_slices():
    x = torch.randn(1, 1, 256, 256)
    with torch.no_grad():
        for stride, side in ((8, 32), (4, 64)):
            net = build_backbone("effnet-lite0", pretrained=False, output_stride=stride).eval()
            out = net(x)
            assert out.shape == (1, net.out_channels, side, side)
        for name in ("resnet50",):
            for stride in (8, 4):
                net = build_backbone(name, pretrained=False, output_stride=stride).eval()
                out = net(torch.randn(1, 1, 64, 64))
                assert out.shape == (1, net.out_channels, 64 // stride, 64 // stride)


def test_untrained_model_separates_an_obvious_structure():
    """A bright disc on noise: even random features find it (sanity of the prototype head)."""
    torch.manual_seed(0)
    model = make("alpnet", "effnet-lite0", feature_dim=0).eval()
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    disc = (((yy - 32) ** 2 + (xx - 30) ** 2) < 14 ** 2).float()
    img = (disc * 3 + 0.3 * torch.randn(2, 64, 64))[:, None]
    with torch.no_grad():
        pred = model(img[:1], disc[None], img[1:]).argmax(1)[0].bool()
    dice = 2 * (pred & disc.bool()).sum() / (pred.sum() + disc.sum())
    assert dice > 0.7


# ----------------------------------------------------------------------------- pretrained weights
def test_effnet_imagenet_weights_load_strictly_and_classify_a_cat():
    skimage_data = pytest.importorskip("skimage.data")
    state = torch.load(effnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    net = EfficientNetLite0()
    net.load_state_dict(state, strict=True)
    net.eval()
    img = torch.from_numpy(skimage_data.chelsea().astype(np.float32) / 255).permute(2, 0, 1)[None]
    img = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        top = net((img - mean[:, None, None]) / std[:, None, None]).argmax(1).item()
    assert 281 <= top <= 285  # ImageNet's cat classes: the port is numerically right


def test_pretrained_backbone_differs_from_random_and_keeps_lukemelas_names():
    state = torch.load(effnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    pre = build_model("alpnet", pretrained=True)
    rnd = make("alpnet", "effnet-lite0")
    for key, value in pre.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert pre.config["freeze_bn"] and not rnd.config["freeze_bn"]
    pre.train()
    assert not any(m.training for m in pre.backbone.modules()
                   if isinstance(m, torch.nn.BatchNorm2d))
    pre.eval(), rnd.eval()
    sup, mask, qry = episode(64)
    with torch.no_grad():
        assert not torch.allclose(pre.encode(qry), rnd.encode(qry))
        assert not torch.allclose(pre(sup, mask, qry), rnd(sup, mask, qry))


def test_resnet_weights_file_torchvision_and_deeplab_layouts(tmp_path):
    torch.manual_seed(1)
    source = build_backbone("resnet50", pretrained=False)
    state = dict(source.state_dict())
    tv = tmp_path / "resnet50_tv.pth"
    torch.save({**state, "fc.weight": torch.zeros(10, 2048), "fc.bias": torch.zeros(10)}, tv)
    deeplab = tmp_path / "deeplab.pth"
    torch.save({**{f"backbone.{k}": v for k, v in state.items()},
                "classifier.0.weight": torch.zeros(1)}, deeplab)
    for path in (tv, deeplab):
        model = build_model("alpnet", backbone="resnet50", backbone_weights=str(path))
        for key, value in model.backbone.state_dict().items():
            assert torch.equal(value, state[key]), key
        assert model.config["freeze_bn"]
    # rebuilt from a checkpoint (pretrained=False) the file is not read at all
    tv.unlink()
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with torch.device("meta"):
        build_model("alpnet", backbone="resnet50", backbone_weights=str(tv), pretrained=False)
        with pytest.raises(FewShotSegError, match="does not exist"):
            build_model("alpnet", backbone="resnet50", backbone_weights=str(tv))
        with pytest.raises(FewShotSegError, match="do not fit"):
            build_model("alpnet", backbone="resnet50", backbone_weights=str(bad))


# ----------------------------------------------------------------------------- prototype pieces
def test_prototype_pieces():
    feats = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :4, :4] = 1.0
    glob = global_prototype(feats, mask)
    torch.testing.assert_close(glob[0], feats[0, :, :4, :4].mean(dim=(1, 2)))
    protos, cover = local_prototypes(feats, mask, 2, 0.95)
    assert protos.shape == (4, 4) and torch.all(cover == 1)
    torch.testing.assert_close(protos[0], feats[0, :, :2, :2].mean(dim=(1, 2)))
    fg, bg = alp_prototypes(feats, mask, 2)
    assert len(fg) == 5 and len(bg) == 28  # 4 local + global; 32 windows - 4
    soft, w = local_prototypes(feats, mask * 0.5, 2, 0.95, soft=True)
    assert soft.shape == (4, 4) and torch.allclose(w, torch.full((4,), 0.5))
    border = mask.clone()
    border[0, :, 4, :4] = 0.5                                   # a half-covered row of windows
    fg_soft, bg_soft = alp_prototypes(feats, border, 2, soft=True)
    fg_only, bg_hard = alp_prototypes(feats, border, 2, soft=True, soft_background=False)
    assert torch.equal(fg_only.protos, fg_soft.protos) and len(bg_soft) > len(bg_hard)
    assert torch.equal(bg_hard.protos, alp_prototypes(feats, border, 2)[1].protos)
    d = torch.randn(3, 1, 5, 5)
    torch.testing.assert_close(class_score(d), d[:, 0])
    big = torch.ones(1, 64, 64)
    assert torch.equal(mask_to_features(big, (8, 8)), torch.ones(1, 1, 8, 8))


def test_query_prototypes_recover_pixels_the_support_alone_misses():
    """Query organ pixels share a query-only feature (another scan's contrast). Its rim
    looks more like the support's background than its foreground; the query's own
    confident core, added as a prototype, brings the rim back."""
    from FewShotSegLib.models.prototypes import PrototypeSet, score_map, with_query_prototypes
    e = torch.eye(4)
    fg = PrototypeSet(e[0:1], torch.zeros(1))                 # support foreground
    bg = PrototypeSet(e[1:2], torch.zeros(1))                 # support background
    query = e[1].repeat(8, 8, 1)                               # [h,w,C] background
    query[2:6, 2:6] = e[0] + 0.9 * e[2]                        # confident organ core
    query[2:6, 6] = 0.5 * e[0] + 0.9 * e[2] + 0.6 * e[1]       # the organ's rim
    query = query.permute(2, 0, 1)[None]
    first = score_map(query, fg, bg, 20.0)
    assert (first[0, 1, 2:6, 2:6] > first[0, 0, 2:6, 2:6]).all()      # core found
    assert (first[0, 1, 2:6, 6] < first[0, 0, 2:6, 6]).all()          # rim missed
    fg2, bg2 = with_query_prototypes(query, first, fg, bg)
    assert fg2.protos.shape == (1, 2, 4) and torch.isfinite(fg2.logw).all()
    second = score_map(query, fg2, bg2, 20.0)
    assert (second[0, 1, 2:6, 2:7] > second[0, 0, 2:6, 2:7]).all()    # core and rim
    assert (second[0, 1, :, 0] < second[0, 0, :, 0]).all()            # background stays


def test_query_prototypes_skip_a_class_without_confident_pixels():
    from FewShotSegLib.models.prototypes import PrototypeSet, with_query_prototypes
    query = torch.randn(2, 4, 8, 8)
    logits = torch.zeros(2, 2, 8, 8)                           # 50/50 everywhere: nothing confident
    fg = PrototypeSet(torch.randn(3, 4), torch.zeros(3))
    bg = PrototypeSet(torch.randn(2, 4), torch.zeros(2))
    fg2, bg2 = with_query_prototypes(query, logits, fg, bg)
    assert fg2.protos.shape == (2, 4, 4) and bg2.protos.shape == (2, 3, 4)
    assert torch.isinf(fg2.logw[:, -1]).all() and torch.isinf(bg2.logw[:, -1]).all()
    assert torch.isfinite(fg2.logw[:, :-1]).all()


def test_support_refinement_fits_the_prototypes_to_their_support_under_inference_mode():
    """Pooled prototypes that mix organ and surroundings misread their own support slice;
    20 Adam steps (run inside inference_mode, as the evaluation does) fit them to it; the
    option acts only at inference, for every model."""
    from FewShotSegLib.models.prototypes import PrototypeSet, refined_on_support, score_map
    torch.manual_seed(0)
    feats = torch.randn(1, 8, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1.0
    feats[:, 0] += 3.0 * mask[:, 0]                                    # the organ's own channel
    fg = PrototypeSet(feats.mean(dim=(0, 2, 3))[None], torch.zeros(1))  # organ + surroundings mixed
    bg = PrototypeSet(torch.randn(2, 8), torch.zeros(2))

    def support_error(f, b):
        return (score_map(feats, f, b, 20.0).argmax(1) != mask[:, 0].long()).float().mean()

    with torch.inference_mode():
        fg2, bg2 = refined_on_support(feats, mask, fg, bg, 20.0, steps=20)
    assert support_error(fg2, bg2) < 0.7 * support_error(fg, bg)
    assert fg2.protos.shape == fg.protos.shape and bg2.logw is bg.logw
    for name in ("alpnet", "crtpnet", "dfdt"):
        model = make(name, "effnet-lite0", support_refinement_steps=3)
        s, q = torch.randn(1, 1, 64, 64), torch.randn(2, 1, 64, 64)
        m = (torch.rand(1, 64, 64) > 0.5).float()
        with torch.inference_mode():
            assert model.eval()(s, m, q).shape == (2, 2, 64, 64)
        model.train()(s, m, q).sum().backward()                       # training: no refinement
    with pytest.raises(FewShotSegError, match="support_refinement_steps"):
        build_model("alpnet", pretrained=False, support_refinement_steps=-1)


def test_dfdt_refuses_query_prototypes():
    with pytest.raises(FewShotSegError, match="query_prototypes applies to alpnet and crtpnet"):
        build_model("dfdt", pretrained=False, query_prototypes=True)


def test_crtpnet_ablation_switches_as_in_its_table_2():
    """Base: no attention (no attention weights at all) and the support mask does not reach
    the channel gates; + Support Mask: it does; the full model keeps both."""
    sup, mask, qry = episode(64)
    feats_s, feats_q = torch.randn(1, 256, 8, 8), torch.randn(2, 256, 8, 8)
    small = torch.zeros(1, 1, 8, 8)
    small[..., 2:6, 1:5] = 1.0
    other = torch.zeros_like(small)
    other[..., 0:3, 4:8] = 1.0
    base = make("crtpnet", "effnet-lite0", cross_reference_mask=False, cross_reference_attention=False)
    masked = make("crtpnet", "effnet-lite0", cross_reference_attention=False)
    full = make("crtpnet", "effnet-lite0")
    assert not any("attends" in k for k in base.state_dict()) and not any("attends" in k for k in masked.state_dict())
    assert any("attends" in k for k in full.state_dict())
    with torch.no_grad():
        assert torch.equal(base.channel_weights(feats_s, small, feats_q), base.channel_weights(feats_s, other, feats_q))
        assert not torch.allclose(masked.channel_weights(feats_s, small, feats_q),
                                  masked.channel_weights(feats_s, other, feats_q))
        for model in (base, masked):
            w = model.channel_weights(feats_s, small, feats_q)
            assert w.shape == (2, 256) and bool(((w > 0) & (w < 1)).all())
            assert model.eval()(sup, mask, qry).shape == (2, 2, 64, 64)
    with pytest.raises(FewShotSegError, match="cross_reference_mask=1 is invalid"):
        build_model("crtpnet", pretrained=False, cross_reference_mask=1)
