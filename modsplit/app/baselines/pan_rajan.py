"""Pan & Rajan (FSE 2020) decomposition of fully connected nets: TI-I, TI-SNE and CM-RIE.

The baselines of the seed paper's Table 1, re-implemented in PyTorch from the description in
docs/baselines-pan-rajan.md and checked against their Keras code (repository
rangeetpan/decomposeDNNintoModules: ``utils/sliceutil*.py`` ``modifyThroughInterSection`` (CI),
``dynamicmodify`` (TI) and ``backtrack`` (CM-RIE), driven by each approach's ``Module.py``).
No training: each class's module is a copy of the model's Linear weights, edited with forward
passes over training examples.

Shapes use PyTorch's Linear layout: layer l has weight W_l float32 [O_l, I_l] and bias b_l
float32 [O_l]; hidden unit j of layer l owns row j of W_l (its incoming edges; a column in
Keras) and column j of W_{l+1} (its outgoing edges). A bank of K modules stores weights
[K, O_l, I_l] and biases [K, O_l]. Each module keeps all ``num_classes`` outputs, as their Keras
modules do: after channeling (CM) only the positive output c and one negative output n have
nonzero edges and bias; the other outputs give logit 0 and still take part in the softmax and
the argmax, as in their code.

Where the description and their code differ, we follow the code where it changes the modules:

- ``pre_relu_feed=True`` (default): CI and TI decide which units are active from a forward pass
  that feeds each layer's *pre*-ReLU values on (their code applies ``X[X<0]=0`` only after the
  whole pass), so for FC2-FC4 a deeper unit counts as active when its pre-activation in the
  ReLU-free net is > 0, and TI's output softmax is that net's. The modules themselves are run
  with ReLU, as their Keras modules are. ``pre_relu_feed=False`` gives the description's pass.
- positives are taken from the first ``positive_pool`` = 10000 training examples (their loop
  runs over ``range(len(yt))`` with ``yt`` the 10000 test labels, indexing the training set).

Why their published value-set JI (0.43-0.78) is far below ours on our base models is not in the
decomposition: their loader scales inputs twice (``skimage.transform.resize`` already maps uint8
pixels to [0, 1], then ``/255``), so their nets see x in [0, 1/255]; trained that way (Glorot
init, Adam 1e-3, batch 32, 50 epochs, as their ``train2``), our MNIST/F-MNIST FC1 and FC2 keep
14-22 of their 49 first-layer units dead (never active; their paper reports ~34% of edges
inactive). TI then restores the same live units in every module
(TI-I and TI-SNE give identical modules, hence their identical published JIs), and the value-set
JI of modules that are zero on a fraction 1 - f of their edges is about f / (2 - f) < 1 even for
identical modules (``value_set_jaccard``). On normally scaled inputs almost every unit is active
on some negative, so TI restores (nearly) the whole net and the JI is close to 1.

Their code also has bugs we do not copy (they barely move the published numbers): RIE writes
the mean negative edge onto n and then zeroes n with the other nonzero negative edges, the
merge for c != 0 averages edges to output 1 instead of the negative edges, channeling's bias
mean for c != 0 divides by 10, and the TI-I/TI-SNE ``Reuse.py`` return the voter's position
instead of its class when several modules vote (fixed in their CM-RIE ``Reuse.py``; we vote as
that one does). Interpretations of our own are marked "(ours)".
"""
from dataclasses import dataclass

import torch
from torch import nn

METHODS = ("ti-i", "ti-sne", "cm-rie")


def linear_layers(model):
    """The Linear layers of an FC model: list of (qualified name, nn.Linear) in forward order.

    ``model`` must be an ``nn.Sequential`` of Flatten, Linear and ReLU (as built by
    ``modsplit.app.models.fc``) with a ReLU after every Linear but the last.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError("Pan & Rajan decomposition needs an nn.Sequential FC model")
    kinds = [type(m) for m in model]
    if any(k not in (nn.Flatten, nn.Linear, nn.ReLU) for k in kinds):
        raise TypeError(f"only Flatten/Linear/ReLU layers are supported, got {kinds}")
    body = [k for k in kinds if k is not nn.Flatten]
    expected = [nn.Linear, nn.ReLU] * (len(body) // 2) + [nn.Linear]
    if body != expected:
        raise TypeError(f"expected Linear, ReLU, ..., Linear, got {body}")
    return [(name, m) for name, m in model.named_children() if isinstance(m, nn.Linear)]


def pre_activations(weights, biases, x, pre_relu_feed=False):
    """Pre-activations of every layer of the original net for a batch.

    weights/biases: per-layer [O_l, I_l] / [O_l]; x: float [B, I_0]. Returns a list of
    [B, O_l] tensors, z_l = W_l relu(z_{l-1}) + b_l (z_0 being x itself, with no ReLU), or
    z_l = W_l z_{l-1} + b_l with ``pre_relu_feed`` (the ReLU-free pass of their code).
    """
    zs, h = [], x
    for i, (w, b) in enumerate(zip(weights, biases)):
        z = h @ w.T + b
        zs.append(z)
        if i < len(weights) - 1:
            h = z if pre_relu_feed else torch.relu(z)
    return zs


def concern_identification(weights, biases, positives, reseed_min_nonzero=45,
                           pre_relu_feed=True):
    """CI: build one module's weights from positive examples with the min/max intersection rule.

    weights/biases: the model's per-layer [O_l, I_l] / [O_l]; positives: float [P, I_0]
    flattened inputs, processed in order. Returns (D, d), new per-layer tensors of the same
    shapes. For each example, with z_l its pre-activations in the original net (see
    ``pre_activations`` for ``pre_relu_feed``):

    - hidden unit j with z_l[j] <= 0: D_l[j, :] = 0, d_l[j] = 0, and its outgoing edges
      D_{l+1}[:, j] = 0 unless layer l+1 is the output;
    - hidden unit j with z_l[j] > 0: on the first example D_l[j, :] = W_l[j, :]; afterwards an
      edge with W >= 0 becomes min(D, W) and one with W < 0 becomes max(D, W) clamped to >= 0;
      d_l[j] = b_l[j];
    - output layer: the same min/max update for every unit, without the clamp.

    Layers are updated in order, so on the first example an active unit of layer l+1 restores
    edges zeroed by an inactive unit of layer l (as in their code). After each example, when the
    second Linear layer (the output layer for FC1) has fewer than ``reseed_min_nonzero`` nonzero
    edges, the next example is treated as the first again (their re-seed check, on D2 < 45).
    """
    D = [torch.zeros_like(w) for w in weights]
    d = [torch.zeros_like(b) for b in biases]
    zs = pre_activations(weights, biases, positives, pre_relu_feed)
    last = len(weights) - 1
    first = True
    for n in range(len(positives)):
        for layer, (w, b) in enumerate(zip(weights, biases)):
            if first:
                upd = w.clone()
            else:
                upd = torch.where(w < 0, torch.maximum(D[layer], w), torch.minimum(D[layer], w))
                if layer < last:
                    upd = upd.clamp(min=0).where(w < 0, upd)
            if layer == last:
                D[layer], d[layer] = upd, b.clone()
                break
            active = zs[layer][n] > 0
            D[layer] = torch.where(active[:, None], upd, torch.zeros_like(upd))
            d[layer] = torch.where(active, b, torch.zeros_like(b))
            if layer + 1 < last:
                D[layer + 1][:, ~active] = 0
        first = len(D) > 1 and int(torch.count_nonzero(D[1])) < reseed_min_nonzero
    return D, d


def tangling_identification(weights, biases, D, d, negatives, tau=0.5, pre_relu_feed=True):
    """TI: restore, in place, the parts of module (D, d) that negative examples use.

    negatives: float [N, I_0]. Every hidden unit (of every hidden layer) with z > 0 on some
    negative example gets its whole incoming row and bias back from (W, b); output unit j gets
    row and bias back where the original net's softmax on some negative exceeds ``tau``. Nothing
    is ever removed. z: see ``pre_activations`` for ``pre_relu_feed``.
    """
    zs = pre_activations(weights, biases, negatives, pre_relu_feed)
    for layer, (w, b) in enumerate(zip(weights, biases)):
        if layer == len(weights) - 1:
            used = (torch.softmax(zs[layer], 1) > tau).any(0)
        else:
            used = (zs[layer] > 0).any(0)
        D[layer][used] = w[used]
        d[layer][used] = b[used]


def negative_output(c):
    """Index of the output node a channelled module of class c uses as its negative node."""
    return 1 if c == 0 else 0


def remove_irrelevant_edges(D, d, c, eps=0.05):
    """RIE, in place, on module (D, d) of class c; returns the list R of merged hidden units.

    Each last-hidden unit j with |D_out[c, j]| < eps keeps one negative edge, to the negative
    node n, set to the mean of its nonzero edges to outputs other than c (0 when none); its
    edges to the other outputs are zeroed. When |R| > 1, R[0] takes the mean over R of the
    incoming rows D_{L-1}[R, :], biases (ours) and negative edges, and the other units of R are
    removed (incoming row, bias and outgoing edges zeroed; ours: the description only says
    their columns are zeroed).
    """
    out, prev = D[-1], D[-2]
    n = negative_output(c)
    others = [k for k in range(out.shape[0]) if k != c]
    R = torch.nonzero(out[c].abs() < eps).flatten().tolist()
    for j in R:
        neg = out[others, j]
        nz = neg[neg != 0]
        out[others, j] = 0
        out[n, j] = nz.mean() if len(nz) else 0.0
    if len(R) > 1:
        r0, rest = R[0], R[1:]
        out[n, r0] = out[n, R].mean()
        prev[r0] = prev[R].mean(0)
        d[-2][r0] = d[-2][R].mean()
        prev[rest] = 0
        d[-2][rest] = 0
        out[:, rest] = 0
    return R


def channel(D, d, c, skip=()):
    """CM-C, in place: turn module (D, d) of class c into positive node c + negative node n.

    Output row n (see ``negative_output``) becomes the mean of all rows other than c, and its
    bias the mean of their biases; the remaining rows and biases are zeroed. Columns (last-hidden
    units) in ``skip`` keep their current edges (ours: units already channelled by RIE, whose
    only negative edge is on n, would otherwise be divided by K-1).
    """
    out, bias = D[-1], d[-1]
    n = negative_output(c)
    others = [k for k in range(out.shape[0]) if k != c]
    keep = torch.zeros(out.shape[1], dtype=torch.bool)
    keep[list(skip)] = True
    mean = out[others].mean(0)
    out[n] = torch.where(keep, out[n], mean)
    bias[n] = bias[others].mean()
    dropped = [k for k in others if k != n]
    out[dropped] = 0
    bias[dropped] = 0


@dataclass
class PanRajanModules:
    """K per-class modules of an FC net, made by Pan & Rajan's method ``method``.

    layer_names: the Linear layers' qualified names in the model (e.g. ["1", "3"]);
    weights / biases: per layer float32 [K, O_l, I_l] / [K, O_l]; classes: int list [K], the
    class of each module (module k's positive output is classes[k]).
    """

    layer_names: list
    weights: list
    biases: list
    classes: list
    method: str

    def masks(self):
        """{layer name: bool [K, O_l, I_l]}, True where a module's edge is nonzero."""
        return {name: w != 0 for name, w in zip(self.layer_names, self.weights)}

    def logits(self, x):
        """Every module's logits: x float [B, ...] (flattened to [B, I_0]) -> [K, B, C]."""
        h = x.flatten(1).float()
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            z = (torch.einsum("koi,bi->kbo", w, h) if i == 0
                 else torch.einsum("koi,kbi->kbo", w, h)) + b[:, None, :]
            h = torch.relu(z) if i < last else z
        return h

    def predict(self, x, classes=None):
        """Recomposed prediction by their voting: x float [B, ...] -> int64 [B] class labels.

        ``classes``: the modules to recompose (default all). Module c votes when its argmax is c;
        one vote gives that label, several give the voter with the largest softmax probability
        of its positive output, none gives the largest such probability over all modules.
        """
        idx = self._module_index(classes)
        cls = torch.tensor([self.classes[i] for i in idx])
        logits = self.logits(x)[idx]
        pos = torch.softmax(logits, -1)[torch.arange(len(idx)), :, cls]  # [K', B]
        votes = logits.argmax(-1) == cls[:, None]
        anyone = votes.any(0, keepdim=True)
        score = torch.where(anyone & ~votes, torch.full_like(pos, -1.0), pos)
        return cls[score.argmax(0)]

    def module_accuracy(self, dataset):
        """Each module's one-vs-rest accuracy on ``dataset`` (pairs of image, int64 label):
        float [K], the fraction of examples where (argmax == c) equals (label == c)."""
        x, y = _tensors(dataset)
        cls = torch.tensor(self.classes)
        pred_pos = self.logits(x).argmax(-1) == cls[:, None]
        return (pred_pos == (y[None, :] == cls[:, None])).float().mean(1)

    def accuracy(self, dataset, classes=None):
        """Recomposed accuracy (float in [0, 1]) on the examples of ``dataset`` whose label is
        among ``classes`` (default: all modules)."""
        x, y = _tensors(dataset)
        wanted = torch.tensor([self.classes[i] for i in self._module_index(classes)])
        keep = torch.isin(y, wanted)
        return (self.predict(x[keep], classes) == y[keep]).float().mean().item()

    def _module_index(self, classes):
        if classes is None:
            return list(range(len(self.classes)))
        return [self.classes.index(c) for c in classes]


def _tensors(dataset):
    """(x, y) tensors of a TensorDataset or of any dataset of (x, y) pairs."""
    if isinstance(dataset, torch.utils.data.TensorDataset):
        return dataset.tensors[0], dataset.tensors[1]
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.as_tensor(ys)


@torch.no_grad()
def decompose_pan_rajan(model, train_set, method="ti-i", num_classes=10, *, max_positives=1000,
                        positive_pool=10000, confidence=0.9, negatives_per_class=None, tau=0.5,
                        rie_eps=0.05, reseed_min_nonzero=45, pre_relu_feed=True):
    """Decompose FC ``model`` into ``num_classes`` modules with TI-I, TI-SNE or CM-RIE.

    model: nn.Sequential of Flatten/Linear/ReLU (``modsplit.app.models.fc``), left unchanged.
    train_set: pairs of (float image, int64 label). For class c the positives are the first
    ``max_positives`` examples of class c among the first ``positive_pool`` training examples
    (None: all) that the model gives softmax p_c > ``confidence``; the negatives are the first
    ``negatives_per_class`` examples of each other class in the whole set (default 1 for TI-I,
    110 for TI-SNE and CM-RIE, as in their scripts). ``pre_relu_feed``: see the module
    docstring.

    - "ti-i": CI on the positives, then TI (threshold ``tau``) on the negatives;
    - "ti-sne": the same with 110 negatives per class;
    - "cm-rie": TI-SNE, then RIE (``rie_eps``) and channeling.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if negatives_per_class is None:
        negatives_per_class = 1 if method == "ti-i" else 110
    layers = linear_layers(model)
    weights = [m.weight.detach().float().cpu() for _, m in layers]
    biases = [m.bias.detach().float().cpu() for _, m in layers]
    x, y = _tensors(train_set)
    x = x.flatten(1).float()
    probs = torch.softmax(pre_activations(weights, biases, x)[-1], 1)  # the model's own
    pool = torch.zeros(len(y), dtype=torch.bool)
    pool[:positive_pool] = True
    banks = [[] for _ in weights], [[] for _ in biases]
    for c in range(num_classes):
        pos = x[pool & (y == c) & (probs[:, c] > confidence)][:max_positives]
        if len(pos) == 0:
            raise ValueError(f"class {c}: no training example with p_c > {confidence}")
        neg = torch.cat([x[y == k][:negatives_per_class] for k in range(num_classes) if k != c])
        D, d = concern_identification(weights, biases, pos, reseed_min_nonzero, pre_relu_feed)
        tangling_identification(weights, biases, D, d, neg, tau, pre_relu_feed)
        if method == "cm-rie":
            channel(D, d, c, skip=remove_irrelevant_edges(D, d, c, rie_eps))
        for bank, t in zip(banks[0] + banks[1], D + d):
            bank.append(t)
    return PanRajanModules(layer_names=[name for name, _ in layers],
                           weights=[torch.stack(b) for b in banks[0]],
                           biases=[torch.stack(b) for b in banks[1]],
                           classes=list(range(num_classes)), method=method)


def value_set_jaccard(modules):
    """Their published "Jaccard index": mean over ordered pairs of modules i != j of
    |set(v_i) & set(v_j)| / (len(v_i) + len(v_j) - |set(v_i) & set(v_j)|), where v_k is the list
    of all of module k's weight values (every layer, flattened, zeros included; no biases).

    This is their ``similarity.py`` (module pairs; their TI-I MNIST-2 ``similarity_Model.py``
    compares the model with each module instead). It compares sets of weight *values*, not edge
    positions, so it is not the mask-based Jaccard index: all of a module's zeros count once in
    the intersection but every time in the lengths, so identical modules with a fraction f of
    nonzero (distinct) weights score about f / (2 - f), not 1. A float in [0, 1].
    """
    flat = torch.cat([w.flatten(1) for w in modules.weights], 1)  # [K, n]
    uniq = [torch.unique(v) for v in flat]
    k, n = flat.shape
    scores = []
    for i in range(k):
        for j in range(k):
            if i != j:
                inter = int(torch.isin(uniq[i], uniq[j]).sum())
                scores.append(inter / (2 * n - inter))
    return sum(scores) / len(scores)
