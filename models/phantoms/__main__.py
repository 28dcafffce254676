"""The realistic phantom world from the command line.

python -m models.phantoms phantom.nii.gz --mask truth.nii.gz [--seed 1] [--family validation]
    [--shape 256 256 128 --spacing 0.8 0.8 2.5] [--lesions 0 0]

Lesions go only where their organ is in the field of view, so a scan may hold fewer than asked.
"""

from __future__ import annotations

import argparse

from models.phantoms import FAMILIES, add_writer_arguments, generate_phantom, save_phantom, summary


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic CT phantom (and its lesion mask) as NIfTI.")
    add_writer_arguments(parser)
    parser.add_argument("--family", choices=FAMILIES, default="train")
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
    print(summary(phantom, args.out))


if __name__ == "__main__":
    main()
