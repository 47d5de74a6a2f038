"""ComposedModel: a classifier over a subset of classes built from a bank's modules."""
import torch
import torch.nn as nn

from modsplit.compact import CompactModel
from modsplit.export import export_composed
from modsplit.metrics import union_count, union_mask
from modsplit.voting import ClassVoter


class ComposedModel(ClassVoter):
    """Classifies among `classes` by running their modules in one multi-module pass (each module
    with its own mask) and voting: the class whose graft gives the highest positive confidence
    softmax(graft)[0] wins.

    forward(x [B, ...]) / confidences(x) -> float [B, len(classes)] positive confidences, column
    j for classes[j]; predict(x) -> int64 [B] class ids. Shares the bank's network and grafts:
    `.to(device / dtype)` on the bank or on any of its compositions moves them all.
    """

    def __init__(self, bank, classes):
        super().__init__()
        self.classes = tuple(int(c) for c in classes)
        self.modules_idx = bank.module_indices(self.classes)
        self.bank = bank
        self.register_buffer("class_ids", torch.tensor(self.classes, dtype=torch.long),
                             persistent=False)

    @property
    def net(self):
        return self.bank.net

    @property
    def grafts(self):
        """Detached Grafts of the chosen modules (a copy, on the bank's device and dtype)."""
        return self.bank.grafts.select(self.modules_idx)

    def forward(self, x):
        with self.net.use_modules(self.modules_idx):
            logits = self.net(x)
        return self.grafts.confidence(logits).T

    def union_masks(self) -> dict:
        """{layer name: packed int32 [O, ceil(R/32)]} union of the chosen modules' masks."""
        return {name: union_mask(layer.masks(), self.modules_idx)
                for name, layer in self.net.masked_layers().items()}

    def num_parameters(self) -> int:
        """Parameters of the composed subnetwork: weights in the union of the chosen modules'
        masks, every other parameter of the network (biases, normalisation), and the grafts."""
        masked = self.net.masked_layers().values()
        skip = {id(m.weight) for m in masked}
        idx = self.modules_idx
        edges = sum(union_count(m.masks(), idx) for m in masked)
        rest = sum(p.numel() for p in self.net.parameters() if id(p) not in skip)
        return int(edges + rest + self.grafts.weight.numel() + self.grafts.bias.numel())

    def export(self) -> nn.Module:
        """A plain nn.Module (standard torch ops only) holding only the union subnetwork and
        giving the same predictions; see modsplit.export.export_composed."""
        return export_composed(self)

    def compact(self) -> CompactModel:
        """The compact form (modsplit.compact): the union of the chosen modules' weights as
        values plus packed per-module masks, run on sparse or dense kernels with no W*M pass;
        same predictions. save() / CompactModel.load() read and write its file."""
        return CompactModel.from_composed(self)
