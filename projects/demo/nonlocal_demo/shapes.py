"""Drawing the shapes of the generated datasets: geometry of circles, squares, triangles and the
keypointed star, sub-pixel rasterisation, backgrounds, contrasting colours, and masks as COCO
polygons that decode back to exactly the mask."""

from typing import Any, List, Optional, Tuple

import cv2
import numpy as np

__all__ = [
    "PAD",
    "background",
    "has_hole",
    "mask_to_polygons",
    "pick_colour",
    "rasterize",
    "shape_parts",
]

PAD = 64  # margin of the canvas on which masks are drawn (to measure truncation)
_SHIFT = 4  # cv2 fixed-point bits (sub-pixel drawing)
_STAR_MAX_TILT = 30.0  # degrees


def rasterize(parts: List[Tuple[str, Any]], padded: int) -> np.ndarray:
    """A uint8 mask of polygons ``("poly", Nx2)`` and discs ``("disc", (center, radius))`` drawn
    with sub-pixel precision on the padded canvas."""
    canvas = np.zeros((padded, padded), dtype=np.uint8)
    for kind, geometry in parts:
        if kind == "poly":
            points = np.round((np.asarray(geometry, dtype=np.float64) + PAD) * (1 << _SHIFT))
            pts = [points.astype(np.int32).reshape(-1, 1, 2)]
            cv2.fillPoly(canvas, pts, 1, lineType=cv2.LINE_8, shift=_SHIFT)
        else:
            center, radius = geometry
            c = np.round((np.asarray(center, dtype=np.float64) + PAD) * (1 << _SHIFT))
            r = int(round(radius * (1 << _SHIFT)))
            cv2.circle(canvas, (int(c[0]), int(c[1])), r, 1, -1, cv2.LINE_8, shift=_SHIFT)
    return canvas


def _rotation(angle_deg: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def shape_parts(
    rng: np.random.Generator, category_id: int, center: np.ndarray, size: float
) -> Tuple[List[Tuple[str, Any]], List[Tuple[str, Any]], Optional[np.ndarray]]:
    """Geometry of one object: (body parts, accent parts, keypoints or None).

    A part is ``("poly", Nx2 array)`` or ``("disc", (center, radius))`` in image coordinates;
    keypoints are integer pixel indices (the accent discs are centred on them).
    """
    if category_id == 1:  # circle
        return [("disc", (center, size / 2.0))], [], None
    if category_id == 2:  # square, any rotation
        half = size / 2.0 / np.sqrt(2.0) * rng.uniform(1.0, 1.25)  # diagonal ~ size
        corners = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
        return [("poly", corners @ _rotation(rng.uniform(0.0, 90.0)).T + center)], [], None
    if category_id == 3:  # (roughly equilateral) triangle, any rotation
        angles = np.deg2rad(np.array([0.0, 120.0, 240.0]) + rng.uniform(-12.0, 12.0, size=3))
        radius = size / 2.0 * rng.uniform(0.95, 1.1, size=3)
        pts = np.stack([np.sin(angles) * radius, -np.cos(angles) * radius], axis=1)
        return [("poly", pts @ _rotation(rng.uniform(0.0, 120.0)).T + center)], [], None

    # star_person: five tips (head, hands, feet) at angles from "up", clockwise on screen;
    # negative angles are on the image-left when upright.
    radius = size / 2.0
    tip_angles = np.array(
        [
            rng.uniform(-8.0, 8.0),  # head
            -rng.uniform(62.0, 95.0),  # left_hand
            rng.uniform(62.0, 95.0),  # right_hand
            -rng.uniform(138.0, 160.0),  # left_foot
            rng.uniform(138.0, 160.0),  # right_foot
        ]
    )
    tip_radii = radius * np.array(
        [rng.uniform(0.82, 0.9), *rng.uniform(0.88, 1.0, size=2), *rng.uniform(0.9, 1.0, size=2)]
    )
    head_r = max(3.0, 0.2 * radius)
    blob_r = max(2.5, 0.14 * radius)
    tilt = _rotation(rng.uniform(-_STAR_MAX_TILT, _STAR_MAX_TILT))

    def _point(angle_deg: float, r: float) -> np.ndarray:
        a = np.deg2rad(angle_deg)
        return np.array([np.sin(a) * r, -np.cos(a) * r]) @ tilt.T + center

    # Outline clockwise on screen: head, right_hand, right_foot, left_foot, left_hand.
    order = [0, 2, 4, 3, 1]
    ordered = [(tip_angles[i] % 360.0, i) for i in order]
    inner_ratio = rng.uniform(0.42, 0.52)
    outline = []
    for j, (angle, i) in enumerate(ordered):
        outline.append(_point(tip_angles[i], tip_radii[i]))
        next_angle = ordered[(j + 1) % 5][0]
        gap = (next_angle - angle) % 360.0
        outline.append(_point(angle + gap / 2.0, radius * inner_ratio))
    keypoints = np.round(np.stack([_point(a, r) for a, r in zip(tip_angles, tip_radii)]))
    accents = [("disc", (keypoints[0], head_r))] + [("disc", (kp, blob_r)) for kp in keypoints[1:]]
    return [("poly", np.stack(outline))], accents, keypoints


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random RGB background (float32, 0..255): gradient + low-frequency blobs."""
    c0 = rng.uniform(0.0, 255.0, size=3)
    c1 = np.clip(c0 + rng.uniform(-110.0, 110.0, size=3), 0.0, 255.0)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / max(size - 1, 1)
    t = (xx * np.cos(angle) + yy * np.sin(angle)) / (abs(np.cos(angle)) + abs(np.sin(angle)))
    t = t - t.min()
    t = t / max(t.max(), 1e-6)
    image = c0 + (c1 - c0) * t[..., None]
    blobs = rng.normal(0.0, 18.0, size=(4, 4, 3)).astype(np.float32)
    image = image + cv2.resize(blobs, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(image, 0.0, 255.0).astype(np.float32)


def pick_colour(rng: np.random.Generator, references: List[np.ndarray]) -> np.ndarray:
    """The random colour (of 12 candidates) farthest from all ``references``."""
    candidates = rng.uniform(0.0, 255.0, size=(12, 3))
    refs = np.stack(references)
    score = np.linalg.norm(candidates[:, None, :] - refs[None, :, :], axis=2).min(axis=1)
    return np.round(candidates[int(np.argmax(score))])


def has_hole(mask: np.ndarray) -> bool:
    _, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return hierarchy is not None and bool((hierarchy[0][:, 3] >= 0).any())


def mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    """Polygons (COCO flat lists) that pycocotools rasterizes back to exactly ``mask``.

    The contour is traced on the 2x nearest-upsampled mask and mapped back to pixel-edge
    coordinates (0.25 px inside the pixel boundary), so that the polygon follows the pixel edges
    instead of the pixel centres (tracing the mask itself would lose half a pixel all around).
    """
    up = cv2.resize(mask, (mask.shape[1] * 2, mask.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        contour = cv2.approxPolyDP(contour, 0.5, True).reshape(-1, 2)
        if len(contour) < 3:
            continue
        coords = (contour.astype(np.float64) + 0.5) / 2.0
        polygons.append([float(v) for v in coords.reshape(-1)])
    return polygons
