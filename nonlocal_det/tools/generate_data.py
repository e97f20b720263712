"""Generate the demo dataset as plain COCO files: ``python -m nonlocal_det.tools.generate_data``.

    python -m nonlocal_det.tools.generate_data --root datasets/shapes [--num-train N --num-val N]

Without ``--root``: the folder ``make demo`` uses (``$NONLOCAL_DET_DATASETS`` or
``~/.cache/nonlocal_det/datasets``). A folder that exists is left as it is.
"""

import argparse
import json
import time
from collections import Counter
from typing import List, Optional

from ..data.synthetic import SPLITS, default_dataset_root, generate_synthetic_coco

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", help="output folder (default: the demo's cache folder)")
    p.add_argument("--num-train", type=int, default=400)
    p.add_argument("--num-val", type=int, default=50)
    p.add_argument("--image-size", type=int, default=192)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point; prints what each split holds and returns 0."""
    args = parser().parse_args(argv)
    root = args.root or default_dataset_root()
    start = time.perf_counter()
    generated = generate_synthetic_coco(
        root, args.num_train, args.num_val, args.image_size, args.seed
    )
    state = "generated" if generated else "already there, left as it is"
    print(f"{root}: {state} ({time.perf_counter() - start:.1f} s)")
    for split in SPLITS:
        with open(f"{root}/annotations/instances_{split}.json") as f:
            coco = json.load(f)
        counts = Counter(a["category_id"] for a in coco["annotations"])
        shown = ", ".join(f"{c['name']}={counts[c['id']]}" for c in coco["categories"])
        print(
            f"  {split}: {len(coco['images'])} images, {sum(counts.values())} instances ({shown})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
