"""ModuleBank: the decomposed modules (packed masks + grafting layers) of one trained model."""
import torch
import torch.nn as nn

from modsplit import files
from modsplit.compose import ComposedModel
from modsplit.convert import MultiModuleNet, convert
from modsplit.errors import BankFileError
from modsplit.module_norm import load_norm_statistics, norm_statistics


class Grafts(nn.Module):
    """K grafting layers batched: module k maps the N logits to 2 outputs ("is c_k", "is not
    c_k"). weight float [K, N, 2], bias float [K, 2]; forward(logits [K, B, N]) -> [K, B, 2].

    init_for(classes, N): "is c" reads logit c, "is not c" the mean of the other logits, bias 0,
    so every graft starts as the base model's own one-vs-rest decision.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)

    @classmethod
    def init_for(cls, classes, num_classes: int):
        k = len(classes)
        weight = torch.zeros(k, num_classes, 2)
        weight[:, :, 1] = 1.0 / max(num_classes - 1, 1)
        for i, c in enumerate(classes):
            weight[i, c] = torch.tensor([1.0, 0.0])
        return cls(weight, torch.zeros(k, 2))

    def select(self, modules) -> "Grafts":
        """A detached, frozen copy holding only the listed modules' grafts."""
        idx = torch.as_tensor(list(modules), dtype=torch.long, device=self.weight.device)
        g = Grafts(self.weight.detach()[idx].clone(), self.bias.detach()[idx].clone())
        return g.requires_grad_(False)

    def forward(self, logits):
        return torch.baddbmm(self.bias.unsqueeze(1), logits, self.weight)

    def confidence(self, logits):
        """Positive confidence softmax(graft)[..., 0] of each module: [K, B, N] -> [K, B]."""
        return self(logits).softmax(-1)[..., 0]


class ModuleBank(nn.Module):
    """Modules decomposed from one trained model: module k answers "is it class classes[k]?".

    net       MultiModuleNet whose masked layers hold fixed packed masks (no scores), and,
              when decomposed with batchnorm="module", ModuleBatchNorm layers holding every
              module's BatchNorm statistics;
    grafts    Grafts with K grafting layers;
    classes   tuple of K class ids; num_classes N of the base model;
    density, alpha, p, fingerprint (files.model_fingerprint of the base model), history (one
    dict per decomposition epoch), config (DecomposeConfig.to_dict() of the decomposition, or
    None for a bank built otherwise or saved before banks recorded it).

    An nn.Module holding net and grafts, so `.to(device / dtype)` moves both; the compositions
    made from it share them (moving either moves the other).
    """

    def __init__(self, net: MultiModuleNet, grafts: Grafts, classes, num_classes: int,
                 density: float, alpha: float, p: float, fingerprint: str, history=(),
                 config: dict = None):
        super().__init__()
        if len(classes) != net.n_modules or grafts.weight.shape[0] != net.n_modules:
            raise ValueError("modsplit: classes, net and grafts disagree on the number of modules")
        self.net, self.grafts = net.eval(), grafts.requires_grad_(False)
        self.train(False)
        self.classes, self.num_classes = tuple(int(c) for c in classes), int(num_classes)
        self.density, self.alpha, self.p = float(density), float(alpha), float(p)
        self.fingerprint, self.history = fingerprint, list(history)
        self.config = None if config is None else dict(config)

    @property
    def n_modules(self) -> int:
        return len(self.classes)

    def masks(self) -> dict:
        """{layer name: packed int32 [K, O, ceil(R/32)]} (row k = module of classes[k])."""
        return {name: m.masks() for name, m in self.net.masked_layers().items()}

    def weight_shapes(self) -> dict:
        """{layer name: shape of the layer's weight}."""
        return {name: tuple(m.weight.shape) for name, m in self.net.masked_layers().items()}

    def module_indices(self, classes) -> list:
        """Module indices of the given class ids (ValueError for a class the bank lacks)."""
        missing = [c for c in classes if c not in self.classes]
        if missing or not len(classes):
            raise ValueError(f"modsplit: the bank has modules for classes {self.classes}; "
                             f"asked for {list(classes)}")
        return [self.classes.index(int(c)) for c in classes]

    @torch.no_grad()
    def confidences(self, x: torch.Tensor, classes=None) -> torch.Tensor:
        """Positive confidence of each module of `classes` (default: all) on x [B, ...]:
        float [len(classes), B]."""
        idx = self.module_indices(self.classes if classes is None else classes)
        with self.net.use_modules(idx):
            logits = self.net(x)
        return self.grafts.select(idx).confidence(logits)

    def compose(self, classes):
        """A ComposedModel classifying among `classes` with their modules (no retraining)."""
        return ComposedModel(self, classes)

    def train(self, mode: bool = True):
        """A bank is always in eval mode (its network is the frozen base model)."""
        return super().train(False)

    def save(self, path):
        """Write the bank to one file (modsplit.files): packed masks, grafts and metadata. It
        costs about K * P / 8 bytes for P maskable weights, plus 2 K C floats per per-module
        BatchNorm of C channels; the base model is not stored."""
        masks = self.masks()
        meta = {"kind": "modsplit.ModuleBank", "layers": list(masks),
                "weight_shapes": {n: list(s) for n, s in self.weight_shapes().items()},
                "classes": list(self.classes), "num_classes": self.num_classes,
                "density": self.density, "alpha": self.alpha, "p": self.p,
                "fingerprint": self.fingerprint, "history": self.history, "config": self.config}
        stats = norm_statistics(self.net)
        meta["norm_layers"] = list(self.net.module_norms())
        tensors = {f"mask/{n}": m for n, m in masks.items()}
        tensors.update({f"norm/{n}": t for n, t in stats.items()})
        tensors.update({"graft/weight": self.grafts.weight, "graft/bias": self.grafts.bias})
        files.write_file(path, meta, tensors)

    @classmethod
    def load(cls, path, model: nn.Module) -> "ModuleBank":
        """Read a bank saved from decomposing `model` (the trained base model, unchanged). Raises
        BankFileError for a bad file and ValueError when `model` is not the bank's base
        model; `model` itself is never modified."""
        meta, tensors = files.read_file(path)
        if meta.get("kind") != "modsplit.ModuleBank":
            raise BankFileError(f"modsplit: {path} does not hold a ModuleBank")
        if files.model_fingerprint(model) != meta["fingerprint"]:
            raise ValueError(f"modsplit: {path} was decomposed from a different model (the "
                             "architecture or the trained tensors differ)")
        layers, k = meta["layers"], len(meta["classes"])
        norm_layers = meta.get("norm_layers", [])  # absent in banks written before per-module BatchNorm
        net = convert(model, k, meta["density"], include=layers,
                      batchnorm="module" if norm_layers else "frozen")
        if list(net.masked_layers()) != layers:
            raise ValueError(f"modsplit: {path} masks layers {layers}; the model has "
                             f"{list(net.masked_layers())}")
        if list(net.module_norms()) != norm_layers:
            raise ValueError(f"modsplit: {path} has per-module statistics for BatchNorm layers "
                             f"{norm_layers}; the model has {list(net.module_norms())}")
        try:
            load_norm_statistics(net, {n[len("norm/"):]: t for n, t in tensors.items()
                                       if n.startswith("norm/")}, where=f"modsplit: {path}")
        except ValueError as exc:
            raise BankFileError(str(exc)) from exc
        for name, layer in net.masked_layers().items():
            layer.freeze_masks(tensors[f"mask/{name}"])
        grafts = Grafts(tensors["graft/weight"], tensors["graft/bias"])
        device = next(iter(model.state_dict().values())).device
        return cls(net, grafts, meta["classes"], meta["num_classes"], meta["density"],
                   meta["alpha"], meta["p"], meta["fingerprint"], meta["history"],
                   meta.get("config")).to(device)
