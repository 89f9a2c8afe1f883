"""The protocol's location prior (FewShotProtocol/location_prior.py, row ``+loc``): body boxes,
the support mask carried between them, the prior's shape, and the predictor wrapping it."""
from __future__ import annotations

import pytest
import torch

from FewShotProtocol import protocol as P
from FewShotSegLib.errors import FewShotSegError
from FewShotProtocol.location_prior import body_boxes, location_prior, mapped_mask
from FewShotSegLib.models import build_model
from FewShotSegLib.preprocessing import PreprocessConfig, body_mask


def _body(top, bottom, left, right, side=64):
    image = torch.rand(side, side) * 0.05
    image[top:bottom + 1, left:right + 1] += 1.0
    return image


def test_body_box_is_the_largest_bright_region():
    image = _body(10, 50, 5, 60)
    image[0:3, 0:3] = 1.0   # a small bright speck (a marker, an arm) is not the body
    blank = torch.zeros(64, 64)
    assert body_boxes(torch.stack([image, blank])).tolist() == [[10, 50, 5, 60], [0, 63, 0, 63]]


def test_body_box_is_the_trainings_body_mask_dark_band_included():
    """The boxes come from `preprocessing.body_mask`, the training's body: a body whose lower
    part is dark (a fat band, coil fall-off near the dome) is boxed whole, not its bright top."""
    image = _body(10, 50, 5, 60)
    image[31:51, 5:61] = 0.12   # faint, but above 10 % of the way from the 5th to the 99th percentile
    assert body_boxes(image[None]).tolist() == [[10, 50, 5, 60]]
    assert torch.equal(body_boxes(image[None]), body_boxes(torch.from_numpy(body_mask(image.numpy()) * 1.0)[None]))


def test_support_mask_follows_the_body_box():
    mask = torch.zeros(64, 64)
    mask[20:30, 10:20] = 1
    same = torch.tensor([10.0, 50, 5, 60])
    assert torch.equal(mapped_mask(mask, same, same[None])[0], mask.bool())
    shifted = mapped_mask(mask, same, torch.tensor([[20.0, 60, 5, 60]]))[0]
    assert torch.equal(shifted, torch.roll(mask, 10, 0).bool())
    halved = mapped_mask(mask, torch.tensor([0.0, 63, 0, 63]), torch.tensor([[0.0, 31, 0, 31]]))[0]
    assert halved[10:15, 5:10].all() and halved.sum() == 25


def test_prior_is_one_near_the_organ_and_falls_off_far_away():
    mask = torch.zeros(64, 64)
    mask[20:30, 10:20] = 1
    box = torch.tensor([0.0, 63, 0, 63])
    prior = location_prior(mask, box, box[None], margin=0.1, sigma=0.1)[0]
    assert prior.shape == (64, 64) and prior.max() == 1 and prior.min() > 0
    assert prior[20:30, 10:20].eq(1).all() and prior[25, 15 + 6 + 4] == 1   # within 6.4 px of the mask: still 1
    assert prior[25, 60] < 0.01 < prior[25, 40] < prior[25, 30]                # then falling off with distance
    empty = location_prior(torch.zeros(64, 64), box, box[None].repeat(2, 1))
    assert empty.shape == (2, 64, 64) and empty.eq(1).all()   # no support organ: no evidence, no prior


def test_location_prior_predictor_scales_its_member_and_wraps_others():
    torch.manual_seed(0)
    net = P.ModelPredictor(build_model("alpnet", backbone="effnet-lite0", pretrained=False),
                           PreprocessConfig(size=64))
    images = torch.stack([_body(8, 56, 4, 40), _body(8, 56, 20, 60), _body(10, 50, 10, 54)])
    mask = torch.zeros(64, 64)
    mask[20:30, 10:20] = 1

    def run(predictor):
        feats = predictor.prepare(images)
        return predictor.predict(feats[0], mask, feats[[1, 2]])

    with_prior = run(P.LocationPriorPredictor(net))
    boxes = body_boxes(images)
    assert torch.allclose(with_prior, run(net) * location_prior(mask, boxes[0], boxes[1:]), atol=1e-6)
    around = run(P.LocationPriorPredictor(P.MultiScalePredictor(P.MirrorAveragePredictor(net), (1.0, 1.5))))
    assert around.shape == (2, 64, 64) and (around <= 1).all()
    assert mask.sum() == 100   # the support mask is not modified
    with pytest.raises(FewShotSegError, match="location prior"):
        P.LocationPriorPredictor(net, sigma=0)
    option = P.test_time_option("blend+ms+loc")
    assert option.location_prior and option.multiscale and not P.test_time_option("ms").location_prior
    assert "support mask mapped by the two body outlines' boxes" in P.describe("crtpnet+loc")
