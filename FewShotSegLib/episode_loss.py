"""The few-shot episode loss, shared by training (Training/train.py) and test-time tuning
on the painted slices (`support_tuning`): the model is tuned on what it was trained on."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class EpisodeLoss(torch.nn.Module):
    """Segmentation CE on the query + PANet prototype alignment (query prediction re-segments
    the support). A module so that DDP sees one forward per step.

    Alignment mask: the query's soft foreground probability (our choice; PANet uses the
    arg-max), so the alignment term also shapes the query prediction.
    """

    def __init__(self, model, class_weights, align_weight):
        super().__init__()
        self.model = model
        self.register_buffer("weights", torch.tensor(class_weights, dtype=torch.float32))
        self.align_weight = align_weight

    def forward(self, s_img, s_mask, q_img, q_mask):
        b = s_img.shape[0]
        feats = self.model.encode(torch.cat([s_img, q_img])[:, None])  # one encoder pass
        s_feat, q_feat = feats[:b], feats[b:]
        seg = align = s_img.new_zeros(())
        for i in range(b):  # the model's segment() handles one episode (S supports, Q queries)
            logits = self.model.segment(s_feat[i:i + 1], s_mask[i:i + 1], q_feat[i:i + 1])
            seg = seg + F.cross_entropy(logits.float(), q_mask[i:i + 1].long(), weight=self.weights)
            if self.align_weight:
                pred = torch.softmax(logits.float(), 1)[:, 1]
                back = self.model.segment(q_feat[i:i + 1], pred, s_feat[i:i + 1])
                align = align + F.cross_entropy(back.float(), s_mask[i:i + 1].long(), weight=self.weights)
        return seg / b, align / b
