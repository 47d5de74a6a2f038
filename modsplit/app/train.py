"""Training and evaluation of base classifiers (before decomposition).

Defaults: SGD, lr 0.01, Nesterov momentum 0.9, weight decay 5e-4, batch size 64 (``epochs`` is
always passed explicitly); a step decay is ``milestones`` / ``gamma`` (for example CIFAR-100 /
WRN-28-10: ``train_classifier(..., lr=0.1, batch_size=256, milestones=(60, 120, 160),
gamma=0.2)``). Where these settings come from and where they differ from the paper's Tables 3
and 4: docs/RESULTS.md, "Every deviation from the paper".

``optimizer="adam"`` and ``init="glorot"`` give Keras-style training instead (Adam, Glorot-uniform
weights, zero biases), as Pan & Rajan (FSE 2020) trained the FC nets of the paper's baselines:
``train_classifier(..., optimizer="adam", lr=1e-3, eps=1e-7, weight_decay=0, batch_size=32,
init="glorot")``. torch's Adam adds ``eps`` to the bias-corrected sqrt(v_hat), Keras's to the
uncorrected sqrt(v) (its "epsilon hat"), so Keras's eps corresponds to a torch eps of
eps / sqrt(1 - beta2^t): larger in the first few thousand steps (3e-6 at step 1 for 1e-7), the
same afterwards. We use torch's Adam as it is.
"""
import torch
from torch import nn
from tqdm.auto import tqdm

from modsplit.batching import batches


def random_crop_flip(x, padding=4):
    """Standard CIFAR augmentation on a batch: float [B, C, H, W] -> float [B, C, H, W].

    Each image is zero-padded by ``padding``, cropped back to H x W at a random offset and
    flipped horizontally with probability 1/2 (torch's global RNG, seeded by train_classifier).
    """
    b, _, h, w = x.shape
    padded = nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded[torch.arange(b, device=x.device)[:, None, None, None],
                 torch.arange(x.shape[1], device=x.device)[None, :, None, None], rows, cols]
    flip = torch.rand(b, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def rand_augment(mean, std, num_ops=2, magnitude=14):
    """RandAugment (Cubuk et al. 2020; torchvision's, ``num_ops`` N, ``magnitude`` M) followed by
    random_crop_flip, for standardised batches: returns a function float [B, C, H, W] ->
    float [B, C, H, W]. Each image is mapped back to uint8 pixels with the per-channel ``mean``
    and ``std`` (0-1 scale), augmented on its own (torch's global RNG), and standardised again."""
    from torchvision.transforms import RandAugment

    op = RandAugment(num_ops, magnitude)

    def augment(x):
        m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
        pixels = ((x * s + m) * 255).round().clamp(0, 255).to(torch.uint8).cpu()
        out = torch.stack([op(img) for img in pixels]).to(x.device).float() / 255
        return random_crop_flip((out - m) / s)

    return augment


OPTIMIZERS = ("sgd", "adam")
INITS = (None, "glorot")


def glorot_init_(model):
    """Re-initialise ``model`` in place the Keras way: the weight of every Linear and Conv layer
    (float [O, I] or [O, I, *K]) uniform in +-sqrt(6 / (fan_in + fan_out)) (Glorot / Xavier
    uniform, gain 1), every such bias zero. Draws from torch's global RNG; returns the model.
    Other layers (e.g. BatchNorm) keep their parameters."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def make_optimizer(params, optimizer="sgd", *, lr, momentum=0.9, nesterov=True,
                   weight_decay=5e-4, betas=(0.9, 0.999), eps=1e-8):
    """A torch optimizer over ``params``: "sgd" (momentum, nesterov, weight_decay) or "adam"
    (betas, eps, weight_decay as torch's L2 term; 0 for Keras's Adam). Arguments that the chosen
    optimizer does not have are ignored; raises ValueError for an unknown name."""
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov,
                               weight_decay=weight_decay)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")


def train_classifier(model, train_set, *, epochs, lr=0.01, momentum=0.9, nesterov=True,
                     weight_decay=5e-4, batch_size=64, seed=0, device="cpu", progress=True,
                     augment=None, milestones=None, gamma=0.2, optimizer="sgd",
                     betas=(0.9, 0.999), eps=1e-8, init=None):
    """Train ``model`` in place with cross-entropy; returns the model (in eval mode).

    train_set: dataset of (float32 [C, H, W], int64 label) pairs. ``augment``: optional function
    float [B, C, H, W] -> float [B, C, H, W] applied to each training batch on ``device`` (e.g.
    ``random_crop_flip``). ``milestones``: epochs at which the learning rate is multiplied by
    ``gamma`` (MultiStepLR); None keeps it constant. weight_decay defaults to 5e-4 (the paper's
    Table 3 says 5e-1, a typo; see the module docstring). ``optimizer``: "sgd" (default; uses
    momentum, nesterov) or "adam" (uses betas, eps); see make_optimizer. ``init``: None keeps the
    model's weights; "glorot" re-initialises them first with glorot_init_ (Keras's defaults),
    drawing from torch's global RNG seeded with ``seed``.

    Deterministic for a given ``seed`` on CPU: the shuffle uses a generator seeded with it and
    dropout / augmentation draw from torch's global RNG, seeded with it inside a forked RNG
    state (the caller's global RNG state is left untouched).
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid: None, 'glorot'")
    device = torch.device(device)
    if init == "glorot":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            glorot_init_(model)
    model.to(device).train()
    opt = make_optimizer(model.parameters(), optimizer, lr=lr, momentum=momentum,
                         nesterov=nesterov, weight_decay=weight_decay, betas=betas, eps=eps)
    sched = (torch.optim.lr_scheduler.MultiStepLR(opt, list(milestones), gamma)
             if milestones else None)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        bar = tqdm(range(epochs), desc="train", disable=not progress)
        for _ in bar:
            total, n = 0.0, 0
            for x, y in batches(train_set, batch_size, gen):
                x, y = x.to(device), y.to(device)
                if augment is not None:
                    x = augment(x)
                loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(y)
                n += len(y)
            if sched is not None:
                sched.step()
            bar.set_postfix(loss=total / max(n, 1))
    return model.eval()


@torch.no_grad()
def predict_logits(model, dataset, batch_size=512, device="cpu"):
    """Logits of ``model`` on every example of ``dataset``: float32 [N, num_classes] on CPU.

    Runs in eval mode and restores the model's previous train/eval mode afterwards.
    """
    was_training = model.training
    model.eval().to(device)
    out = [model(x.to(device)).float().cpu() for x, _ in batches(dataset, batch_size)]
    model.train(was_training)
    return torch.cat(out)


def evaluate(model, dataset, batch_size=512, device="cpu"):
    """Top-1 accuracy of ``model`` on ``dataset`` (pairs of image, int64 label), a float in
    [0, 1]."""
    logits = predict_logits(model, dataset, batch_size, device)
    labels = torch.cat([y for _, y in batches(dataset, batch_size)])
    return (logits.argmax(1) == labels).float().mean().item()
