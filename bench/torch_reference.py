#!/usr/bin/env python3
"""The worker's training recipe in PyTorch eager, for side-by-side timing (bench/train_cpu.sh,
bench/gpu.sh).

It trains on the same CIFAR-10-layout files with the same network, recipe and pipeline as
worker/src/train.rs: the training set on the device as uint8; each epoch's order and per-image
crop, flip and cutout draws made at once and uploaded; per batch, gather, normalise, crop (two
gathers), flip, cut out, forward, backward, SGD step (torch.optim.SGD, Nesterov); evaluation on the
test set in batches of 1000. It prints one JSON line per epoch: epoch, seconds (training plus
evaluation, as the worker's epoch_metrics.seconds), train_loss, test_accuracy, images_per_second.

It draws from torch generators, not the worker's ChaCha streams, so its numbers are not the
worker's numbers bit for bit; only the work done is the same.

    python3 bench/torch_reference.py --data DATA_DIR/NAME --recipe dawnbench --epochs 3 --threads 2
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
RECIPES = {
    # The coordinator's recipes (coordinator/src/spec.rs).
    "dawnbench": dict(model="resnet9", epochs=24, batch_size=512, lr=0.4, schedule="linear",
                      weight_decay=5e-4, label_smoothing=0.0, smoothed_weight=0.0, cutout=8,
                      precision="fp16", channels_last=True),
    "paper-short": dict(model="resnet9-skinny", epochs=22, batch_size=500, lr=0.2,
                        schedule="picard", weight_decay=1e-3, label_smoothing=0.0,
                        smoothed_weight=2.0, cutout=8, precision="fp16", channels_last=True),
}


def read_split(folder, names):
    raw = b"".join(open(os.path.join(folder, n), "rb").read() for n in names)
    if len(raw) % 3073:
        sys.exit(f"error: {folder}: files are not whole 3073-byte records")
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, 3073)
    return t[:, 1:].reshape(-1, 3, 32, 32).clone(), t[:, 0].long().clone()


def conv_bn(c_in, c_out, act, pool):
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), act()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, c, act):
        super().__init__()
        self.body = nn.Sequential(conv_bn(c, c, act, False), conv_bn(c, c, act, False))

    def forward(self, x):
        return x + self.body(x)


def resnet9(model, width):
    skinny = model == "resnet9-skinny"
    base = (64, 128, 256, 256) if skinny else (64, 128, 256, 512)
    c = [max(1, round(b * width)) for b in base]
    act = (lambda: nn.CELU(0.1)) if skinny else (lambda: nn.ReLU())
    scale = 0.1 if skinny else 0.125
    return nn.Sequential(
        conv_bn(3, c[0], act, skinny),
        conv_bn(c[0], c[1], act, True), Residual(c[1], act),
        conv_bn(c[1], c[2], act, True),
        conv_bn(c[2], c[3], act, True), Residual(c[3], act),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        nn.Linear(c[3], 10, bias=False),
        Scale(scale),
    )


class Scale(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        return x * self.s


def learning_rate(a, epoch, step, steps):
    if a.schedule == "linear":
        t = epoch - 1 + (step + 1) / steps
        peak, end = a.epochs * 5 / 24, a.epochs
        f = t / peak if t < peak else ((end - t) / (end - peak) if end > peak else 1.0)
        return a.lr * min(max(f, 0.0), 1.0)
    e = epoch - 1
    m = 0.5 * e / 3 + 0.01 if e < 4 else (0.5 * (22 - e) / 19 + 0.01 if e < 22 else 0.01)
    return a.lr * m


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
    xtr, ytr, xte, yte = xtr.to(dev), ytr.to(dev), xte.to(dev), yte.to(dev)
    mean = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=dev).view(1, 3, 1, 1)
    rows = torch.arange(32, device=dev).view(1, 1, 32, 1)
    cols = torch.arange(32, device=dev).view(1, 1, 1, 32)

    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    net = resnet9(a.model, a.width).to(dev).to(memory_format=fmt)
    opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9, nesterov=True,
                          weight_decay=a.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and a.precision == "fp16")
    n = xtr.shape[0]
    batch = min(a.batch_size, n)
    steps = (n + batch - 1) // batch
    pad, cut = 4, a.cutout

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for epoch in range(1, a.epochs + 1):
        sync()
        started = time.perf_counter()
        order = torch.randperm(n, generator=gen).to(dev)
        crop = torch.randint(0, 2 * pad + 1, (2, n), generator=gen).to(dev)
        flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
        cuts = torch.randint(0, 32 - cut + 1, (2, n), generator=gen).to(dev)
        net.train()
        loss_sum = torch.zeros((), device=dev)
        for step in range(steps):
            lo = step * batch
            idx = order[lo:lo + batch]
            b = idx.shape[0]
            x = (xtr[idx].float() / 255 - mean) / std
            x = F.pad(x, (pad, pad, pad, pad))
            dy = crop[0, lo:lo + b].view(b, 1, 1, 1)
            dx = crop[1, lo:lo + b].view(b, 1, 1, 1)
            x = x.gather(2, (rows + dy).expand(b, 3, 32, 32 + 2 * pad))
            x = x.gather(3, (cols + dx).expand(b, 3, 32, 32))
            x = torch.where(flip[lo:lo + b].view(b, 1, 1, 1), x.flip(3), x)
            if cut:
                cy = cuts[0, lo:lo + b].view(b, 1, 1, 1)
                cx = cuts[1, lo:lo + b].view(b, 1, 1, 1)
                hole = (rows >= cy) & (rows < cy + cut) & (cols >= cx) & (cols < cx + cut)
                x = x.masked_fill(hole, 0.0)
            x = x.contiguous(memory_format=fmt)
            y = ytr[idx]
            for g in opt.param_groups:
                g["lr"] = learning_rate(a, epoch, step, steps)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
                logits = net(x).float()
                loss = F.cross_entropy(logits, y, label_smoothing=a.label_smoothing)
                if a.smoothed_weight:
                    loss = loss + a.smoothed_weight * F.cross_entropy(logits, y, label_smoothing=0.2)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss_sum += loss.detach() * b
        net.eval()
        correct = torch.zeros((), device=dev, dtype=torch.long)
        with torch.no_grad(), torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
            for lo in range(0, xte.shape[0], 1000):
                x = ((xte[lo:lo + 1000].float() / 255 - mean) / std).contiguous(memory_format=fmt)
                correct += (net(x).argmax(-1) == yte[lo:lo + 1000]).sum()
        acc = correct.item() / xte.shape[0]
        train_loss = loss_sum.item() / n
        sync()
        seconds = time.perf_counter() - started
        print(json.dumps(dict(epoch=epoch, seconds=seconds, train_loss=train_loss,
                              test_accuracy=acc, images_per_second=n / seconds)), flush=True)


if __name__ == "__main__":
    main()
