"""A researcher's own training script under seedsweep (task = "command"): a small convolutional
network trained with PyTorch on a dataset in the CIFAR-10 binary layout, reporting each epoch and
its final result through the `seedsweep` helper (python/ in the repository).

    python3 train.py --data DATA_DIR/NAME [--epochs 4] [--width 16] [--batch 128] [--lr 0.05]

Every source of randomness derives from the run's seeds: the weights from the init seed, the order
of the examples from the order seed, the flips from the augment seed. On a CPU with one thread the
same seeds give the same numbers, bit for bit.
"""

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

import seedsweep

RECORD = 1 + 3 * 32 * 32


def load(path):
    """Images (N, 3, 32, 32) in [0, 1] and labels of one or more CIFAR-layout batch files."""
    raw = b"".join(open(p, "rb").read() for p in path)
    if len(raw) == 0 or len(raw) % RECORD:
        sys.exit(f"{path}: not CIFAR-10 binary records of {RECORD} bytes")
    rows = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(-1, RECORD)
    x = rows[:, 1:].reshape(-1, 3, 32, 32).float() / 255.0
    return x, rows[:, 0].long()


def network(width, classes):
    w = width
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, w, 3, padding=1), torch.nn.BatchNorm2d(w), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(w, 2 * w, 3, padding=1), torch.nn.BatchNorm2d(2 * w), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(2 * w, 4 * w, 3, padding=1), torch.nn.BatchNorm2d(4 * w), torch.nn.ReLU(),
        torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(4 * w, classes),
    )


def evaluate(model, x, y, batch):
    """The test loss, accuracy, expected calibration error and per-example correctness."""
    model.eval()
    losses, right, confidence = [], [], []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = model(x[i:i + batch])
            losses.append(F.cross_entropy(out, y[i:i + batch], reduction="sum"))
            right.append(out.argmax(1) == y[i:i + batch])
            confidence.append(out.softmax(1).max(1).values)
    right, confidence = torch.cat(right), torch.cat(confidence)
    return (float(sum(losses)) / len(x), float(right.float().mean()),
            calibration_error(confidence, right), right.tolist())


def calibration_error(confidence, right, bins=15):
    """Expected calibration error: the gap between confidence and accuracy, averaged over 15
    equal-width confidence bins weighted by their share of the examples (Guo et al., 2017)."""
    which = (confidence * bins).long().clamp(max=bins - 1)
    gap = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            gap += float(inside.float().mean()) * abs(
                float(confidence[inside].mean()) - float(right[inside].float().mean()))
    return gap


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="the dataset folder (holding cifar-10-batches-bin/)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    folder = os.path.join(args.data, "cifar-10-batches-bin")
    train = [os.path.join(folder, f"data_batch_{i}.bin") for i in range(1, 6)]
    x, y = load(train)
    tx, ty = load([os.path.join(folder, "test_batch.bin")])
    classes = int(max(y.max(), ty.max())) + 1
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    x, tx = (x - mean) / std, (tx - mean) / std

    s = seedsweep.seeds()
    torch.manual_seed(s.init)
    model = network(args.width, classes)
    order = torch.Generator().manual_seed(s.order)
    flips = torch.Generator().manual_seed(s.augment)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    steps = args.epochs * math.ceil(len(x) / args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)

    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(len(x), generator=order)
        loss_sum, right = 0.0, 0
        for i in range(0, len(x), args.batch):
            idx = perm[i:i + args.batch]
            xb, yb = x[idx], y[idx]
            flip = torch.rand(len(idx), generator=flips) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss) * len(idx)
            right += int((out.argmax(1) == yb).sum())
        test_loss, test_accuracy, test_ece, correct = evaluate(model, tx, ty, 1000)
        # test_ece is not one of seedsweep's metrics: it is kept as a custom metric.
        seedsweep.log_epoch(epoch, train_loss=loss_sum / len(x), train_accuracy=right / len(x),
                            lr=sched.get_last_lr()[0], test_loss=test_loss,
                            test_accuracy=test_accuracy, test_ece=test_ece)
    seedsweep.finish(test_accuracy=test_accuracy, test_loss=test_loss,
                     train_loss=loss_sum / len(x), train_accuracy=right / len(x),
                     correct=correct)


if __name__ == "__main__":
    main()
