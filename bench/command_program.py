"""A stand-in training program for bench/command.sh: 24 epochs of 50 ms each, reported through
the seedsweep helper, then the final result with a 10,000-example correctness bitmap (what a real
CIFAR-10 program reports), so that what is measured around it is seedsweep's cost per run."""

import time

import seedsweep

s = seedsweep.seeds()
for epoch in range(1, 25):
    time.sleep(0.05)
    acc = 0.5 + 0.4 * epoch / 24
    seedsweep.log_epoch(epoch, train_loss=1.0 / epoch, train_accuracy=acc, lr=0.4 * (1 - epoch / 24),
                        test_loss=0.3, test_accuracy=acc)
right = [(i * 7919 + s.seed) % 10000 < int(acc * 10000) for i in range(10000)]
seedsweep.finish(test_accuracy=acc, correct=right)
