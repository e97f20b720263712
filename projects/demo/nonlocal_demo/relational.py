"""Generated datasets of the context probe: object classes that can only be read far away.

Each square image shows a plain grey background and small flat-coloured objects, every colour from
a small palette, every two objects at least ``min_distance`` x the image size apart (centre to
centre): an object's nearest neighbour is always far. The tasks (``task``):

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
- ``"bar"`` and ``"plus"``: two held-out variants of the cue task, with another cue
  shape, cue colours, placement rule, objects and background (:data:`HELD_OUT_RULES`, written
  down in docs/context_probe.md before any training on them). ``"bar"``: a green or magenta bar
  along a random edge, 2-3 light triangles and stars on a dark background, every object at
  least 0.45 x the image size from the nearest point of the bar; categories ``triangle_green``,
  ``triangle_magenta``, ``star_green``, ``star_magenta``. ``"plus"``: a yellow or cyan plus sign,
  any rotation, anywhere, 2-3 dark diamonds and hexagons on a light background, every object
  at least 0.5 x the image size from the plus's centre; ``diamond_yellow``, ``diamond_cyan``,
  ``hexagon_yellow``, ``hexagon_cyan``. Their objects' colours (from the task's own palette) are
  drawn independently of the cue.

Which objects are twins, or of the cue's colour, is drawn independently of where they are, and
every colour is as often of either kind: neither the layout nor an object's own colour tells its
category, only the comparison with another object's colour, far away, does (the cue task: only
the cue's colour).

Annotations are plain COCO (``bbox``, ``area``, polygons of the mask), plus the generator's own
record of each object: ``shape``, ``colour`` (the RGB drawn, before the pixel noise) and
``colour_index`` (into the palette, the held-out tasks' own palette; -1 for the cue task's
greys); with every task but ``"twin"`` each image entry records its ``cue`` (``bbox``,
``colour``, ``colour_index``; for the cue tasks 0 is the first word of the categories). One
``numpy`` generator per image, seeded from ``(seed, split, index)``: the same parameters give
byte-identical files (:func:`write_generated_coco`).
"""

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from nonlocal_det.data.coco import cache_root
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
    "bar": ("green", "magenta"),
    "plus": ("yellow", "cyan"),
}
# Shape name -> the category id of nonlocal_det.data.shapes.shape_parts.
RELATION_SHAPES = {"circle": 1, "square": 2}

# The held-out cue tasks: fixed before their first training run and not tuned after
# (docs/context_probe.md). Colours are RGB; lengths in pixels at any image size; distances as
# fractions of the image size. They take from RelationSpec only min_size, max_size, noise_std
# and placement_tries.
HELD_OUT_RULES = {
    "bar": {
        "shapes": ("triangle", "star"),
        "cue_colours": ((40, 180, 60), (200, 60, 200)),  # green, magenta
        "cue_thickness": (8.0, 12.0),
        "cue_length": (64.0, 88.0),
        "cue_edge_gap": (2.0, 6.0),  # from the image edge to the bar's outer side
        "cue_distance": 0.45,  # object centre to the nearest point of the bar
        "min_distance": 0.35,  # between object centres
        "objects": (2, 3),
        # white, yellow, cyan, orange: none of the cue's colours
        "palette": ((235, 235, 235), (235, 210, 40), (40, 200, 210), (240, 140, 30)),
        "background": (25.0, 110.0),  # grey levels low .. low + span: dark
    },
    "plus": {
        "shapes": ("diamond", "hexagon"),
        "cue_colours": ((235, 210, 40), (40, 200, 210)),  # yellow, cyan
        "cue_span": (34.0, 42.0),  # arm tip to arm tip
        "cue_thickness": (9.0, 12.0),
        "cue_distance": 0.5,  # object centre to the plus's centre
        "min_distance": 0.35,
        "objects": (2, 3),
        # navy, dark red, dark green, near black
        "palette": ((30, 40, 110), (120, 30, 30), (30, 90, 40), (25, 25, 25)),
        "background": (120.0, 100.0),  # light
    },
}
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


def _shapes(task: str) -> Tuple[str, ...]:
    return HELD_OUT_RULES[task]["shapes"] if task in HELD_OUT_RULES else tuple(RELATION_SHAPES)


def relation_categories(task: str) -> Tuple[Dict[str, Any], ...]:
    """The COCO categories of ``task``: shape x (relation holds, does not)."""
    _check_task("relation_categories", task)
    return tuple(
        {"id": 2 * i + j + 1, "name": f"{shape}_{word}", "supercategory": shape}
        for i, shape in enumerate(_shapes(task))
        for j, word in enumerate(RELATION_TASKS[task])
    )


def relation_category_id(shape: str, holds: bool, task: str = "twin") -> int:
    """The category id of a ``shape`` of ``task`` ('circle' or 'square'; the held-out tasks'
    own shapes) for which the relation holds (paired / match / the first cue colour) or not."""
    return 2 * list(_shapes(task)).index(shape) + (1 if holds else 2)


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
        if task in HELD_OUT_RULES:
            return HELD_OUT_RULES[task]["objects"]
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
        needed = {"twin": high, "match": 2}.get(task, 0)
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


def _grey_background(
    rng: np.random.Generator, size: int, low: float = 60.0, span: float = 130.0
) -> np.ndarray:
    """The demo's smooth background made grey, in levels ``low .. low + span`` (float32)."""
    grey = background(rng, size).mean(axis=2, keepdims=True)
    return np.repeat(low + grey * (span / 255.0), 3, axis=2).astype(np.float32)


def _layout(
    rng: np.random.Generator, size: int, n: int, spec: RelationSpec, cue=None
) -> np.ndarray:
    """``n`` centres, every two at least ``min_distance`` x ``size`` apart, and at least
    ``cue_distance`` x ``size`` from ``cue`` (a centre) if given (random sequential placement,
    started over when stuck)."""
    if cue is None:
        return _place(rng, size, n, spec, spec.min_distance, lambda c: True)
    far = spec.cue_distance * size
    return _place(rng, size, n, spec, spec.min_distance, lambda c: np.hypot(*(c - cue)) >= far)


def _place(rng, size: int, n: int, spec: RelationSpec, min_distance: float, allowed) -> np.ndarray:
    """``n`` centres, every two at least ``min_distance`` x ``size`` apart, each one where
    ``allowed(centre)`` holds (random sequential placement, started over when stuck)."""
    low, high = spec.max_size / 2.0, size - 1 - spec.max_size / 2.0
    d = min_distance * size
    for _ in range(spec.placement_tries):
        centres: List[np.ndarray] = []
        for _slot in range(n):
            for _try in range(30):
                c = rng.uniform(low, high, size=2)
                if not allowed(c):
                    continue
                if all(np.hypot(*(c - o)) >= d for o in centres):
                    centres.append(c)
                    break
            else:
                break
        if len(centres) == n:
            return np.stack(centres)
    raise RuntimeError(
        f"could not place {n} objects {min_distance} x {size} px apart in "
        f"{spec.placement_tries} tries; allowed: a smaller RelationSpec.min_distance or fewer "
        "objects"
    )


def _draw(rng, image, shape, centre, size: int, spec: RelationSpec, colour):
    """Draw one object (a shape_parts category id, or a name of :func:`_polygon`); returns
    its mask (uint8, image-sized) and COCO box."""
    obj_size = rng.uniform(spec.min_size, spec.max_size)
    if isinstance(shape, str):
        body = [("poly", _polygon(rng, shape, centre, obj_size))]
    else:
        body, _, _ = shape_parts(rng, shape, centre, obj_size)
    return _paint(image, body, size, colour)


def _paint(image, parts, size: int, colour):
    """Fill ``parts`` (of :func:`nonlocal_det.data.shapes.rasterize`) with ``colour``; returns
    the mask (uint8, image-sized) and its COCO box."""
    mask = np.ascontiguousarray(
        rasterize(parts, size + 2 * PAD)[PAD : PAD + size, PAD : PAD + size]
    )
    image[mask.astype(bool)] = colour
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    return mask, [x0, y0, x1 - x0, y1 - y0]


def _rotated(points: np.ndarray, angle_deg: float, centre) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return points @ rotation.T + centre


def _polygon(rng: np.random.Generator, shape: str, centre, size: float) -> np.ndarray:
    """The outline (K, 2) of a held-out task's object of extent ``size``, any rotation:
    ``triangle`` (as shape_parts'), ``star`` (5 tips, inner radius 0.42-0.5 of the outer),
    ``diamond`` (a rhombus, its short diagonal 0.55-0.65 of the long one) or ``hexagon``."""
    r = size / 2.0
    if shape == "triangle":
        return shape_parts(rng, 3, centre, size)[0][0][1]
    if shape == "star":
        inner = r * rng.uniform(0.42, 0.5)
        angles = np.deg2rad(np.arange(10) * 36.0)
        radii = np.where(np.arange(10) % 2 == 0, r, inner)
        pts = np.stack([np.sin(angles) * radii, -np.cos(angles) * radii], axis=1)
        return _rotated(pts, rng.uniform(0.0, 72.0), centre)
    if shape == "diamond":
        short = r * rng.uniform(0.55, 0.65)
        pts = np.array([[0.0, -r], [short, 0.0], [0.0, r], [-short, 0.0]])
        return _rotated(pts, rng.uniform(0.0, 180.0), centre)
    angles = np.deg2rad(np.arange(6) * 60.0)  # hexagon
    pts = np.stack([np.sin(angles) * r, -np.cos(angles) * r], axis=1)
    return _rotated(pts, rng.uniform(0.0, 60.0), centre)


def make_relation_image(
    rng: np.random.Generator, size: int, task: str = "twin", spec: RelationSpec = RelationSpec()
) -> Tuple[np.ndarray, List[Dict[str, Any]], Dict[str, Any]]:
    """One RGB uint8 image of ``task``, its (not yet numbered) annotations and the extra keys of
    its image entry (``{"cue": ...}`` for the match and cue tasks, else empty)."""
    _check_task("make_relation_image", task)
    if task in HELD_OUT_RULES:
        return _held_out_image(rng, size, task, spec)
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


def _bar(rng, size: int, rule) -> Tuple[list, np.ndarray, np.ndarray]:
    """The bar task's cue: its parts and its rectangle's corners (x0, y0), (x1, y1)."""
    thick = rng.uniform(*rule["cue_thickness"])
    length = rng.uniform(*rule["cue_length"])
    gap = rng.uniform(*rule["cue_edge_gap"])
    edge = int(rng.integers(4))  # top, bottom, left, right
    along = rng.uniform(length / 2.0 + 4.0, size - length / 2.0 - 4.0)
    across = gap if edge in (0, 2) else size - gap - thick
    start, end = along - length / 2.0, along + length / 2.0
    if edge < 2:  # horizontal
        lo, hi = np.array([start, across]), np.array([end, across + thick])
    else:
        lo, hi = np.array([across, start]), np.array([across + thick, end])
    corners = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]])
    return [("poly", corners)], lo, hi


def _plus(rng, size: int, rule) -> Tuple[list, np.ndarray]:
    """The plus task's cue: its parts (two bars, any rotation) and its centre."""
    span = rng.uniform(*rule["cue_span"])
    thick = rng.uniform(*rule["cue_thickness"])
    margin = span / np.sqrt(2.0) + 2.0  # inside the image at any rotation
    centre = rng.uniform(margin, size - 1 - margin, size=2)
    angle = rng.uniform(0.0, 90.0)
    a, b = span / 2.0, thick / 2.0
    arm = np.array([[-a, -b], [a, -b], [a, b], [-a, b]])
    parts = [("poly", _rotated(arm, angle, centre)), ("poly", _rotated(arm, angle + 90.0, centre))]
    return parts, centre


def _held_out_image(rng, size: int, task: str, spec: RelationSpec):
    """The held-out cue tasks (:data:`HELD_OUT_RULES`): the cue's colour (the first or second
    of ``cue_colours``, probability 1/2, independent of its place) decides every object's
    category; the objects' shapes and colours are drawn uniformly, independently of the cue."""
    rule = HELD_OUT_RULES[task]
    image = _grey_background(rng, size, *rule["background"])
    n = int(rng.integers(rule["objects"][0], rule["objects"][1] + 1))
    first = bool(rng.random() < 0.5)
    colour = rule["cue_colours"][0 if first else 1]
    far = rule["cue_distance"] * size
    if task == "bar":
        parts, lo, hi = _bar(rng, size, rule)
        allowed = lambda c: np.hypot(*(c - np.clip(c, lo, hi))) >= far  # noqa: E731
    else:
        parts, centre = _plus(rng, size, rule)
        allowed = lambda c: np.hypot(*(c - centre)) >= far  # noqa: E731
    centres = _place(rng, size, n, spec, rule["min_distance"], allowed)
    _, cue_box = _paint(image, parts, size, colour)
    extra = {"cue": {"bbox": cue_box, "colour": list(colour), "colour_index": 0 if first else 1}}
    annotations = []
    for i in range(n):
        shape = rule["shapes"][int(rng.integers(2))]
        index = int(rng.integers(len(rule["palette"])))
        own = rule["palette"][index]
        mask, box = _draw(rng, image, shape, centres[i], size, spec, own)
        annotations.append(
            {
                "category_id": relation_category_id(shape, first, task),
                "bbox": box,
                "area": int(mask.sum()),
                "iscrowd": 0,
                "segmentation": mask_to_polygons(mask),
                "shape": shape,
                "colour": list(own),
                "colour_index": index,
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
    (:func:`nonlocal_det.data.register_coco_dataset`).

    Raises:
        FileNotFoundError: ``root`` holds no generated dataset.
    """
    return register_generated_coco(
        root, name_prefix, "nonlocal_demo.relational.generate_relation_coco"
    )
