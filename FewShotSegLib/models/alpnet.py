"""SSL-ALPNet (Ouyang et al., ECCV 2020): prototypes straight from the support features.

No learned part besides the encoder: foreground = local (ALP) + global prototypes,
background = local prototypes of the complement, score = soft-max-weighted cosine x 20.
Trained with self-supervised superpixel episodes (Training/), it is the baseline every
other model here extends.
"""
from __future__ import annotations

from .base import FewShotModel
from .registry import register_model


@register_model("alpnet")
class ALPNet(FewShotModel):
    def segment(self, support_feats, support_masks, query_feats):
        mask = self.support_mask(support_masks, support_feats)
        fg, bg = self.prototypes(support_feats, mask)
        return self.upsample(self.score(query_feats, fg, bg), support_masks)
