#!/usr/bin/env python
"""Input-level backdoor detectors on stored attacks: python scripts/compare_detectors.py <attackid>... <device>
[--detectors strip,sentinet,februus] [--clean-images 500] [--testing-size N] [--merge | --force] [--save_path output]

Per attack, for its manipulated model and its clean base model (the control): every detector (STRIP, SentiNet,
Februus-style purification; bnbackdoor.detectors) calibrated on clean TRAINING images at a 5 % false-positive
rate, measured on the attack's test images: detection rate on triggered images, FPR on clean ones, IoU of the
located region with the trigger, attack success and clean accuracy after Februus. Prints one table per attack;
writes <save_path>/detectors_<id>.json.
"""
from __future__ import annotations

from bnbackdoor.cli import ArgumentParser, clean_model_option, common_options, positive_int
from bnbackdoor.evaluation.detectors import DEFAULT_CLEAN_IMAGES, compare_detectors
from bnbackdoor.detectors import parse_detectors
from bnbackdoor.device import parse_device
from bnbackdoor.errors import kept_on_interrupt, run_cli


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("attackids", nargs="+", metavar="attackid", help="stored attack ids (manipulated_models/<id>)")
    p.add_argument("device", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--detectors", default=None, metavar="A,B,...",
                   help="detectors to run (default: every registered one); a detector with options as "
                        "name:option=value, e.g. strip:n_perturb=16")
    p.add_argument("--clean-images", type=positive_int, default=DEFAULT_CLEAN_IMAGES, metavar="N",
                   help="clean training images the defender gets, half reference, half held out for the "
                        "threshold (default %(default)s)")
    p.add_argument("--testing-size", type=positive_int, default=None, metavar="N",
                   help="test images to evaluate on (default: the attack's testing_size)")
    p.add_argument("--batchsize", "--batch-size", dest="batchsize", type=positive_int, default=100,
                   help="inputs per detector batch (default 100)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of an existing detectors_<id>.json that this run does not recompute")
    clean_model_option(p)
    p.add_argument("--force", action="store_true",
                   help="replace an existing detectors_<id>.json (and its other files) instead of refusing")
    common_options(p)
    a = p.parse_args()
    if a.merge and a.force:
        p.error("--merge keeps the stored rows and --force replaces them; give one of them")
    device = parse_device(a.device)
    detectors = parse_detectors(a.detectors)  # fail before any work
    done: list[str] = []
    for attackid in a.attackids:
        with kept_on_interrupt(done, attackid, a.attackids, a.save_path, "detectors"):
            cmp = compare_detectors(attackid, device, detectors=detectors, clean_images=a.clean_images,
                                    testing_size=a.testing_size, batch_size=a.batchsize, seed=a.seed,
                                    data_root=a.data_root, save_path=a.save_path, clean_model=a.clean_model,
                                    merge=a.merge, force=a.force)
            print(f"attack {cmp.name} ({cmp.params.attack_name}, {cmp.params.explanation_methodStr}): "
                  f"{cmp.test['images']} test images, {cmp.defender_data['images']} clean training images")
            print(cmp.table())
            print(f"-> {', '.join(map(str, cmp.files))} ({cmp.seconds:.0f} s)\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
