"""The realistic phantom world from the command line.

python -m models.phantoms phantom.nii.gz --mask truth.nii.gz [--seed 1] [--family validation]
    [--shape 256 256 128 --spacing 0.8 0.8 2.5] [--lesions 0 0]

Lesions go only where their organ is in the field of view, so a scan may hold fewer than asked.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from models.phantoms import FAMILIES, generate_phantom, save_phantom


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic CT phantom (and its lesion mask) as NIfTI.")
    parser.add_argument("out", type=Path, help="image path, e.g. phantom.nii.gz")
    parser.add_argument("--mask", type=Path, help="also write the ground-truth lesion mask here")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--family", choices=FAMILIES, default="train")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"))
    parser.add_argument("--lesions", type=int, nargs=2, metavar=("MIN", "MAX"), default=(1, 5))
    args = parser.parse_args()
    phantom = generate_phantom(
        args.seed,
        tuple(args.shape) if args.shape else None,
        tuple(args.spacing) if args.spacing else None,
        family=args.family,
        lesion_count=tuple(args.lesions),
    )
    save_phantom(phantom, args.out, args.mask)
    print(
        f"{args.out}: shape {phantom.image.shape}, spacing {tuple(round(s, 3) for s in phantom.spacing)} mm, "
        f"{phantom.lesion_count} lesion(s): "
        + ", ".join(f"{les.kind} {les.diameter_mm:.1f} mm in {les.organ}" for les in phantom.lesions)
    )


if __name__ == "__main__":
    main()
