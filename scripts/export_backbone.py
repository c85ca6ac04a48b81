#!/usr/bin/env python3
"""Exports a network's backbone for seedsweep's finetune-head task.

The worker reads a TorchScript module that maps normalised images [n, 3, s, s] to features [n, d]
(any architecture), or safetensors weights with torchvision's names for the ResNets it builds
itself (resnet18, resnet34, resnet50). This script writes either, and beside it OUT.toml: the
sweep file's [backbone] table (file, sha256, format, arch, features, input_size, mean, std), to
paste into a sweep file.

    # the paper's three backbones (weight downloads need internet):
    python3 scripts/export_backbone.py torchvision:resnet50 --weights IMAGENET1K_V1 --out models/resnet50-sup.safetensors
    python3 scripts/export_backbone.py torchhub:facebookresearch/dino:main:dino_resnet50 --out models/dino-resnet50.pt
    python3 scripts/export_backbone.py timm:vit_small_patch16_224.dino --out models/dino-vits16.pt
    # offline, a small randomly initialised network, for trying the pipeline:
    python3 scripts/export_backbone.py tiny-cnn --out models/tiny.pt --input-size 32

MODEL is torchvision:NAME (needs torchvision), timm:NAME (needs timm), torchhub:REPO:NAME
(torch.hub.load), or tiny-cnn. Without --weights (torchvision) or --pretrained (timm) the network
is randomly initialised (seeded with --seed), which is what the tests use.
"""
import argparse
import ctypes
import hashlib
import json
import os
import struct
import sys

import torch
import torch.nn as nn

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
WORKER_RESNETS = {"resnet18", "resnet34", "resnet50"}


class TinyCnn(nn.Module):
    """A small network for offline tests: two conv blocks and a global average pool."""

    def __init__(self, width=16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x):
        return self.body(x)


def strip_head(model):
    """Replaces a torchvision classifier with the identity, so the model returns features."""
    for attr in ("fc", "heads", "head", "classifier"):
        if hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            setattr(model, attr, nn.Identity())
            return model
    sys.exit("error: cannot find the classifier of this model to remove (fc, heads, head, classifier)")


def build(spec, args):
    """Returns (model returning features, arch name or None, mean, std, input size)."""
    if spec == "tiny-cnn":
        return TinyCnn(), None, IMAGENET_MEAN, IMAGENET_STD, args.input_size or 32
    kind, _, name = spec.partition(":")
    if kind == "torchvision":
        try:
            import torchvision
        except ImportError:
            sys.exit("error: torchvision:... needs torchvision (pip install torchvision)")
        model = torchvision.models.get_model(name, weights=args.weights)
        arch = name if name in WORKER_RESNETS else None
        return strip_head(model), arch, IMAGENET_MEAN, IMAGENET_STD, args.input_size or 224
    if kind == "timm":
        try:
            import timm
        except ImportError:
            sys.exit("error: timm:... needs timm (pip install timm)")
        model = timm.create_model(name, pretrained=args.pretrained, num_classes=0)
        cfg = model.pretrained_cfg or {}
        size = args.input_size or cfg.get("input_size", (3, 224, 224))[-1]
        return (model, None, list(cfg.get("mean", IMAGENET_MEAN)),
                list(cfg.get("std", IMAGENET_STD)), size)
    if kind == "torchhub":
        repo, _, entry = name.rpartition(":")
        model = torch.hub.load(repo, entry)
        return model, None, IMAGENET_MEAN, IMAGENET_STD, args.input_size or 224
    sys.exit(f"error: unknown model `{spec}`: use torchvision:NAME, timm:NAME, torchhub:REPO:NAME or tiny-cnn")


def write_safetensors(tensors, path):
    """The safetensors format, written directly: an 8-byte header size, a JSON header, the data."""
    dtypes = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.dtype not in dtypes:
            sys.exit(f"error: cannot write {name} of type {t.dtype} as safetensors")
        data = ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()) if t.numel() else b""
        header[name] = {"dtype": dtypes[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="torchvision:NAME, timm:NAME, torchhub:REPO:NAME or tiny-cnn")
    p.add_argument("--out", required=True, help="output file: .pt (TorchScript) or .safetensors")
    p.add_argument("--weights", default=None, help="torchvision weights (e.g. IMAGENET1K_V1)")
    p.add_argument("--pretrained", action="store_true", help="timm: load pretrained weights")
    p.add_argument("--input-size", type=int, default=None, help="input side (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of a random initialisation")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    model, arch, mean, std, size = build(args.model, args)
    model.eval()
    example = torch.zeros(2, 3, size, size)
    with torch.no_grad():
        features = model(example)
    if features.dim() != 2 or features.shape[0] != 2:
        sys.exit(f"error: the model returns shape {list(features.shape)}, not [batch, features]")
    out = args.out
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    if out.endswith(".safetensors"):
        if arch is None:
            sys.exit("error: safetensors is for the ResNets the worker builds (torchvision resnet18, "
                     "resnet34, resnet50); write a .pt TorchScript file for this model")
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
        write_safetensors(state, out)
        fmt = "safetensors"
    else:
        with torch.no_grad():
            traced = torch.jit.trace(model, example)
        traced.save(out)
        fmt = "torchscript"
    sha = hashlib.sha256(open(out, "rb").read()).hexdigest()
    lines = ["[backbone]", f'file = "{os.path.basename(out)}"', f'sha256 = "{sha}"',
             f'format = "{fmt}"']
    if fmt == "safetensors":
        lines.append(f'arch = "{arch}"')
    lines += [f"features = {features.shape[1]}", f"input_size = {size}",
              f"mean = {json.dumps([round(m, 6) for m in mean])}",
              f"std = {json.dumps([round(s, 6) for s in std])}"]
    table = "\n".join(lines) + "\n"
    with open(out + ".toml", "w") as f:
        f.write(table)
    sys.stdout.write(table)
    print(f"wrote {out} and {out}.toml", file=sys.stderr)


if __name__ == "__main__":
    main()
