#!/usr/bin/env python3
"""The recipes in PyTorch eager, written from the papers' public code and not from the worker's:
the independent implementation that bench/fidelity.sh compares the worker with, and the baseline
that bench/train_cpu.sh and bench/gpu.sh time it against.

- dawnbench: D. Page's dawn.py (davidcpage/cifar10-fast): the training set padded by reflection,
  normalised; each epoch every image draws its own crop (0..8), flip and 8x8 cutout lying inside
  the image; shuffled, last partial batch dropped; ResNet-9 (BatchNorm weight 1); loss summed over
  the batch; Page's Nesterov SGD with lr = schedule / batch and weight decay 5e-4 x batch (the
  momentum buffer holds lr-scaled steps); lr piecewise linear 0 -> 0.4 at epoch 5 -> 0 at 24, per
  step.
- paper-short: D. Picard's cifar_seed.py (davidpicard/deepseed): the images normalised first;
  each epoch, every chunk of 500 consecutive training images gets one torchvision RandomCrop(32,
  padding 4) (zero padding of the normalised tensor), one horizontal flip and one 8x8 cutout
  centred anywhere and clipped at the borders (a partial last chunk too); then shuffled; last
  partial batch dropped; the
  skinny ResNet-9 with CELU(0.1); loss CE + 2 x CE with label smoothing 0.2 (mean); torch SGD
  (lr 0.2, Nesterov 0.9, weight decay 1e-3) under LambdaLR's per-epoch multiplier.
- airbench94: K. Jordan's legacy/airbench94.py (KellerJordan/cifar10-airbench), uncompiled: the
  images normalised with the data's std; each image flipped at random once, then all flipped in
  every odd epoch (from 0), padded by reflection and translated by -2..2 per image and epoch;
  shuffled, last partial batch dropped, ceil(9.9 x steps) steps; the net: a 2x2 conv of 24
  frozen filters from the eigenvectors of the first 5,000 images' patches (its bias trained for 3
  epochs), GELU, three conv groups (64, 256, 256) whose 3x3 convs start as the identity in their
  first filters and whose BatchNorms keep weight 1 (eps 1e-12, momentum 0.4), max pool 3, linear,
  x 1/9; loss summed with label smoothing 0.2; torch SGD, Nesterov 0.85, lr 11.5 / (1024 x
  (1 + 1/0.15)) (x 64 for BatchNorm biases), weight decay 0.0153 x batch / that, LambdaLR per
  step (0.2 -> 1 over 23% of the steps, -> 0.07); every 5 steps the float state moves to its
  moving average (decay 0.95^5 (step/steps)^3), ending on it; the last evaluation averages the
  mirror and one-pixel translations (tta level 2). On CUDA it trains under fp16 autocast without
  loss scaling (airbench casts the net to half); --compile wraps the net in torch.compile.

All use PyTorch's default initialisation (airbench94's convs then the identity), evaluate in eval mode (BatchNorm running statistics)
and train fp32 on a CPU; on CUDA they use autocast (fp16 or bf16) where the papers cast the
network to half (the worker does the same). Random draws come from torch generators seeded with
--seed, so the numbers are not the worker's bit for bit: the comparison is of distributions.

Prints one JSON line per epoch: epoch, seconds (training plus evaluation), train_loss,
test_accuracy, images_per_second.

    python3 bench/torch_reference.py --data DATA_DIR/NAME --recipe dawnbench --epochs 3 --threads 2
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# CIFAR-10's channel mean, in all three authors' code.
MEAN = (0.4914, 0.4822, 0.4465)
# Page, cifar10-fast utils.py: cifar10_std ("equals np.std(train_set.train_data, axis=(0,1,2))/255").
PAGE_STD = (0.2471, 0.2435, 0.2616)
# Picard, deepseed datasets.py: build_dataset's _CIFAR_STD.
PICARD_STD = (0.2023, 0.1994, 0.2010)
# Jordan, airbench airbench94.py: CIFAR_STD.
AIRBENCH_STD = (0.2470, 0.2435, 0.2616)
RECIPES = {
    "airbench94": dict(model="airbench94", epochs=10, batch_size=1024, precision="fp16",
                       channels_last=True),
    "dawnbench": dict(model="resnet9", epochs=24, batch_size=512, precision="fp16",
                      channels_last=True),
    "paper-short": dict(model="resnet9-skinny", epochs=22, batch_size=500, precision="fp16",
                        channels_last=True),
}


def read_split(folder, names):
    raw = b"".join(open(os.path.join(folder, n), "rb").read() for n in names)
    if len(raw) % 3073:
        sys.exit(f"error: {folder}: files are not whole 3073-byte records")
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, 3073)
    return t[:, 1:].reshape(-1, 3, 32, 32).clone(), t[:, 0].long().clone()


def conv_bn(c_in, c_out, act):
    bn = nn.BatchNorm2d(c_out)  # eps 1e-5, momentum 0.1
    bn.weight.data.fill_(1.0)   # both papers set it (PyTorch's default since 1.2 too)
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), bn, act()]


class Residual(nn.Module):
    def __init__(self, c, act):
        super().__init__()
        self.body = nn.Sequential(*conv_bn(c, c, act), *conv_bn(c, c, act))

    def forward(self, x):
        return x + self.body(x)


class Mul(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        return x * self.s


def page_resnet9(width):
    c = [max(1, round(b * width)) for b in (64, 128, 256, 512)]
    act = lambda: nn.ReLU(True)
    return nn.Sequential(
        *conv_bn(3, c[0], act),
        *conv_bn(c[0], c[1], act), nn.MaxPool2d(2), Residual(c[1], act),
        *conv_bn(c[1], c[2], act), nn.MaxPool2d(2),
        *conv_bn(c[2], c[3], act), nn.MaxPool2d(2), Residual(c[3], act),
        nn.MaxPool2d(4), nn.Flatten(), nn.Linear(c[3], 10, bias=False), Mul(0.125))


def picard_resnet9(width):
    c = [max(1, round(b * width)) for b in (64, 128, 256, 256)]
    act = lambda: nn.CELU(alpha=0.1)
    return nn.Sequential(
        *conv_bn(3, c[0], act), nn.MaxPool2d(2),
        *conv_bn(c[0], c[1], act), nn.MaxPool2d(2), Residual(c[1], act),
        *conv_bn(c[1], c[2], act), nn.MaxPool2d(2),
        *conv_bn(c[2], c[3], act), nn.MaxPool2d(2), Residual(c[3], act),
        nn.AdaptiveMaxPool2d((1, 1)), nn.Flatten(), nn.Linear(c[3], 10, bias=False), Mul(0.1))


def normalise(x, dev, std):
    mean = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(std, device=dev).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


def piecewise_linear(t, knots, values):
    """np.interp for one point (core.py's PiecewiseLinear)."""
    if t <= knots[0]:
        return values[0]
    for (k0, v0), (k1, v1) in zip(zip(knots, values), zip(knots[1:], values[1:])):
        if t <= k1:
            return v0 + (v1 - v0) * (t - k0) / (k1 - k0)
    return values[-1]


class PageSGD(torch.optim.Optimizer):
    """cifar10-fast's nesterov_update: dw = -lr (g + wd w); v = m v + dw; w += dw + m v. An
    Optimizer, so that GradScaler can unscale and skip its steps on CUDA."""

    def __init__(self, params, momentum=0.9):
        super().__init__(params, dict(lr=0.0, weight_decay=0.0, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for w in g["params"]:
                if w.grad is None:
                    continue
                v = self.state[w].setdefault("v", torch.zeros_like(w))
                dw = w.grad.add(w, alpha=g["weight_decay"]).mul_(-g["lr"])
                v.mul_(g["momentum"]).add_(dw)
                w.add_(dw.add_(v, alpha=g["momentum"]))


class Recipe:
    """What the recipes share: plain evaluation, the loss's reduction, no per-step hooks."""
    summed = False
    loss_scaling = True

    def before_step(self):
        pass

    def after_step(self):
        pass

    def end_epoch(self):
        pass

    def logits(self, net, x, last):
        return net(x)


class Dawnbench(Recipe):
    std = PAGE_STD
    summed = True

    def __init__(self, a, xtr, dev):
        self.a, self.dev = a, dev
        self.net = page_resnet9(a.width)
        # Reflection padding of the raw images, then normalisation (dawn.py's preprocessing).
        self.train = normalise(F.pad(xtr.float(), (4, 4, 4, 4), mode="reflect"), dev, self.std)
        self.step_number = 0
        self.steps = xtr.shape[0] // a.batch_size
        self.r = torch.arange(32, device=dev)

    def make_optimiser(self, net):
        self.opt = PageSGD(net.parameters())

    def batches(self, gen):
        """Each image's own choices (Crop(32, 32), FlipLR(), Cutout(8, 8)), drawn per epoch."""
        n, b, dev = self.train.shape[0], self.a.batch_size, self.dev
        order = torch.randperm(n, generator=gen)
        draw = lambda hi: torch.randint(0, hi, (n, 1, 1, 1), generator=gen).to(dev)
        x0, y0, flip, cx, cy = draw(9), draw(9), draw(2).bool(), draw(32 - 8 + 1), draw(32 - 8 + 1)
        rows, cols = self.r.view(1, 1, 32, 1), self.r.view(1, 1, 1, 32)
        for s in range(n // b):
            idx = order[s * b:(s + 1) * b].to(dev)
            x = self.train[idx]
            x = x.gather(2, (rows + y0[idx]).expand(b, 3, 32, 40))
            x = x.gather(3, (cols + x0[idx]).expand(b, 3, 32, 32))
            x = torch.where(flip[idx], x.flip(-1), x)
            hole = ((rows >= cy[idx]) & (rows < cy[idx] + 8) & (cols >= cx[idx]) & (cols < cx[idx] + 8))
            yield x.masked_fill(hole, 0.0), idx

    def loss(self, logits, y):
        return F.cross_entropy(logits, y, reduction="none").sum()

    def before_step(self):
        self.step_number += 1
        t = self.step_number / self.steps
        lr = piecewise_linear(t, [0, 5 * self.a.epochs / 24, self.a.epochs], [0, 0.4, 0])
        for g in self.opt.param_groups:
            g["lr"], g["weight_decay"] = lr / self.a.batch_size, 5e-4 * self.a.batch_size


class PaperShort(Recipe):
    std = PICARD_STD
    def __init__(self, a, xtr, dev):
        self.a, self.dev = a, dev
        self.net = picard_resnet9(a.width)
        self.train = normalise(xtr, dev, self.std)

    def make_optimiser(self, net):
        self.opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9, nesterov=True,
                                   weight_decay=1e-3)

        def mult(e):
            return 0.5 * e / 3.0 + 0.01 if e < 4 else max(0.5 * (22 - e) / 19.0 + 0.01, 0.01)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, mult)

    def augment_chunk(self, x, gen):
        # torchvision RandomCrop(32, padding=(4, 4)) on a batch tensor: one offset for all.
        x = F.pad(x, (4, 4, 4, 4))
        i, j = torch.randint(0, 9, (2,), generator=gen).tolist()
        x = x[:, :, i:i + 32, j:j + 32]
        if torch.rand(1, generator=gen).item() < 0.5:  # RandomHorizontalFlip: one draw
            x = x.flip(-1)
        y, xc = torch.randint(0, 32, (2,), generator=gen).tolist()  # deepseed's Cutout(8, 8)
        mask = torch.ones((1, 1, 32, 32), device=x.device)
        mask[:, :, max(y - 4, 0):min(y + 4, 32), max(xc - 4, 0):min(xc + 4, 32)] = 0.0
        return x * mask

    def batches(self, gen):
        n, b = self.train.shape[0], self.a.batch_size
        # deepseed needs n divisible by 500 (CIFAR-10's 50,000 is); a partial last chunk gets
        # its own draws here, as in the worker, and every image can be drawn into a batch.
        chunks = [self.augment_chunk(self.train[c * b:(c + 1) * b], gen) for c in range(-(-n // b))]
        augmented = torch.cat(chunks)
        order = torch.randperm(augmented.shape[0], generator=gen)
        for s in range(n // b):
            idx = order[s * b:(s + 1) * b]
            yield augmented[idx.to(self.dev)], idx

    def loss(self, logits, y):
        return F.cross_entropy(logits, y) + 2 * F.cross_entropy(logits, y, label_smoothing=0.2)

    def end_epoch(self):
        self.sched.step()


class FixedScaleBN(nn.BatchNorm2d):
    """airbench's BatchNorm: the scale stays 1, the shift trains; airbench's momentum 0.6 is the
    share of the running statistics kept (PyTorch's 0.4)."""

    def __init__(self, c):
        super().__init__(c, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


def identity_start_conv(c_in, c_out):
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    k = min(c_in, c_out)
    with torch.no_grad():
        conv.weight[:k].zero_()
        conv.weight[torch.arange(k), torch.arange(k), 1, 1] = 1.0
    return conv


def airbench_net(width):
    c = [max(1, int(w * width + 0.5)) for w in (64, 256, 256)]

    def group(ci, co):
        return nn.Sequential(identity_start_conv(ci, co), nn.MaxPool2d(2), FixedScaleBN(co),
                             nn.GELU(), identity_start_conv(co, co), FixedScaleBN(co), nn.GELU())
    whiten = nn.Conv2d(3, 24, 2, bias=True)
    whiten.weight.requires_grad_(False)
    with torch.no_grad():
        whiten.bias.zero_()
    return nn.Sequential(whiten, nn.GELU(), group(24, c[0]), group(c[0], c[1]), group(c[1], c[2]),
                         nn.MaxPool2d(3), nn.Flatten(), nn.Linear(c[2], 10, bias=False),
                         Mul(1 / 9))


class Airbench94(Recipe):
    summed = True
    std = AIRBENCH_STD
    loss_scaling = False
    momentum, lr, wd, bias_scale, smoothing = 0.85, 11.5, 0.0153, 64.0, 0.2

    def __init__(self, a, xtr, dev):
        self.a, self.dev = a, dev
        self.net = airbench_net(a.width)
        x = normalise(xtr, dev, self.std)
        self.set_whitening(x[:5000])
        gen = a.generator
        first_flip = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(first_flip.to(dev).view(-1, 1, 1, 1), x.flip(-1), x)
        self.train = F.pad(x, (2, 2, 2, 2), mode="reflect")
        self.steps = xtr.shape[0] // a.batch_size
        self.total = math.ceil(self.steps * (a.epochs - 1 + 0.9))
        self.done, self.epoch = 0, 0
        self.r = torch.arange(32, device=dev)

    def set_whitening(self, x):
        """Two filters, v / sqrt(l + 5e-4) and its negation, per eigenvector v (eigenvalue l) of
        the 2x2x3 patches' second moment, largest l first."""
        p = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
        values, vectors = torch.linalg.eigh(p.T @ p / p.shape[0])
        order = values.argsort(descending=True)
        filters = (vectors[:, order].T / (values[order] + 5e-4).sqrt().view(-1, 1))
        filters = filters.reshape(12, 3, 2, 2)
        with torch.no_grad():
            self.net[0].weight.copy_(torch.cat([filters, -filters]))

    def make_optimiser(self, net):
        kilostep = 1024 * (1 + 1 / (1 - self.momentum))
        lr = self.lr / kilostep
        wd = self.wd * self.a.batch_size / kilostep
        norm = [m.bias for m in net.modules() if isinstance(m, FixedScaleBN)]
        ids = {id(p) for p in norm}
        rest = [p for p in net.parameters() if p.requires_grad and id(p) not in ids]
        lr_b = lr * self.bias_scale
        self.opt = torch.optim.SGD([dict(params=norm, lr=lr_b, weight_decay=wd / lr_b),
                                    dict(params=rest, lr=lr, weight_decay=wd / lr)],
                                   momentum=self.momentum, nesterov=True)
        warm = int(self.total * 0.23)

        def factor(s):
            if s < warm:
                return 0.2 + 0.8 * s / warm
            f = (s - warm) / (self.total - warm)
            return 1.0 - 0.93 * f
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
        self.averages = {k: v.detach().clone() for k, v in net.state_dict().items()
                         if v.is_floating_point()}
        self.state = net.state_dict()

    def batches(self, gen):
        n, b, dev = self.train.shape[0], self.a.batch_size, self.dev
        self.net[0].bias.requires_grad_(self.epoch < 3)
        order = torch.randperm(n, generator=gen)
        shifts = torch.randint(0, 5, (n, 2, 1, 1, 1), generator=gen).to(dev)
        rows, cols = self.r.view(1, 1, 32, 1), self.r.view(1, 1, 1, 32)
        odd = self.epoch % 2 == 1
        for s in range(self.steps):
            if self.done >= self.total:
                return
            idx = order[s * b:(s + 1) * b].to(dev)
            x = self.train[idx]
            x = x.gather(2, (rows + shifts[idx, 0]).expand(b, 3, 32, 36))
            x = x.gather(3, (cols + shifts[idx, 1]).expand(b, 3, 32, 32))
            yield (x.flip(-1) if odd else x), idx

    def loss(self, logits, y):
        return F.cross_entropy(logits, y, label_smoothing=self.smoothing, reduction="none").sum()

    @torch.no_grad()
    def average(self, decay):
        for k, avg in self.averages.items():
            avg.lerp_(self.state[k], 1 - decay)
            self.state[k].copy_(avg)

    def after_step(self):
        self.sched.step()
        self.done += 1
        if self.done % 5 == 0:
            self.average(0.95 ** 5 * (self.done / self.total) ** 3)
        if self.done == self.total:
            self.average(1.0)

    def end_epoch(self):
        self.epoch += 1

    def logits(self, net, x, last):
        if not last:
            return net(x)

        def mirror(v):
            return 0.5 * net(v) + 0.5 * net(v.flip(-1))
        p = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return 0.5 * mirror(x) + 0.25 * mirror(p[:, :, :32, :32]) + 0.25 * mirror(p[:, :, 2:, 2:])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset folder holding cifar-10-batches-bin/")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="dawnbench")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="train a torch.compile of the net")
    a = p.parse_args()
    r = dict(RECIPES[a.recipe])
    for k in ("epochs", "batch_size", "precision"):
        if getattr(a, k) is not None:
            r[k] = getattr(a, k)
    for k, v in r.items():
        setattr(a, k, v)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    amp = cuda and a.precision != "fp32"
    amp_dtype = torch.bfloat16 if a.precision == "bf16" else torch.float16
    fmt = torch.channels_last if (cuda and a.channels_last) else torch.contiguous_format

    folder = os.path.join(a.data, "cifar-10-batches-bin")
    xtr, ytr = read_split(folder, [f"data_batch_{i}.bin" for i in range(1, 6)])
    xte, yte = read_split(folder, ["test_batch.bin"])
    a.batch_size = min(a.batch_size, xtr.shape[0])
    xtr, ytr, xte, yte = xtr.to(dev), ytr.to(dev), xte.to(dev), yte.to(dev)

    torch.manual_seed(a.seed)
    gen = a.generator = torch.Generator().manual_seed(a.seed)
    kind = {"dawnbench": Dawnbench, "paper-short": PaperShort, "airbench94": Airbench94}
    recipe = kind[a.recipe](a, xtr, dev)
    test = normalise(xte, dev, recipe.std)
    net = recipe.net.to(dev).to(memory_format=fmt)
    recipe.make_optimiser(net)
    run = torch.compile(net) if a.compile else net
    scaler = torch.amp.GradScaler("cuda", enabled=amp and a.precision == "fp16"
                                  and recipe.loss_scaling)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for epoch in range(1, a.epochs + 1):
        sync()
        started = time.perf_counter()
        net.train()
        losses, seen = [], 0
        for x, idx in recipe.batches(gen):
            x = x.contiguous(memory_format=fmt)
            y = ytr[idx.to(dev)]
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
                logits = run(x).float()
                loss = recipe.loss(logits, y)
            recipe.opt.zero_grad(set_to_none=True)
            recipe.before_step()
            scaler.scale(loss).backward()
            scaler.step(recipe.opt)
            scaler.update()
            recipe.after_step()
            b = y.shape[0]
            mean = loss.detach() / b if recipe.summed else loss.detach()
            losses.append(mean * b)
            seen += b
        recipe.end_epoch()
        net.eval()
        correct = torch.zeros((), device=dev, dtype=torch.long)
        with torch.no_grad(), torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
            for lo in range(0, test.shape[0], 1000):
                x = test[lo:lo + 1000].contiguous(memory_format=fmt)
                logits = recipe.logits(run, x, epoch == a.epochs)
                correct += (logits.argmax(-1) == yte[lo:lo + 1000]).sum()
        acc = correct.item() / test.shape[0]
        train_loss = torch.stack(losses).sum().item() / seen
        sync()
        seconds = time.perf_counter() - started
        print(json.dumps(dict(epoch=epoch, seconds=seconds, train_loss=train_loss,
                              test_accuracy=acc, images_per_second=seen / seconds)), flush=True)


if __name__ == "__main__":
    main()
