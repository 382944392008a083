"""``python -m qexport.train RECIPE [--set k=v ...] [-o DIR] [--resume] [--device D]``.

The same as ``qexport train``, without the CLI's other commands; this is what
``torchrun --nproc_per_node N -m qexport.train ...`` launches.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qexport.train", description=__doc__)
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("-o", "--output", type=Path, default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"))
    args = ap.parse_args(argv)

    from qexport.config import load_recipe
    from qexport.errors import QexportError
    from qexport.train import train

    try:
        rec = load_recipe(args.recipe, args.overrides)
        out = args.output or Path("artifacts") / args.recipe.stem
        summary = train(rec, out, resume=args.resume, device=args.device)
    except QexportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if summary:
        print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
