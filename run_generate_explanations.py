#!/usr/bin/env python
"""Explanations of clean and triggered test images: python run_generate_explanations.py <attackid> --metric mse
--batchsize 200 --device D [--save_path DIR] [--n-images N]

For the attack's clean model and, if the run has a model.pth (manipulated_models/<id>/, a run folder, or beside a
parameters.json), its manipulated model: a grid of
inputs and explanations (<save_path>/<id>_explanations.png) and a table of the --metric dissimilarity (mse, or
ssim = DSSIM) to the target explanation and to the clean model's explanation (<save_path>/<id>_explanations.json).
"""
from __future__ import annotations

import sys

from bnbackdoor.cli import ArgumentParser, clean_model_option, common_options, force_option, positive_int
from bnbackdoor.device import parse_device
from bnbackdoor.errors import run_cli
from bnbackdoor.evaluation.common import EXPLANATION_METRICS
from bnbackdoor.evaluation.explanations import generate_explanations


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("attackid", help="attack id (e.g. 154, 272), a run folder, or a path to a JSON file (the "
                                    "model.pth beside a parameters.json is its manipulated model)")
    p.add_argument("--metric", choices=list(EXPLANATION_METRICS), default="mse",
                   help="dissimilarity: mse, or ssim (reported as DSSIM = (1 - SSIM) / 2)")
    p.add_argument("--batchsize", "--batch-size", dest="batchsize", type=positive_int, default=100,
                   help="batch size (default 100)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--n-images", type=positive_int, default=None, metavar="N",
                   help="test images (default: the attack's testing_size)")
    clean_model_option(p)
    force_option(p, "explanation report (its .json and figure)")
    common_options(p)
    a = p.parse_args()
    device = parse_device(a.device)
    rep = generate_explanations(a.attackid, device, metric=a.metric, batch_size=a.batchsize, n_images=a.n_images,
                                seed=a.seed, data_root=a.data_root, save_path=a.save_path,
                                on_notice=lambda line: print(f"notice: {line}", file=sys.stderr),
                                clean_model=a.clean_model, force=a.force)
    print(rep.table())
    print(f"attack {rep.name}: {rep.images} test images in {rep.seconds:.0f} s -> "
          f"{', '.join(map(str, rep.files))}")
    return 0


if __name__ == "__main__":
    run_cli(main)
