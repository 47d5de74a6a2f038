"""ClassVoter: the confidence vote shared by composed and exported models."""
import torch
import torch.nn as nn


class ClassVoter(nn.Module):
    """Voting over positive confidences: subclasses define forward(x) -> [B, len(classes)] and
    hold `class_ids` int64 [len(classes)]."""

    @torch.no_grad()
    def confidences(self, x):
        return self(x)

    @torch.no_grad()
    def predict(self, x):
        winner = self(x).argmax(1)
        return self.class_ids.to(winner.device)[winner]
