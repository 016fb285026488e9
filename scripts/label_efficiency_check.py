"""The label-efficiency stage's solver against today's, on real Fashion-MNIST features.

    python scripts/label_efficiency_check.py [--iters 150 100 75 50] [--joint-iters 150 300] [--device cpu]

For raw pixels and the random-conv controls at 128 and 384 dimensions (three of the report's readouts), with
the report's first class-balanced draws (seeds 0..LABEL_DRAWS-1) of 100 and 1,000 labels: the mean accuracy of the
per-draw ``linear_probe`` at each ``--iters`` and of the joint ``linear_probes`` at each ``--joint-iters``,
the largest distance of any readout's mean from the per-draw probe at 150 iterations (the report's), and the
seconds. docs/ABLATIONS.md ("The label-efficiency stage") holds a run of it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fastsemdiff import baselines  # noqa: E402
from fastsemdiff.config import DataConfig  # noqa: E402
from fastsemdiff.data import load_split  # noqa: E402
from fastsemdiff.eval import LABEL_DRAWS  # noqa: E402
from fastsemdiff.probe import linear_probe, linear_probes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, nargs="*", default=[150, 100, 75, 50])
    parser.add_argument("--joint-iters", type=int, nargs="*", default=[150, 300])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--path", default=DataConfig().path)
    args = parser.parse_args()
    dev = torch.device(args.device)
    train, train_y = load_split("fashion-mnist", args.path, "train", 28, 1)
    test, test_y = load_split("fashion-mnist", args.path, "test", 28, 1)
    feats = {"pixels": (baselines.pixel_features(train, dev), baselines.pixel_features(test, dev))}
    for width in (128, 384):
        feats[f"random conv {width}-d"] = (baselines.random_conv_features(train, width, dev),
                                           baselines.random_conv_features(test, width, dev))
    draws = [baselines.label_subsets(train_y, (100, 1000), seed=s) for s in range(LABEL_DRAWS)]
    names = list(feats)
    for n in (100, 1000):
        ref = None
        runs = [("per-draw", 150)] + [("per-draw", it) for it in args.iters if it != 150]  # the reference first
        runs += [("joint", it) for it in args.joint_iters]
        for kind, it in runs:
            start = time.perf_counter()
            if kind == "per-draw":
                accs = [linear_probe(feats[k][0][d[n]], train_y[d[n]], feats[k][1], test_y, num_classes=10,
                                     max_iter=it)["top1"] for k in names for d in draws]
            else:
                accs = linear_probes([(feats[k][0][d[n]], train_y[d[n]]) for k in names for d in draws],
                                     [(feats[k][1], test_y) for k in names for _ in draws], 10, max_iter=it)
            seconds = time.perf_counter() - start
            means = {k: sum(accs[i * LABEL_DRAWS:(i + 1) * LABEL_DRAWS]) / LABEL_DRAWS for i, k in enumerate(names)}
            if (kind, it) == ("per-draw", 150):
                ref = means
            worst = max(abs(means[k] - ref[k]) for k in names) if ref else float("nan")
            print(f"{n} labels, {kind} {it} iterations: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items())
                  + f"; worst distance from per-draw 150: {worst:.3f}; {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
