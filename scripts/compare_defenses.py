#!/usr/bin/env python
"""Compare defenses on stored attacks: python scripts/compare_defenses.py <attackid>... <device>
[--clean-images 100,500,2000] [--defenses a,b:opt=v,...] [--merge | --force] [--save_path output]

Per attack: every defense (default: every registered one that yields a fixed model) on labelled clean TRAINING
subsets of each size (nested), measured on the attack's test images: clean accuracy, attack success, untriggered
target rate (where reported), DSSIM to the target explanation and to the clean model's explanation, and the
defense's seconds. Prints one table per attack; writes <save_path>/defenses_<id>.{json,csv,png}.
"""
from __future__ import annotations

from bnbackdoor.cli import ArgumentParser, clean_model_option, common_options, positive_int
from bnbackdoor.evaluation.compare_defenses import DEFAULT_SIZES, compare_defenses, parse_clean_images
from bnbackdoor.device import parse_device
from bnbackdoor.errors import kept_on_interrupt, run_cli


def main() -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("attackids", nargs="+", metavar="attackid", help="stored attack ids (manipulated_models/<id>)")
    p.add_argument("device", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--clean-images", default=",".join(map(str, DEFAULT_SIZES)), metavar="N,N,...",
                   help="clean training-set sizes the defender gets (default %(default)s)")
    p.add_argument("--defenses", default=None, metavar="A,B,...",
                   help="defenses to compare (default: every registered non-transductive one); a defense with "
                        "options as name:option=value, e.g. finetune:freeze_bn_stats=true")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of an existing defenses_<id>.json that this run does not recompute")
    p.add_argument("--testing-size", type=positive_int, default=None, metavar="N",
                   help="test images to evaluate on (default: the attack's testing_size)")
    p.add_argument("--batchsize", "--batch-size", dest="batchsize", type=positive_int, default=100,
                   help="evaluation batch size (default 100)")
    clean_model_option(p)
    p.add_argument("--force", action="store_true",
                   help="replace an existing defenses_<id>.json (and its other files) instead of refusing")
    common_options(p)
    a = p.parse_args()
    if a.merge and a.force:
        p.error("--merge keeps the stored rows and --force replaces them; give one of them")
    device = parse_device(a.device)
    sizes = parse_clean_images(a.clean_images)  # fail before any work (compare_defenses reads --defenses first)
    done: list[str] = []
    for attackid in a.attackids:
        with kept_on_interrupt(done, attackid, a.attackids, a.save_path, "defenses"):
            cmp = compare_defenses(attackid, device, clean_images=sizes, defenses=a.defenses,
                                   testing_size=a.testing_size, batch_size=a.batchsize, seed=a.seed,
                                   data_root=a.data_root, save_path=a.save_path,
                                   clean_model=a.clean_model, merge=a.merge, force=a.force)
            print(f"attack {cmp.name} ({cmp.params.attack_name}, {cmp.params.explanation_methodStr}): "
                  f"{cmp.test['images']} test images")
            print(cmp.table())
            print(f"-> {', '.join(map(str, cmp.files))} ({cmp.seconds:.0f} s)\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
