"""Generated datasets of the context probe: object classes that can only be read far away.

Each square image shows a plain grey background and small flat-coloured objects, every colour from
a small palette, every two objects at least ``min_distance`` x the image size apart (centre to
centre): an object's nearest neighbour is always far. Two tasks (``task``):

- ``"twin"`` (same-colour twin): 3-5 circles and squares. An object is *paired* when another
  object of the image has exactly its colour (its twin), else *single*; categories
  ``circle_paired``, ``circle_single``, ``square_paired``, ``square_single``. An image of ``n``
  objects holds ``p`` twin pairs (``p`` uniform in ``0 .. n // 2``) and ``n - 2p`` single objects,
  all of different colours (no colour three times).
- ``"match"`` (match the cue): one triangle, the cue (not annotated), and 2-4 circles and squares,
  each of the cue's colour with probability 1/2 (*match*), else of another palette colour drawn
  uniformly (colours may repeat among them: having a same-coloured partner tells nothing);
  categories ``circle_match``, ``circle_other``, ``square_match``, ``square_other``.
- ``"cue"`` (a global cue): 2-4 grey circles and squares and one large square, the cue (not
  annotated), red or blue, in a corner; every object at least ``cue_distance`` x the image size
  from the cue. An object's category is its shape x the cue's colour: ``circle_red``,
  ``circle_blue``, ``square_red``, ``square_blue``. No comparison, only the cue's colour, far away.

Which objects are twins, or of the cue's colour, is drawn independently of where they are, and
every colour is as often of either kind: neither the layout nor an object's own colour tells its
category, only the comparison with another object's colour, far away, does (the cue task: only
the cue's colour).

Annotations are plain COCO (``bbox``, ``area``, polygons of the mask), plus the generator's own
record of each object: ``shape``, ``colour`` (the RGB drawn, before the pixel noise) and
``colour_index`` (into the palette; -1 for the cue task's greys); with ``"match"`` and ``"cue"``
each image entry records its ``cue`` (``bbox``, ``colour``, ``colour_index``). One ``numpy`` generator per image, seeded from ``(seed,
split, index)``: the same parameters give byte-identical files (:func:`write_generated_coco`).
"""

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .coco import cache_root
from .shapes import PAD, background, mask_to_polygons, rasterize, shape_parts
from .synthetic import check_generator_args, register_generated_coco, write_generated_coco

__all__ = [
    "RELATION_DATASET_VERSION",
    "RELATION_SHAPES",
    "RELATION_TASKS",
    "RelationSpec",
    "generate_relation_coco",
    "make_relation_image",
    "register_relation_coco",
    "relation_categories",
    "relation_category_id",
    "relation_dataset_root",
]

# Part of the cache folders' names: bump it when the generated content of the defaults changes.
RELATION_DATASET_VERSION = 1
# task -> the two words of its categories (the relation holds, does not hold)
RELATION_TASKS = {
    "twin": ("paired", "single"),
    "match": ("match", "other"),
    "cue": ("red", "blue"),
}
# Shape name -> the category id of nonlocal_det.data.shapes.shape_parts.
RELATION_SHAPES = {"circle": 1, "square": 2}
_CUE_SHAPE = 3  # the match task's cue: a triangle
_CUE_COLOURS = ((220, 40, 40), (50, 90, 230))  # the cue task's cue: red or blue

# Six saturated colours, far from each other and from the grey background.
DEFAULT_PALETTE = (
    (220, 40, 40),  # red
    (40, 180, 60),  # green
    (50, 90, 230),  # blue
    (235, 210, 40),  # yellow
    (200, 60, 200),  # magenta
    (40, 200, 210),  # cyan
)


def _check_task(caller: str, task: str) -> None:
    if task not in RELATION_TASKS:
        raise ValueError(
            f"{caller}: task={task!r} is not supported; allowed: {list(RELATION_TASKS)}"
        )


def relation_categories(task: str) -> Tuple[Dict[str, Any], ...]:
    """The COCO categories of ``task``: shape x (relation holds, does not)."""
    _check_task("relation_categories", task)
    return tuple(
        {"id": 2 * i + j + 1, "name": f"{shape}_{word}", "supercategory": shape}
        for i, shape in enumerate(RELATION_SHAPES)
        for j, word in enumerate(RELATION_TASKS[task])
    )


def relation_category_id(shape: str, holds: bool) -> int:
    """The category id of a ``shape`` ('circle' or 'square') for which the relation holds
    (paired / match) or not (single / other)."""
    return 2 * list(RELATION_SHAPES).index(shape) + (1 if holds else 2)


@dataclass(frozen=True)
class RelationSpec:
    """What an image holds (the defaults are the probe's datasets).

    Attributes:
        palette: the RGB colours objects are drawn in.
        min_objects, max_objects: annotated objects per image (the match task's cue comes on
            top); ``None``: the task's default (twin 3-5, match 2-4).
        min_size, max_size: an object's extent in pixels (circle diameter, square diagonal).
        min_distance: the least distance between two objects' centres (the cue included), as a
            fraction of the image size.
        noise_std: std of the Gaussian pixel noise.
        cue_size: (min, max) side of the cue task's cue square, in pixels.
        cue_distance: the cue task's least distance from the cue's centre to an object's, as a
            fraction of the image size (objects are ``min_distance`` apart from each other).
    """

    palette: Tuple[Tuple[int, int, int], ...] = DEFAULT_PALETTE
    min_objects: Optional[int] = None
    max_objects: Optional[int] = None
    min_size: float = 20.0
    max_size: float = 28.0
    min_distance: float = 0.4
    noise_std: float = 4.0
    cue_size: Tuple[float, float] = (40.0, 48.0)
    cue_distance: float = 0.5
    placement_tries: int = field(default=200, repr=False)

    def objects(self, task: str) -> Tuple[int, int]:
        """(min, max) annotated objects per image for ``task``."""
        low, high = (3, 5) if task == "twin" else (2, 4)
        return (
            low if self.min_objects is None else self.min_objects,
            high if self.max_objects is None else self.max_objects,
        )

    def check(self, task: str, image_size: int) -> None:
        """ValueError naming the field, unless ``task``'s images can be drawn at ``image_size``."""
        problems = []
        low, high = self.objects(task)
        if not 2 <= low <= high:
            problems.append(
                f"min_objects={low}, max_objects={high}; allowed: 2 <= min_objects <= "
                "max_objects"
            )
        colours = len(set(self.palette))
        needed = {"twin": high, "match": 2, "cue": 0}[task]
        if colours < needed:
            problems.append(
                f"palette has {colours} distinct colours; allowed: at least {needed} for the "
                f"{task} task"
            )
        if not 4.0 <= self.min_size <= self.max_size <= image_size / 2:
            problems.append(
                f"min_size={self.min_size}, max_size={self.max_size}; allowed: 4 <= min_size "
                f"<= max_size <= image_size / 2 = {image_size / 2}"
            )
        if self.min_distance * image_size < self.max_size:
            problems.append(
                f"min_distance={self.min_distance} ({self.min_distance * image_size:.0f} px at "
                f"image_size={image_size}); allowed: at least max_size={self.max_size} px (objects "
                "never overlap)"
            )
        if problems:
            raise ValueError("RelationSpec: " + "; ".join(problems))

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d.pop("placement_tries")
        d["palette"] = [list(c) for c in self.palette]
        d["cue_size"] = list(self.cue_size)
        return d


def relation_dataset_root(task: str = "twin") -> str:
    """``<cache>/<task>_coco_v<N>``, the cache being ``$NONLOCAL_DET_DATASETS`` or
    ``~/.cache/nonlocal_det/datasets``."""
    _check_task("relation_dataset_root", task)
    return os.path.join(cache_root(), f"{task}_coco_v{RELATION_DATASET_VERSION}")


def _grey_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """The demo's smooth background, made grey and moderately bright (float32)."""
    grey = background(rng, size).mean(axis=2, keepdims=True)
    return np.repeat(60.0 + grey * (130.0 / 255.0), 3, axis=2).astype(np.float32)


def _layout(
    rng: np.random.Generator, size: int, n: int, spec: RelationSpec, cue=None
) -> np.ndarray:
    """``n`` centres, every two at least ``min_distance`` x ``size`` apart, and at least
    ``cue_distance`` x ``size`` from ``cue`` (a centre) if given (random sequential placement,
    started over when stuck)."""
    low, high = spec.max_size / 2.0, size - 1 - spec.max_size / 2.0
    d = spec.min_distance * size
    for _ in range(spec.placement_tries):
        centres: List[np.ndarray] = []
        for _slot in range(n):
            for _try in range(30):
                c = rng.uniform(low, high, size=2)
                if cue is not None and np.hypot(*(c - cue)) < spec.cue_distance * size:
                    continue
                if all(np.hypot(*(c - o)) >= d for o in centres):
                    centres.append(c)
                    break
            else:
                break
        if len(centres) == n:
            return np.stack(centres)
    raise RuntimeError(
        f"could not place {n} objects {spec.min_distance} x {size} px apart in "
        f"{spec.placement_tries} tries; allowed: a smaller RelationSpec.min_distance or fewer "
        "objects"
    )


def _draw(rng, image, shape_id: int, centre, size: int, spec: RelationSpec, colour):
    """Draw one object; returns its mask (uint8, image-sized) and COCO box."""
    obj_size = rng.uniform(spec.min_size, spec.max_size)
    body, _, _ = shape_parts(rng, shape_id, centre, obj_size)
    mask = np.ascontiguousarray(rasterize(body, size + 2 * PAD)[PAD : PAD + size, PAD : PAD + size])
    image[mask.astype(bool)] = colour
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    return mask, [x0, y0, x1 - x0, y1 - y0]


def make_relation_image(
    rng: np.random.Generator, size: int, task: str = "twin", spec: RelationSpec = RelationSpec()
) -> Tuple[np.ndarray, List[Dict[str, Any]], Dict[str, Any]]:
    """One RGB uint8 image of ``task``, its (not yet numbered) annotations and the extra keys of
    its image entry (``{"cue": ...}`` for the match and cue tasks, else empty)."""
    _check_task("make_relation_image", task)
    image = _grey_background(rng, size)
    low, high = spec.objects(task)
    n = int(rng.integers(low, high + 1))
    k = len(spec.palette)
    if task == "cue":
        return _cue_image(rng, size, spec, image, n)
    if task == "twin":
        num_pairs = int(rng.integers(0, n // 2 + 1))
        index = rng.choice(k, size=n - num_pairs, replace=False)
        # objects 2j and 2j+1 (j < num_pairs) are twins; the layout is drawn independently
        colours = [int(index[i // 2 if i < 2 * num_pairs else i - num_pairs]) for i in range(n)]
        holds = [i < 2 * num_pairs for i in range(n)]
        cue_colour = None
    else:
        cue_colour = int(rng.integers(k))
        holds = [bool(h) for h in rng.random(n) < 0.5]
        others = [c for c in range(k) if c != cue_colour]
        colours = [cue_colour if h else int(others[rng.integers(k - 1)]) for h in holds]
    centres = _layout(rng, size, n + (cue_colour is not None), spec)
    centres = centres[rng.permutation(len(centres))]
    extra: Dict[str, Any] = {}
    if cue_colour is not None:
        colour = spec.palette[cue_colour]
        _, box = _draw(rng, image, _CUE_SHAPE, centres[n], size, spec, colour)
        extra["cue"] = {"bbox": box, "colour": list(colour), "colour_index": cue_colour}
    annotations = []
    for i in range(n):
        shape = list(RELATION_SHAPES)[int(rng.integers(len(RELATION_SHAPES)))]
        colour = spec.palette[colours[i]]
        mask, box = _draw(rng, image, RELATION_SHAPES[shape], centres[i], size, spec, colour)
        annotations.append(
            {
                "category_id": relation_category_id(shape, holds[i]),
                "bbox": box,
                "area": int(mask.sum()),
                "iscrowd": 0,
                "segmentation": mask_to_polygons(mask),
                "shape": shape,
                "colour": [int(v) for v in colour],
                "colour_index": colours[i],
            }
        )
    image = image + rng.normal(0.0, spec.noise_std, size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), annotations, extra


def _cue_image(rng, size: int, spec: RelationSpec, image: np.ndarray, n: int):
    """The cue task: a red or blue square in a corner, ``n`` grey objects far from it."""
    red = bool(rng.random() < 0.5)
    side = rng.uniform(*spec.cue_size)
    corner = rng.integers(2, size=2)  # (x, y): 0 left / top, 1 right / bottom
    offset = side / 2.0 + rng.uniform(2.0, 10.0, size=2)
    cue_centre = np.where(corner == 1, size - 1 - offset, offset)
    centres = _layout(rng, size, n, spec, cue=cue_centre)
    half = side / 2.0
    square = np.array([[-half, -half], [half, -half], [half, half], [-half, half]]) + cue_centre
    mask = np.ascontiguousarray(
        rasterize([("poly", square)], size + 2 * PAD)[PAD : PAD + size, PAD : PAD + size]
    )
    colour = _CUE_COLOURS[0 if red else 1]
    image[mask.astype(bool)] = colour
    ys, xs = np.nonzero(mask)
    box = [int(xs.min()), int(ys.min()), int(xs.max() + 1 - xs.min()), int(ys.max() + 1 - ys.min())]
    extra = {"cue": {"bbox": box, "colour": list(colour), "colour_index": 0 if red else 1}}
    annotations = []
    for i in range(n):
        shape = list(RELATION_SHAPES)[int(rng.integers(len(RELATION_SHAPES)))]
        # grey, contrasting with the background around it
        x, y = np.clip(centres[i].astype(int), 0, size - 1)
        level = rng.uniform(15.0, 45.0) if image[y, x, 0] > 125 else rng.uniform(210.0, 240.0)
        grey = (int(round(level)),) * 3
        mask, box = _draw(rng, image, RELATION_SHAPES[shape], centres[i], size, spec, grey)
        annotations.append(
            {
                "category_id": relation_category_id(shape, red),
                "bbox": box,
                "area": int(mask.sum()),
                "iscrowd": 0,
                "segmentation": mask_to_polygons(mask),
                "shape": shape,
                "colour": list(grey),
                "colour_index": -1,
            }
        )
    image = image + rng.normal(0.0, spec.noise_std, size=image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), annotations, extra


def generate_relation_coco(
    root: str,
    task: str = "twin",
    num_train: int = 4000,
    num_val: int = 200,
    image_size: int = 192,
    seed: int = 0,
    spec: RelationSpec = RelationSpec(),
) -> bool:
    """Generate ``task``'s dataset as ``root/{train,val}/NNNNNN.png`` and
    ``root/annotations/instances_{train,val}.json``, unless ``root`` already holds it
    (atomic and deterministic, as the demo data: :func:`write_generated_coco`). The ``info`` of
    each file records the task, the version, the image size, the seed and ``spec``.

    Returns:
        True if generated now, False if ``root`` was already there.
    """
    _check_task("generate_relation_coco", task)
    check_generator_args(
        "generate_relation_coco",
        num_train=num_train,
        num_val=num_val,
        image_size=image_size,
        seed=seed,
    )
    spec.check(task, image_size)
    info = {
        "description": f"nonlocal_det context probe, {task} task v{RELATION_DATASET_VERSION}",
        "task": task,
        "image_size": image_size,
        "seed": seed,
        "spec": spec.to_json(),
    }
    return write_generated_coco(
        root,
        {"train": num_train, "val": num_val},
        image_size,
        seed,
        lambda rng, size: make_relation_image(rng, size, task, spec),
        info,
        relation_categories(task),
        "generate_relation_coco",
    )


def register_relation_coco(root: str, name_prefix: str = "nl_twin") -> Tuple[str, str]:
    """Register ``{name_prefix}_train`` and ``{name_prefix}_val`` for a generated ``root``
    (:func:`nonlocal_det.data.coco.register_coco_dataset`).

    Raises:
        FileNotFoundError: ``root`` holds no generated dataset.
    """
    return register_generated_coco(
        root, name_prefix, "nonlocal_det.data.relational.generate_relation_coco"
    )
