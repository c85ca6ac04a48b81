"""Report a training run's metrics to the seedsweep worker that runs it.

The worker runs the program of a `task = "command"` sweep with, in its environment, the run's
seeds (SEEDSWEEP_SEED, SEEDSWEEP_INIT_SEED, ...) and SEEDSWEEP_METRICS_FILE, a file to which
this module appends one JSON object per line: one per epoch (`log_epoch`), then the final result
(`finish`). Outside seedsweep the reports go to stderr.
"""

import base64
import json
import math
import os
import sys
from typing import Iterable, NamedTuple, Optional

__all__ = ["Seeds", "seeds", "log_epoch", "finish"]


class Seeds(NamedTuple):
    """The run's seed and the seed of each source of randomness (README, "Seed factors")."""

    seed: int
    init: int
    order: int
    augment: int
    split: int


def seeds() -> Seeds:
    """The seeds the worker gave this run (all the run's seed when run by hand)."""
    seed = _int_env("SEEDSWEEP_SEED", 0)
    return Seeds(
        seed=seed,
        init=_int_env("SEEDSWEEP_INIT_SEED", seed),
        order=_int_env("SEEDSWEEP_ORDER_SEED", seed),
        augment=_int_env("SEEDSWEEP_AUGMENT_SEED", seed),
        split=_int_env("SEEDSWEEP_SPLIT_SEED", seed),
    )


def log_epoch(epoch: int, **metrics: float) -> None:
    """Reports epoch `epoch` (1, 2, ...): numbers only, by name (train_loss, test_accuracy, ...;
    any other name is kept as a custom metric)."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise ValueError(f"epoch must be a whole number from 1, not {epoch!r}")
    _write({"epoch": epoch, **_numbers(metrics)})


def finish(correct: Optional[Iterable[bool]] = None, **metrics: float) -> None:
    """Reports the run's final result: its metrics and, optionally, which test examples the last
    evaluation got right (`correct`, one truth value per example in a fixed order), for the
    test-set statistics."""
    line = {"final": True, **_numbers(metrics)}
    if correct is not None:
        right = [bool(c) for c in correct]
        bits = bytearray((len(right) + 7) // 8)
        for i, ok in enumerate(right):
            if ok:
                bits[i // 8] |= 1 << (i % 8)
        line["examples"] = len(right)
        line["correct"] = base64.b64encode(bytes(bits)).decode("ascii")
    _write(line)


def _numbers(metrics: dict) -> dict:
    out = {}
    for name, value in metrics.items():
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"metric {name} must be a number, not {value!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"metric {name} is {value}: report finite numbers only")
        out[name] = value
    return out


def _int_env(name: str, default: int) -> int:
    text = os.environ.get(name)
    return default if text is None else int(text)


_out = None


def _write(line: dict) -> None:
    global _out
    if _out is None:
        path = os.environ.get("SEEDSWEEP_METRICS_FILE")
        _out = open(path, "a", buffering=1, encoding="utf-8") if path else sys.stderr
    _out.write(json.dumps(line, separators=(",", ":")) + "\n")
    _out.flush()
