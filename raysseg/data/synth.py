"""A synthetic VOC-layout dataset that makes weak supervision genuinely hard.

Each foreground class has a shape, a body colour distribution and a small DISCRIMINATIVE PART: a
patch with a class-specific pattern (rings, diagonal stripes, checkerboard, dots, bars) covering
roughly a fifth of the object. Body colours of different classes overlap, and the cluttered,
textured background carries distractor blobs painted with the same body colours and textures. So
the pattern is what tells the classes apart, a classifier's CAM lights up the pattern patch more
than the body, and CAM-only pseudo labels miss much of each object — the situation iterative
refinement with saliency and affinity is meant to fix.

The saliency maps imitate an off-the-shelf saliency model: blurred, noisy, sometimes missing a
part of an object, sometimes firing on a distractor. Ground-truth masks are exact.

Layout written: JPEGImages/<id>.jpg, SegmentationClass/<id>.png (VOC palette, index = class id),
ImageSets/Segmentation/{train,val}.txt, saliency/<id>.png (grey), class_names.txt and
image_labels.csv (`image_id,labels` with class names, the labels a mask implies).
One file of about 400 lines: the painting helpers serve only this generator.
Deterministic given the seed: image i of a split depends only on (seed, split, i).
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from raysseg import storage
from raysseg.data import io

SPLIT_CODES = {"train": 0, "val": 1}


@dataclass(frozen=True)
class ClassStyle:
    name: str
    shape: str  # circle | rect | triangle | ellipse | cross
    hue: float  # mean body hue in degrees; neighbouring classes overlap on purpose
    pattern: str  # rings | diagonal | checker | dots | bars
    pattern_colors: tuple[tuple[int, int, int], tuple[int, int, int]]
    part_offset: float  # where the pattern patch sits along the object's main axis (x radius)


CLASS_STYLES: tuple[ClassStyle, ...] = (
    ClassStyle("orb", "circle", 0.0, "rings", ((20, 30, 90), (235, 235, 220)), 0.45),
    ClassStyle("brick", "rect", 210.0, "diagonal", ((250, 210, 30), (25, 25, 25)), 0.6),
    ClassStyle("wedge", "triangle", 120.0, "checker", ((200, 30, 40), (245, 245, 245)), 0.5),
    ClassStyle("slug", "ellipse", 285.0, "dots", ((245, 245, 245), (30, 20, 40)), 0.62),
    ClassStyle("cross", "cross", 55.0, "bars", ((220, 40, 200), (40, 210, 220)), 0.0),
)
# Std of body hue (degrees). Colour is a usable class cue (a small CPU network must learn the
# classifier in minutes), shape and pattern are the finer ones; neighbours still overlap a little.
HUE_SPREAD = 12.0
MAX_NUM_CLASSES = len(CLASS_STYLES) + 1


def synthetic_class_names(num_classes: int) -> list[str]:
    """Background + the first num_classes - 1 synthetic classes."""
    if not 2 <= num_classes <= MAX_NUM_CLASSES:
        raise ValueError(f"num_classes must be in 2..{MAX_NUM_CLASSES}, got {num_classes}")
    return ["background"] + [style.name for style in CLASS_STYLES[: num_classes - 1]]


# ----------------------------------------------------------------------------------------------
# Drawing helpers (all on full-size float32 canvases; at 96 px everything is a few microseconds)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1], float32 (size, size)."""
    grid = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _hsv_color(hue: float, saturation: float, value: float) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb((hue % 360.0) / 360.0, saturation, value)
    return np.asarray(rgb, dtype=np.float32) * 255.0


def _body_color(rng: np.random.Generator, style: ClassStyle) -> np.ndarray:
    hue = style.hue + rng.normal(0.0, HUE_SPREAD)
    return _hsv_color(hue, rng.uniform(0.35, 0.8), rng.uniform(0.45, 0.9))


def _textured_fill(
    rng: np.random.Generator, shape: tuple[int, int], color: np.ndarray
) -> np.ndarray:
    """(h, w, 3) float32 colour field: a base colour modulated by blotchy and fine noise."""
    height, width = shape
    cells = int(rng.integers(4, 9))
    grid = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    blotches = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    blotches = blotches[..., None] * np.float32(rng.uniform(15, 40))
    grain = rng.standard_normal(size=(height, width, 1), dtype=np.float32)
    grain *= np.float32(rng.uniform(4, 12))
    return color.astype(np.float32)[None, None, :] + blotches + grain


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return slice(0, 0), slice(0, 0)
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _local_coords(grid: tuple, center: tuple, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates rotated into an object's frame (u along its main axis)."""
    ys, xs = grid
    dx, dy = xs - center[0], ys - center[1]
    cos, sin = math.cos(angle), math.sin(angle)
    return dx * cos + dy * sin, -dx * sin + dy * cos


def _shape_polygon(shape: str, radius: float) -> np.ndarray:
    """Local-frame vertices (u, v) of the polygon shapes."""
    if shape == "rect":
        half_u, half_v = radius, radius * 0.6
        return np.array(
            [[-half_u, -half_v], [half_u, -half_v], [half_u, half_v], [-half_u, half_v]]
        )
    if shape == "triangle":
        return np.array(
            [[radius, 0.0], [-0.6 * radius, -0.85 * radius], [-0.6 * radius, 0.85 * radius]]
        )
    if shape == "cross":
        arm, half = radius, radius * 0.33
        # A plus sign: twelve corners walked clockwise from the top arm.
        corners = [(-1, -3), (1, -3), (1, -1), (3, -1), (3, 1), (1, 1)]
        corners += [(1, 3), (-1, 3), (-1, 1), (-3, 1), (-3, -1), (-1, -1)]
        unit = {1: half, 3: arm}
        return np.array(
            [[math.copysign(unit[abs(a)], a), math.copysign(unit[abs(b)], b)] for a, b in corners]
        )
    raise ValueError(f"no polygon for shape '{shape}'")


def _shape_mask(size: int, shape: str, center: tuple, radius: float, angle: float) -> np.ndarray:
    """Hard bool (size, size) mask: the exact ground truth of the object."""
    canvas = np.zeros((size, size), dtype=np.uint8)
    shift = 4  # sub-pixel vertex precision for cv2 drawing
    scale = 1 << shift
    if shape == "circle":
        cv2.circle(
            canvas,
            (round(center[0] * scale), round(center[1] * scale)),
            round(radius * scale),
            1,
            -1,
            cv2.LINE_8,
            shift,
        )
    elif shape == "ellipse":
        axes = (round(radius * scale), round(radius * 0.45 * scale))
        centre = (round(center[0] * scale), round(center[1] * scale))
        cv2.ellipse(canvas, centre, axes, math.degrees(angle), 0, 360, 1, -1, cv2.LINE_8, shift)
    else:
        local = _shape_polygon(shape, radius)
        cos, sin = math.cos(angle), math.sin(angle)
        xs = center[0] + local[:, 0] * cos - local[:, 1] * sin
        ys = center[1] + local[:, 0] * sin + local[:, 1] * cos
        points = np.round(np.stack([xs, ys], axis=1) * scale).astype(np.int32)
        cv2.fillPoly(canvas, [points], 1, cv2.LINE_8, shift)
    return canvas.astype(bool)


def _pattern(style: ClassStyle, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Bool (H, W): True where the pattern's first colour goes."""
    if style.pattern == "rings":
        return (np.sqrt(u * u + v * v) / period) % 1.0 < 0.5
    if style.pattern == "diagonal":
        return ((u + v) / period) % 1.0 < 0.5
    if style.pattern == "checker":
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    if style.pattern == "dots":
        fu, fv = (u / period) % 1.0 - 0.5, (v / period) % 1.0 - 0.5
        return fu * fu + fv * fv < 0.1
    if style.pattern == "bars":
        return (v / period) % 1.0 < 0.5
    raise ValueError(f"unknown pattern '{style.pattern}'")


# ----------------------------------------------------------------------------------------------
# One image


def _background(rng: np.random.Generator, size: int, grid: tuple) -> np.ndarray:
    """Gradient + blotchy texture + random lines: a cluttered (size, size, 3) float canvas."""
    ys, xs = grid
    direction = rng.uniform(0, 2 * math.pi)
    ramp = ((xs * math.cos(direction) + ys * math.sin(direction)) / size)[..., None]  # (H, W, 1)
    start = _hsv_color(rng.uniform(0, 360), rng.uniform(0.05, 0.5), rng.uniform(0.3, 0.85))
    end = _hsv_color(rng.uniform(0, 360), rng.uniform(0.05, 0.5), rng.uniform(0.3, 0.85))
    canvas = start + (end - start) * (ramp - ramp.min())
    canvas = canvas + _smooth_noise(rng, size, int(rng.integers(3, 12)))[..., None] * rng.uniform(
        10, 35
    )
    canvas = np.ascontiguousarray(canvas, dtype=np.float32)
    for _ in range(int(rng.integers(3, 9))):
        p0 = tuple(int(c) for c in rng.integers(0, size, size=2))
        p1 = tuple(int(c) for c in rng.integers(0, size, size=2))
        color = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        cv2.line(canvas, p0, p1, color, int(rng.integers(1, 3)), cv2.LINE_AA)
    return canvas


def _paint_distractors(
    rng: np.random.Generator, canvas: np.ndarray, size: int, styles: Sequence[ClassStyle]
) -> list[np.ndarray]:
    """Textured blobs in dull colours (object-like, but no class colour or pattern); their masks.

    The simulated saliency fires on some of them: false positives the pipeline must reject.
    """
    masks = []
    for _ in range(int(rng.integers(1, 5))):
        radius = rng.uniform(0.06, 0.2) * size
        center = tuple(rng.uniform(0, size, size=2))
        shape = ("circle", "ellipse", "rect")[int(rng.integers(3))]
        mask = _shape_mask(size, shape, center, radius, rng.uniform(0, math.pi))
        box = _bounding_box(mask)
        if not mask[box].size:
            continue
        dull = _hsv_color(rng.uniform(0, 360), rng.uniform(0.0, 0.25), rng.uniform(0.3, 0.8))
        fill = _textured_fill(rng, mask[box].shape, dull)
        canvas[box][mask[box]] = fill[mask[box]]
        masks.append(mask)
    return masks


def _place_object(rng, size, previous):
    """(center, radius): random, or touching/overlapping the previous object 40% of the time."""
    radius = rng.uniform(0.13, 0.3) * size
    if previous and rng.random() < 0.4:
        (prev_x, prev_y), prev_radius = previous[-1]
        angle = rng.uniform(0, 2 * math.pi)
        distance = (prev_radius + radius) * rng.uniform(0.7, 1.0)
        center = (prev_x + distance * math.cos(angle), prev_y + distance * math.sin(angle))
        center = tuple(float(np.clip(c, 0.1 * size, 0.9 * size)) for c in center)
    else:
        center = tuple(rng.uniform(0.15 * size, 0.85 * size, size=2))
    return center, radius


def _paint_object(rng, canvas, size, grid, style, center, radius):
    """Paint body + pattern patch; return the object's full mask (before later occlusion)."""
    angle = rng.uniform(0, 2 * math.pi)
    mask = _shape_mask(size, style.shape, center, radius, angle)
    box = _bounding_box(mask)  # paint inside the object's box only: 5x less work at 96 px
    box_mask = mask[box]
    if not box_mask.size:
        return mask
    box_grid = (grid[0][box], grid[1][box])
    body = _textured_fill(rng, box_mask.shape, _body_color(rng, style))
    light_angle = angle + rng.uniform(0, 2 * math.pi)
    shading = _local_coords(box_grid, center, light_angle)[0] / max(radius, 1.0)
    body *= 1.0 + 0.12 * shading[..., None]  # mild directional lighting
    u, v = _local_coords(box_grid, center, angle)
    part_u = style.part_offset * radius
    part_radius = 0.42 * radius
    part = box_mask & ((u - part_u) ** 2 + v * v < part_radius**2)
    period = max(2.5, radius * rng.uniform(0.18, 0.26))
    first = _pattern(style, u - part_u, v, period)
    colors = [
        (np.asarray(c, dtype=np.float32) + rng.normal(0, 12, size=3)).astype(np.float32)
        for c in style.pattern_colors
    ]
    patterned = np.where(first[..., None], colors[0], colors[1])
    patterned += rng.standard_normal(size=patterned.shape, dtype=np.float32) * np.float32(6.0)
    region = canvas[box]
    region[box_mask] = body[box_mask]
    region[part] = patterned[part]
    return mask


def _simulated_saliency(rng, size, instance_map, objects, distractors):
    """float32 (size, size): a plausible but imperfect saliency detector's output."""
    saliency = np.zeros((size, size), dtype=np.float32)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    for index, (center, radius) in enumerate(objects, start=1):
        visible = instance_map == index
        strength = rng.uniform(0.65, 1.0)
        saliency[visible] = strength
        if rng.random() < 0.4:
            # Miss a part: a half-plane through (near) the centre is weak or absent.
            angle = rng.uniform(0, 2 * math.pi)
            offset = rng.uniform(-0.3, 0.4) * radius
            side = (xs - center[0]) * math.cos(angle) + (ys - center[1]) * math.sin(angle) > offset
            saliency[visible & side] *= rng.uniform(0.0, 0.3)
    for mask in distractors:
        if rng.random() < 0.4:
            fires = mask & (instance_map == 0)
            saliency[fires] = np.maximum(saliency[fires], rng.uniform(0.35, 0.85))
    sigma = rng.uniform(0.015, 0.035) * size
    saliency = cv2.GaussianBlur(saliency, (0, 0), sigmaX=sigma)
    # Detector-like noise: multiplicative on responses (a real detector is ~0 on plain background,
    # so the paper's 0.06 threshold stays meaningful), plus a faint additive floor.
    saliency *= 1.0 + _smooth_noise(rng, size, int(rng.integers(3, 7))) * rng.uniform(0.1, 0.3)
    saliency += np.abs(rng.normal(0, 0.01, size=(size, size))).astype(np.float32)
    return np.clip(saliency, 0.0, 1.0)


def synthesize_image(
    rng: np.random.Generator, size: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sample: image uint8 (size, size, 3) RGB, mask uint8 (size, size), saliency float32."""
    styles = CLASS_STYLES[: num_classes - 1]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    grid = (ys, xs)
    canvas = _background(rng, size, grid)
    distractors = _paint_distractors(rng, canvas, size, styles)
    mask = np.zeros((size, size), dtype=np.uint8)
    instance_map = np.zeros((size, size), dtype=np.uint8)
    objects: list = []
    num_objects = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    for index in range(1, num_objects + 1):
        class_index = int(rng.integers(len(styles)))
        center, radius = _place_object(rng, size, objects)
        object_mask = _paint_object(rng, canvas, size, grid, styles[class_index], center, radius)
        mask[object_mask] = class_index + 1  # later objects occlude earlier ones
        instance_map[object_mask] = index
        objects.append((center, radius))
    saliency = _simulated_saliency(rng, size, instance_map, objects, distractors)
    image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    return image, mask, saliency


# ----------------------------------------------------------------------------------------------
# The dataset


def write_voc_sample(
    root: str,
    image_id: str,
    image: np.ndarray,
    mask: np.ndarray,
    palette: np.ndarray,
    saliency: np.ndarray | None = None,
) -> None:
    """JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette) and, if given, saliency/<id>.png."""
    ok, encoded = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for image '{image_id}'")
    storage.write_bytes_atomic(
        storage.join(root, "JPEGImages", f"{image_id}.jpg"), encoded.tobytes()
    )
    io.write_png_atomic(storage.join(root, "SegmentationClass", f"{image_id}.png"), mask, palette)
    if saliency is not None:
        io.write_png_atomic(
            storage.join(root, "saliency", f"{image_id}.png"), io.saliency_to_uint8(saliency)
        )


def write_voc_index(root: str, class_names: list[str], ids_per_split: dict[str, list[str]]) -> None:
    """class_names.txt and ImageSets/Segmentation/<split>.txt, the files `voc_records` starts from."""
    storage.makedirs(storage.join(root, "ImageSets", "Segmentation"))
    storage.write_bytes_atomic(
        storage.join(root, "class_names.txt"), ("\n".join(class_names) + "\n").encode()
    )
    for split, ids in ids_per_split.items():
        split_file = storage.join(root, "ImageSets", "Segmentation", f"{split}.txt")
        storage.write_bytes_atomic(split_file, "".join(f"{i}\n" for i in ids).encode())


def generate_synthetic(
    out_dir: str,
    n_train: int,
    n_val: int,
    size: int = 96,
    seed: int = 0,
    num_classes: int = MAX_NUM_CLASSES,
) -> dict:
    """Write a synthetic VOC-layout dataset to `out_dir` (local path or URI).

    num_classes counts the background (2..6). Returns {"root", "class_names", "n_train", "n_val"}.
    """
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    class_names = synthetic_class_names(num_classes)
    palette = io.voc_palette()
    label_lines = ["image_id,labels"]
    ids_per_split = {}
    for split, count in (("train", n_train), ("val", n_val)):
        ids = []
        for index in range(count):
            image_id = f"{split}_{index:06d}"
            rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
            image, mask, saliency = synthesize_image(rng, size, num_classes)
            write_voc_sample(out_dir, image_id, image, mask, palette, saliency)
            present = [int(c) for c in np.unique(mask) if c != 0]
            label_lines.append(f"{image_id},{' '.join(class_names[c] for c in present)}")
            ids.append(image_id)
        ids_per_split[split] = ids
    write_voc_index(out_dir, class_names, ids_per_split)
    storage.write_bytes_atomic(
        storage.join(out_dir, "image_labels.csv"), ("\n".join(label_lines) + "\n").encode()
    )
    return {"root": out_dir, "class_names": class_names, "n_train": n_train, "n_val": n_val}


__all__ = [
    "CLASS_STYLES",
    "MAX_NUM_CLASSES",
    "generate_synthetic",
    "synthesize_image",
    "synthetic_class_names",
    "write_voc_index",
    "write_voc_sample",
]
