"""Small synthetic anomaly-detection datasets built from scikit-image textures.

The generators in this module write datasets to disk in the folder layouts that
anomalib's ``MVTecAD`` and ``MVTec3D`` datamodules read, so that tests and
examples can run end to end without downloading anything. Normal images are
random crops of real texture photographs that ship inside the installed
``scikit-image`` package (``skimage/data/*.png``); they are read straight from
the package folder, so no network access (pooch) is ever attempted.

Defects are synthetic but placed on real texture:

* ``"crack"``: a thin (1-3 px), jagged, antialiased polyline that darkens or
  brightens the texture underneath.
* ``"blob"``: a feathered elliptical patch covering a few percent of the image
  whose texture is replaced (blurred, or the same texture at a wrong scale) and
  whose intensity is shifted.
* 3-D ``"bump"`` / ``"dent"``: a smooth Gaussian displacement of the ``z``
  coordinate of an organized point cloud, optionally invisible in RGB.
* 3-D ``"groove"``: a thin, jagged furrow pressed into the surface (a dent
  along a crack-like polyline), optionally invisible in RGB.

Ground-truth masks are exact: for 2-D defects, a pixel is in the mask if and
only if its 8-bit value changed by at least :data:`MASK_THRESHOLD` grey levels
in some channel; smaller antialiasing residues are reverted to the original
pixel values, so every altered pixel is labelled and every labelled pixel is
altered. For 3-D defects the mask is ``|dz| >= 0.25 * |amplitude|``.

Every generated category folder also holds a ``defects.json`` manifest
(ignored by anomalib) describing each defective test image.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import tifffile
from PIL import Image

__all__ = [
    "DEFECT_KINDS",
    "GEOMETRY_DEFECT_KINDS",
    "MASK_THRESHOLD",
    "TEXTURES",
    "available_textures",
    "fix_mvtec3d_mask_paths",
    "load_texture",
    "make_mvtec3d_dataset",
    "make_mvtec_dataset",
]

#: Texture name -> file name inside ``skimage/data`` (all bundled with the
#: wheel, so they load offline). ``brick``, ``grass`` and ``gravel`` are true
#: stationary textures; the others are natural photographs usable as
#: harder, non-stationary "textures".
TEXTURES: dict[str, str] = {
    "brick": "brick.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "moon": "moon.png",
    "camera": "camera.png",
    "coins": "coins.png",
    "coffee": "coffee.png",
    "chelsea": "chelsea.png",
    "astronaut": "astronaut.png",
}

#: Supported 2-D defect kinds for :func:`make_mvtec_dataset`.
DEFECT_KINDS: tuple[str, ...] = ("crack", "blob")

#: Supported 3-D defect kinds for :func:`make_mvtec3d_dataset`.
GEOMETRY_DEFECT_KINDS: tuple[str, ...] = ("bump", "dent", "groove")

#: Minimum change (in 8-bit grey levels, max over channels) for a pixel to be
#: counted as altered; smaller changes are reverted.
MASK_THRESHOLD: int = 10

# Seeds of the per-image random generators: [seed, split id, index].
_SPLIT_TRAIN, _SPLIT_TEST_GOOD, _SPLIT_TEST_DEFECT = 0, 1, 2
_SPLIT_GEOMETRY = 3


def _skimage_data_dir() -> Path:
    import skimage.data  # lazy: skimage is heavy to import

    return Path(skimage.data.__file__).parent


def available_textures() -> list[str]:
    """List the texture names whose image files exist in the installed skimage.

    Returns:
        list[str]: Names usable as ``texture`` in the dataset generators.

    Example:
        >>> "brick" in available_textures()
        True
    """
    data_dir = _skimage_data_dir()
    return [name for name, fname in TEXTURES.items() if (data_dir / fname).is_file()]


@lru_cache(maxsize=16)
def _load_texture_cached(texture: str) -> np.ndarray:
    if texture not in TEXTURES:
        msg = f"Unknown texture {texture!r}; choose one of {sorted(TEXTURES)}."
        raise ValueError(msg)
    path = _skimage_data_dir() / TEXTURES[texture]
    if not path.is_file():
        msg = f"Texture file {path} is not shipped with this scikit-image installation."
        raise FileNotFoundError(msg)
    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB") if img.mode not in {"L", "RGB"} else img)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    arr.setflags(write=False)
    return arr


def load_texture(texture: str = "brick") -> np.ndarray:
    """Load a bundled scikit-image texture as an RGB ``uint8`` array.

    Grey textures are replicated to three channels. The file is read directly
    from the installed package, never downloaded.

    Args:
        texture: One of :data:`TEXTURES` (see :func:`available_textures`).

    Returns:
        np.ndarray: Read-only array of shape ``(H, W, 3)`` and dtype ``uint8``.

    Raises:
        ValueError: If ``texture`` is not a known name.
        FileNotFoundError: If the image is missing from the skimage install.

    Example:
        >>> load_texture("gravel").shape
        (512, 512, 3)
    """
    return _load_texture_cached(texture)


# --------------------------------------------------------------------------- #
# Image helpers
# --------------------------------------------------------------------------- #
def _random_crop(tex: np.ndarray, size: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Random square crop (+ flips / 90-degree rotation) resized to ``size``."""
    h, w = tex.shape[:2]
    side = min(h, w)
    crop = round(float(side * scale * rng.uniform(0.4, 0.6)))
    crop = int(np.clip(crop, 8, side))
    y = int(rng.integers(0, h - crop + 1))
    x = int(rng.integers(0, w - crop + 1))
    patch = tex[y : y + crop, x : x + crop]
    patch = np.rot90(patch, k=int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[::-1, :]
    interp = cv2.INTER_AREA if crop >= size else cv2.INTER_CUBIC
    return cv2.resize(np.ascontiguousarray(patch), (size, size), interpolation=interp)


def _supersampled_alpha(size: int, draw, ss: int = 4) -> np.ndarray:
    """Render a shape with ``draw(canvas, ss)`` at ``ss``x resolution -> float alpha."""
    canvas = np.zeros((size * ss, size * ss), np.uint8)
    draw(canvas, ss)
    alpha = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    return alpha.astype(np.float32) / 255.0


def _shift_intensity(src: np.ndarray, ref: np.ndarray, dark: bool, strength: float, min_change: float) -> np.ndarray:
    """Darken/brighten ``src`` and guarantee at least ``min_change`` w.r.t. ``ref``."""
    src = src.astype(np.float32)
    ref = ref.astype(np.float32)
    if dark:
        out = np.minimum(src * (1.0 - strength), ref - min_change)
    else:
        out = np.maximum(src + (255.0 - src) * strength, ref + min_change)
    return np.clip(out, 0.0, 255.0)


def _blend_exact(orig: np.ndarray, target: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Alpha-blend and make the mask equal to the set of altered pixels."""
    blended = orig.astype(np.float32) * (1.0 - alpha[..., None]) + target * alpha[..., None]
    out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    diff = np.abs(out.astype(np.int16) - orig.astype(np.int16)).max(axis=2)
    mask = diff >= MASK_THRESHOLD
    out[~mask] = orig[~mask]
    return out, mask


def _random_polyline(size: int, rng: np.random.Generator) -> np.ndarray:
    """A jagged random walk of 8-15 segments spanning 35-65 % of the image side, ``(N, 2)`` xy points."""
    n_seg = int(rng.integers(8, 16))
    length = size * rng.uniform(0.35, 0.65)
    step = length / n_seg
    heading = rng.uniform(0, 2 * math.pi)
    start = rng.uniform(0.25, 0.75, size=2) * size
    pts = [start]
    for _ in range(n_seg):
        heading += rng.normal(0.0, 0.45)
        nxt = pts[-1] + step * np.array([math.cos(heading), math.sin(heading)])
        pts.append(np.clip(nxt, 2, size - 3))
    return np.asarray(pts)


def _add_crack(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    size = img.shape[0]
    thickness = int(rng.integers(1, 4))  # 1-3 px at output resolution
    pts_arr = _random_polyline(size, rng)

    def draw(canvas: np.ndarray, ss: int) -> None:
        p = np.rint((pts_arr + 0.5) * ss - 0.5).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(canvas, [p], isClosed=False, color=255, thickness=thickness * ss, lineType=cv2.LINE_8)

    alpha = _supersampled_alpha(size, draw)
    dark = bool(rng.random() < 0.6)
    strength = float(rng.uniform(0.55, 0.8))
    target = _shift_intensity(img, img, dark, strength, min_change=35.0)
    out, mask = _blend_exact(img, target, alpha)
    info = {
        "kind": "crack",
        "thickness_px": thickness,
        "polarity": "dark" if dark else "bright",
        "strength": round(strength, 3),
    }
    return out, mask, info


def _add_blob(img: np.ndarray, tex: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    size = img.shape[0]
    area_frac = float(rng.uniform(0.02, 0.06))
    aspect = float(rng.uniform(1.0, 2.2))
    area = area_frac * size * size
    a = math.sqrt(area * aspect / math.pi)  # semi-major axis
    b = area / (math.pi * a)
    angle = float(rng.uniform(0, 180))
    margin = a + 2
    cx, cy = rng.uniform(margin, size - margin, size=2) if size > 2 * margin else (size / 2, size / 2)

    def draw(canvas: np.ndarray, ss: int) -> None:
        cv2.ellipse(
            canvas,
            (int(cx * ss), int(cy * ss)),
            (max(1, int(a * ss)), max(1, int(b * ss))),
            angle,
            0,
            360,
            color=255,
            thickness=-1,
            lineType=cv2.LINE_8,
        )

    alpha = _supersampled_alpha(size, draw)
    alpha = cv2.GaussianBlur(alpha, (0, 0), sigmaX=max(0.6, size / 160))

    mode = "blur" if rng.random() < 0.5 else "rescaled"
    if mode == "blur":
        content = cv2.GaussianBlur(img, (0, 0), sigmaX=size * rng.uniform(0.015, 0.03))
    else:  # same texture at a clearly wrong scale
        content = _random_crop(tex, size, rng, scale=float(rng.choice([0.4, 1.6])))
    dark = bool(rng.random() < 0.5)
    strength = float(rng.uniform(0.2, 0.4))
    target = _shift_intensity(content, img, dark, strength, min_change=20.0)
    out, mask = _blend_exact(img, target, alpha)
    info = {
        "kind": "blob",
        "texture_mode": mode,
        "polarity": "dark" if dark else "bright",
        "strength": round(strength, 3),
        "area_fraction": round(area_frac, 4),
        "center_xy": [round(float(cx), 1), round(float(cy), 1)],
    }
    return out, mask, info


# --------------------------------------------------------------------------- #
# IO helpers
# --------------------------------------------------------------------------- #
def _prepare_dir(path: Path, suffixes: Sequence[str]) -> Path:
    """Create ``path``; delete stale generated files (given suffixes) inside it."""
    path.mkdir(parents=True, exist_ok=True)
    for f in path.iterdir():
        if f.is_file() and f.suffix.lower() in suffixes:
            f.unlink()
    return path


def _save_rgb(path: Path, img: np.ndarray) -> None:
    Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(path, compress_level=1)


def _save_mask(path: Path, mask: np.ndarray) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path, compress_level=1)


def _name(i: int, n: int) -> str:
    return f"{i:0{max(3, len(str(max(n - 1, 0))))}d}"


def _check_counts(**counts: int) -> None:
    for key, val in counts.items():
        if val < 0:
            msg = f"{key} must be >= 0, got {val}."
            raise ValueError(msg)


# --------------------------------------------------------------------------- #
# MVTec AD
# --------------------------------------------------------------------------- #
def make_mvtec_dataset(
    root: str | Path,
    category: str = "texture",
    texture: str = "brick",
    n_train: int = 20,
    n_test_good: int = 5,
    n_test_defect: int = 10,
    image_size: int = 128,
    seed: int = 0,
    defect_kinds: Sequence[str] = ("crack", "blob"),
) -> Path:
    """Write a small MVTec AD-style dataset built from a scikit-image texture.

    Layout (under ``root/category``)::

        train/good/000.png ...
        test/good/000.png ...
        test/defect/000.png ...
        ground_truth/defect/000_mask.png ...
        defects.json          # per-image defect kind/params (ignored by anomalib)

    Images are RGB PNGs (grey textures replicated to 3 channels), each a random
    crop of the texture with a random flip / 90-degree rotation, resized to
    ``image_size``. Every defective image carries one defect; kinds cycle
    through ``defect_kinds``. Masks are single-channel 0/255 PNGs equal to the
    set of pixels whose 8-bit value changed by at least
    :data:`MASK_THRESHOLD` in some channel (sub-threshold antialiasing residues
    are reverted, so mask == altered pixels exactly). Image ``i`` of each split
    depends only on ``(seed, split, i)``, so changing one count does not
    change the other splits. Existing ``.png`` files in the four leaf folders
    are deleted first so that stale files cannot break loading.

    Args:
        root: Dataset root (what ``anomalib.data.MVTecAD(root=...)`` expects).
        category: Category folder name created under ``root``.
        texture: Texture name, see :func:`available_textures`.
        n_train: Number of normal training images.
        n_test_good: Number of normal test images.
        n_test_defect: Number of defective test images (with masks).
        image_size: Side length in pixels of the square images.
        seed: Random seed; output is deterministic given all arguments.
        defect_kinds: Non-empty subset of :data:`DEFECT_KINDS`
            (``"crack"``, ``"blob"``), used round-robin.

    Returns:
        Path: The category directory ``root / category``.

    Raises:
        ValueError: On an unknown texture or defect kind, or bad sizes.

    Example:
        >>> import tempfile
        >>> from anomalib.data import MVTecAD
        >>> root = tempfile.mkdtemp()
        >>> path = make_mvtec_dataset(root, category="brick", n_train=4,
        ...                           n_test_good=2, n_test_defect=2)
        >>> sorted(p.name for p in (path / "test").iterdir())
        ['defect', 'good']
        >>> dm = MVTecAD(root=root, category="brick", num_workers=0)
        >>> dm.setup()
        >>> batch = next(iter(dm.test_dataloader()))
        >>> tuple(batch.image.shape), tuple(batch.gt_mask.shape)
        ((4, 3, 128, 128), (4, 128, 128))
    """
    kinds = tuple(defect_kinds)
    unknown = [k for k in kinds if k not in DEFECT_KINDS]
    if unknown or (n_test_defect > 0 and not kinds):
        msg = f"defect_kinds must be a non-empty subset of {DEFECT_KINDS}, got {kinds}."
        raise ValueError(msg)
    if image_size < 16:
        msg = f"image_size must be >= 16, got {image_size}."
        raise ValueError(msg)
    _check_counts(n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect)
    tex = load_texture(texture)

    cat_dir = Path(root) / category
    train_dir = _prepare_dir(cat_dir / "train" / "good", (".png",))
    test_good_dir = _prepare_dir(cat_dir / "test" / "good", (".png",))
    test_def_dir = _prepare_dir(cat_dir / "test" / "defect", (".png",))
    gt_dir = _prepare_dir(cat_dir / "ground_truth" / "defect", (".png",))

    for i in range(n_train):
        rng = np.random.default_rng([seed, _SPLIT_TRAIN, i])
        _save_rgb(train_dir / f"{_name(i, n_train)}.png", _random_crop(tex, image_size, rng))
    for i in range(n_test_good):
        rng = np.random.default_rng([seed, _SPLIT_TEST_GOOD, i])
        _save_rgb(test_good_dir / f"{_name(i, n_test_good)}.png", _random_crop(tex, image_size, rng))

    manifest: dict[str, dict] = {}
    for i in range(n_test_defect):
        rng = np.random.default_rng([seed, _SPLIT_TEST_DEFECT, i])
        img = _random_crop(tex, image_size, rng)
        kind = kinds[i % len(kinds)]
        for _ in range(10):  # retry in the (rare) case a defect barely alters pixels
            out, mask, info = _add_crack(img, rng) if kind == "crack" else _add_blob(img, tex, rng)
            if mask.sum() >= 8:
                break
        name = _name(i, n_test_defect)
        _save_rgb(test_def_dir / f"{name}.png", out)
        _save_mask(gt_dir / f"{name}_mask.png", mask)
        info["mask_fraction"] = round(float(mask.mean()), 5)
        manifest[f"test/defect/{name}.png"] = info

    meta = {
        "generator": "anomalib_tts.data.synthetic.make_mvtec_dataset",
        "texture": texture,
        "seed": seed,
        "image_size": image_size,
        "mask_threshold": MASK_THRESHOLD,
        "defects": manifest,
    }
    (cat_dir / "defects.json").write_text(json.dumps(meta, indent=1))
    return cat_dir


# --------------------------------------------------------------------------- #
# MVTec 3D-AD
# --------------------------------------------------------------------------- #
def _surface_xyz(size: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Smooth, gently curved organized point cloud (metres), float32 (H, W, 3)."""
    extent = 0.08  # metres covered by the image side
    lin = np.linspace(-1.0, 1.0, size, dtype=np.float64)
    u, v = np.meshgrid(lin, lin)  # u: columns (x), v: rows (y)
    z = (
        rng.uniform(0.55, 0.65)
        + rng.uniform(-3e-3, 3e-3) * u**2
        + rng.uniform(-3e-3, 3e-3) * v**2
        + rng.uniform(-1e-3, 1e-3) * u * v
        + rng.uniform(-2e-3, 2e-3) * u
        + rng.uniform(-2e-3, 2e-3) * v
        + rng.uniform(0, 3e-4) * np.sin(2 * np.pi * rng.uniform(0.5, 1.5) * (u + v) + rng.uniform(0, 2 * np.pi))
    )
    xyz = np.stack([u * extent / 2, v * extent / 2, z], axis=-1)
    return xyz, extent


def _missing_points(size: int, rng: np.random.Generator, frac: float = 0.02) -> np.ndarray:
    """Boolean map of missing points: small clusters plus isolated pixels."""
    low = rng.standard_normal((max(4, size // 8), max(4, size // 8))).astype(np.float32)
    field = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    field += 0.5 * rng.standard_normal((size, size)).astype(np.float32)
    clusters = field >= np.quantile(field, 1.0 - 0.7 * frac)
    isolated = rng.random((size, size)) < 0.3 * frac
    return clusters | isolated


def _surface_defect(kind: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, float, dict]:
    """Profile (peak 1), signed amplitude in metres and manifest entries of one 3-D defect."""
    if kind == "groove":
        amp = -rng.uniform(3e-4, 8e-4)
        half_width = rng.uniform(1.0, 2.5) * size / 128
        line = np.full((size, size), 255, np.uint8)
        points = np.rint(_random_polyline(size, rng)).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(line, [points], isClosed=False, color=0, thickness=1, lineType=cv2.LINE_8)
        distance = cv2.distanceTransform(line, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        profile = np.clip(half_width + 0.5 - distance.astype(np.float64), 0.0, 1.0)  # steep, antialiased walls
        info = {"kind": kind, "amplitude_m": round(float(amp), 6), "half_width_px": round(half_width, 2)}
        return profile, float(amp), info
    amp = rng.uniform(6e-4, 1.5e-3) * (1.0 if kind == "bump" else -1.0)
    sigma = rng.uniform(0.04, 0.08) * size
    m = 2.0 * sigma
    cx, cy = rng.uniform(m, size - 1 - m, size=2)
    yy, xx = np.mgrid[0:size, 0:size]
    profile = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2.0 * sigma**2))
    info = {
        "kind": kind,
        "amplitude_m": round(float(amp), 6),
        "sigma_px": round(float(sigma), 2),
        "center_xy": [round(float(cx), 1), round(float(cy), 1)],
    }
    return profile, float(amp), info


def make_mvtec3d_dataset(
    root: str | Path,
    category: str = "texture3d",
    texture: str = "gravel",
    n_train: int = 20,
    n_test_good: int = 5,
    n_test_defect: int = 10,
    image_size: int = 128,
    seed: int = 0,
    geometry_only_defects: bool = True,
    defect_kinds: Sequence[str] = ("bump", "dent"),
) -> Path:
    """Write a small MVTec 3D-AD-style dataset (RGB + organized XYZ point cloud).

    Layout (under ``root/category``), as read by ``anomalib.data.MVTec3D``::

        train/good/rgb/000.png   train/good/xyz/000.tiff
        test/good/rgb/000.png    test/good/xyz/000.tiff    test/good/gt/000.png
        test/defect/rgb/000.png  test/defect/xyz/000.tiff  test/defect/gt/000.png
        defects.json             # per-image bump/dent parameters (ignored by anomalib)

    (No ``validation`` folder is written: anomalib's ``MVTec3D`` datamodule
    never reads it.) RGB images are random texture crops as in
    :func:`make_mvtec_dataset`. XYZ files are float32 ``(H, W, 3)`` TIFFs of a
    smooth, gently curved surface in metres (``z`` around 0.6 m, a few mm of
    curvature/tilt, 0.05 mm Gaussian noise); about 2 % of points are missing
    (all three coordinates set to 0, in small clusters and isolated pixels).

    Each defective sample has one defect, added to ``z`` only; kinds cycle
    through ``defect_kinds``: a Gaussian ``"bump"`` or ``"dent"`` of amplitude
    0.6-1.5 mm and width sigma 4-8 % of the image side, or a ``"groove"``: a
    flat-bottomed furrow 0.3-0.8 mm deep with steep walls, 1-2.5 px per 128 px
    of image side to each side of a jagged polyline like the 2-D cracks. Its
    mask (0/255 PNG, ``gt``) is ``|dz| >= 0.25 * |amplitude|``; normal test
    samples get all-zero masks. With ``geometry_only_defects=True`` the RGB
    image is an untouched normal crop, so the defect is visible only in the
    point cloud; otherwise the RGB is also darkened in proportion to ``|dz|``
    (up to 30-45 %).

    Existing ``.png``/``.tiff`` files in the leaf folders are deleted first.

    Args:
        root: Dataset root (what ``anomalib.data.MVTec3D(root=...)`` expects).
        category: Category folder name created under ``root``.
        texture: Texture for the RGB images, see :func:`available_textures`.
        n_train: Number of normal training samples.
        n_test_good: Number of normal test samples.
        n_test_defect: Number of defective test samples.
        image_size: Side length in pixels of images and point clouds.
        seed: Random seed; output is deterministic given all arguments.
        geometry_only_defects: If ``True`` defects exist only in the geometry.
        defect_kinds: Non-empty subset of :data:`GEOMETRY_DEFECT_KINDS`
            (``"bump"``, ``"dent"``, ``"groove"``), used round-robin.

    Returns:
        Path: The category directory ``root / category``.

    Raises:
        ValueError: On an unknown texture or defect kind, or bad sizes.

    Example:
        >>> import tempfile, tifffile
        >>> root = tempfile.mkdtemp()
        >>> path = make_mvtec3d_dataset(root, n_train=4, n_test_good=2, n_test_defect=2)
        >>> xyz = tifffile.imread(path / "test" / "defect" / "xyz" / "000.tiff")
        >>> xyz.shape, xyz.dtype
        ((128, 128, 3), dtype('float32'))
    """
    if image_size < 16:
        msg = f"image_size must be >= 16, got {image_size}."
        raise ValueError(msg)
    kinds = tuple(defect_kinds)
    if any(kind not in GEOMETRY_DEFECT_KINDS for kind in kinds) or (n_test_defect > 0 and not kinds):
        msg = f"defect_kinds must be a non-empty subset of {GEOMETRY_DEFECT_KINDS}, got {kinds}."
        raise ValueError(msg)
    _check_counts(n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect)
    tex = load_texture(texture)
    noise_sigma = 5e-5  # metres
    cat_dir = Path(root) / category

    def sample(split_id: int, i: int) -> tuple[np.random.Generator, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rgb = _random_crop(tex, image_size, np.random.default_rng([seed, split_id, i]))
        grng = np.random.default_rng([seed, _SPLIT_GEOMETRY, split_id, i])
        xyz, _ = _surface_xyz(image_size, grng)
        noise = grng.normal(0.0, noise_sigma, size=(image_size, image_size))
        missing = _missing_points(image_size, grng)
        return grng, rgb, xyz, noise, missing

    splits = [
        ("train", "good", _SPLIT_TRAIN, n_train),
        ("test", "good", _SPLIT_TEST_GOOD, n_test_good),
        ("test", "defect", _SPLIT_TEST_DEFECT, n_test_defect),
    ]
    manifest: dict[str, dict] = {}
    for split, label, split_id, n in splits:
        base = cat_dir / split / label
        rgb_dir = _prepare_dir(base / "rgb", (".png",))
        xyz_dir = _prepare_dir(base / "xyz", (".tiff", ".tif"))
        gt_dir = _prepare_dir(base / "gt", (".png",)) if split == "test" else None
        for i in range(n):
            grng, rgb, xyz, noise, missing = sample(split_id, i)
            mask = np.zeros((image_size, image_size), dtype=bool)
            name = _name(i, n)
            if label == "defect":
                profile, amp, info = _surface_defect(kinds[i % len(kinds)], image_size, grng)
                xyz[..., 2] += amp * profile
                mask = profile >= 0.25
                if not geometry_only_defects:
                    k = grng.uniform(0.3, 0.45)
                    rgb = np.clip(np.rint(rgb.astype(np.float32) * (1.0 - k * profile[..., None])), 0, 255).astype(
                        np.uint8
                    )
                info["mask_fraction"] = round(float(mask.mean()), 5)
                info["rgb_altered"] = not geometry_only_defects
                manifest[f"test/defect/rgb/{name}.png"] = info
            _save_rgb(rgb_dir / f"{name}.png", rgb)
            xyz[..., 2] += noise
            xyz[missing] = 0.0
            tifffile.imwrite(
                xyz_dir / f"{name}.tiff", xyz.astype(np.float32), photometric="minisblack", planarconfig="contig"
            )
            if gt_dir is not None:
                _save_mask(gt_dir / f"{name}.png", mask)

    meta = {
        "generator": "anomalib_tts.data.synthetic.make_mvtec3d_dataset",
        "texture": texture,
        "seed": seed,
        "image_size": image_size,
        "units": "metres",
        "noise_sigma_m": noise_sigma,
        "mask_rule": "|dz| >= 0.25*|amplitude|",
        "geometry_only_defects": geometry_only_defects,
        "defects": manifest,
    }
    (cat_dir / "defects.json").write_text(json.dumps(meta, indent=1))
    return cat_dir


def fix_mvtec3d_mask_paths(datamodule: object) -> None:
    """Work around anomalib 2.7's MVTec 3D-AD loader under pandas >= 3.

    ``anomalib.data.datasets.depth.mvtec_3d.make_mvtec_3d_dataset`` only fills
    ``mask_path`` for test rows and relies on ``astype(str)`` to turn the NaN of
    the training rows into a string. pandas 3 keeps them as ``float('nan')``,
    so building a ``DepthItem`` for any *training* sample raises ``TypeError:
    Path must be None, a string, or Path object``. This replaces missing mask
    paths by ``""`` (read as "no mask") in every dataset the datamodule holds.
    It is a no-op when nothing is missing, so it is safe on any version.

    Args:
        datamodule: An ``anomalib.data.MVTec3D`` (or any datamodule) after
            ``setup()``; datasets it has not built yet are skipped.

    Example:
        >>> import tempfile
        >>> from anomalib.data import MVTec3D
        >>> root = tempfile.mkdtemp()
        >>> _ = make_mvtec3d_dataset(root, n_train=2, n_test_good=1, n_test_defect=1)
        >>> dm = MVTec3D(root=root, category="texture3d", num_workers=0)
        >>> dm.setup()
        >>> fix_mvtec3d_mask_paths(dm)
        >>> tuple(next(iter(dm.train_dataloader())).depth_map.shape)
        (2, 3, 128, 128)
    """
    for attr in ("train_data", "val_data", "test_data"):
        dataset = getattr(datamodule, attr, None)
        samples = getattr(dataset, "_samples", None)
        if samples is None or "mask_path" not in samples.columns or not samples["mask_path"].isna().any():
            continue
        fixed = samples.copy()
        fixed["mask_path"] = fixed["mask_path"].astype(object).where(fixed["mask_path"].notna(), "")
        dataset.samples = fixed
