"""Generate the demo's or the probe's dataset as plain COCO files:

    python projects/demo/command.py generate_data --root datasets/shapes [--num-train N --num-val N]
    python projects/demo/command.py generate_data --task twin --root datasets/twin   # context probe

``--task demo`` (the default): the demo's shapes and keypointed stars (400 / 50 images).
``--task twin`` / ``--task match``: the context probe's relational data (4000 / 200 images;
``nonlocal_demo.relational``). Without ``--root``: the folder the configs use
(``$NONLOCAL_DET_DATASETS`` or ``~/.cache/nonlocal_det/datasets``). A folder that exists is left as
it is.
"""

import argparse
import json
import time
from collections import Counter
from typing import List, Optional

from .relational import RELATION_TASKS, generate_relation_coco, relation_dataset_root
from .synthetic import SPLITS, default_dataset_root, generate_synthetic_coco

__all__ = ["main", "parser"]

TASKS = ("demo",) + tuple(RELATION_TASKS)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--task", choices=TASKS, default="demo", help="which dataset (default: demo)")
    p.add_argument("--root", help="output folder (default: the folder the configs use)")
    p.add_argument("--num-train", type=int, default=None, help="demo 400, twin/match 4000")
    p.add_argument("--num-val", type=int, default=None, help="demo 50, twin/match 200")
    p.add_argument("--image-size", type=int, default=192)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point; prints what each split holds and returns 0."""
    args = parser().parse_args(argv)
    demo = args.task == "demo"
    num_train = args.num_train if args.num_train is not None else (400 if demo else 4000)
    num_val = args.num_val if args.num_val is not None else (50 if demo else 200)
    start = time.perf_counter()
    if demo:
        root = args.root or default_dataset_root()
        generated = generate_synthetic_coco(root, num_train, num_val, args.image_size, args.seed)
    else:
        root = args.root or relation_dataset_root(args.task)
        generated = generate_relation_coco(
            root, args.task, num_train, num_val, args.image_size, args.seed
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
