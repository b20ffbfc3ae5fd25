"""Synthetic defects with exact masks, pasted into a user's own good images.

The calibration needs defective images of the user's part, and every user has only good ones. Pasting defects
into them gives images whose score maps behave like the real ones on that part: a small defect gets the wide blob
a real small defect gets, a thin scratch the streak a real crack gets, a faint patch the weak response of a real
faint defect. The defects vary in the ways that decide which binarization wins:

- shape: an elliptical blob with a ragged edge, a thin curved scratch, or a cluster of tiny spots;
- size: area log-uniform between ``min_area`` and ``max_area`` of the image;
- appearance: the texture of another place of the same image (CutPaste), a darker or brighter patch, the texture
  smoothed away, or noise; faint (about one standard deviation of the image) or strong (several);
- place: anywhere, on the part and on the background alike.

The images are the model's inputs (normalized as the pre-processor leaves them); every change is expressed in the
image's own standard deviation, so the same defects come out whatever the normalization. The masks are exact: a
pixel is in the mask if and only if some channel changed by at least ``min_change`` standard deviations; smaller
changes inside a shape are undone. Everything is drawn from a seeded ``torch.Generator``: the same images and seed
give the same defects, on any device.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

SHAPES = ("blob", "scratch", "spots")
APPEARANCES = ("cutpaste", "shift", "smooth", "noise")


@dataclass
class DefectiveImages:
    """Images with synthetic defects.

    Attributes:
        images: ``(M, C, H, W)`` the good images with the defects pasted in.
        masks: ``(M, H, W)`` bool, exactly the pixels that were changed.
        sources: ``(M,)`` int64, the index of the good image each was made from.
    """

    images: Tensor
    masks: Tensor
    sources: Tensor


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _log_uniform(generator: torch.Generator, low: float, high: float) -> float:
    return math.exp(_uniform(generator, math.log(low), math.log(high)))


def _grid(height: int, width: int) -> tuple[Tensor, Tensor]:
    rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
    columns = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
    return rows, columns


def _smooth_noise(generator: torch.Generator, height: int, width: int, cells: int) -> Tensor:
    """Low-frequency noise in about ``[-1, 1]``: a ``cells x cells`` random grid, bicubically upsampled."""
    coarse = torch.rand(1, 1, cells + 1, cells + 1, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)[0, 0].clamp(-1, 1)


def blob_shape(generator: torch.Generator, height: int, width: int, area: float) -> Tensor:
    """An ellipse of about ``area`` (a share of the image) with a ragged edge, anywhere in the image.

    Example:
        >>> shape = blob_shape(torch.Generator().manual_seed(0), 64, 64, area=0.02)
        >>> shape.dtype, 20 < int(shape.sum()) < 200
        (torch.bool, True)
    """
    pixels = area * height * width
    ratio = _uniform(generator, 1.0, 3.0)
    minor = math.sqrt(pixels / (math.pi * ratio))
    major = minor * ratio
    angle = _uniform(generator, 0.0, math.pi)
    centre_row, centre_column = _uniform(generator, 0, height - 1), _uniform(generator, 0, width - 1)
    rows, columns = _grid(height, width)
    along = (columns - centre_column) * math.cos(angle) + (rows - centre_row) * math.sin(angle)
    across = -(columns - centre_column) * math.sin(angle) + (rows - centre_row) * math.cos(angle)
    radius = (along / max(major, 0.5)).square() + (across / max(minor, 0.5)).square()
    ragged = 1 + 0.35 * _smooth_noise(generator, height, width, cells=max(2, int(8 * math.sqrt(area) * 4)))
    return radius <= ragged


def scratch_shape(generator: torch.Generator, height: int, width: int, area: float) -> Tensor:
    """A thin curved line (1 to 3 pixels wide at 256 px, wider on larger images) covering about ``area``.

    Example:
        >>> shape = scratch_shape(torch.Generator().manual_seed(0), 64, 64, area=0.01)
        >>> shape.dtype, bool(shape.any())
        (torch.bool, True)
    """
    side = max(height, width)
    thickness = max(1.0, _uniform(generator, 1.0, 3.0) * side / 256)
    length = min(area * height * width / thickness, 0.9 * side)
    steps = max(2, int(length / 2))
    heading = _uniform(generator, 0.0, 2 * math.pi)
    turn = _uniform(generator, -0.04, 0.04)
    row, column = _uniform(generator, 0, height - 1), _uniform(generator, 0, width - 1)
    points = []
    for _ in range(steps):
        points.append((row, column))
        heading += turn + 0.05 * float(torch.randn((), generator=generator))
        row = min(max(row + 2 * math.sin(heading), 0.0), height - 1.0)
        column = min(max(column + 2 * math.cos(heading), 0.0), width - 1.0)
    centres = torch.tensor(points)
    rows, columns = _grid(height, width)
    shape = torch.zeros(height, width, dtype=torch.bool)
    for start in range(0, len(centres), 64):  # distance to the polyline's points, a chunk at a time
        chunk = centres[start : start + 64]
        distance = (rows[..., None] - chunk[:, 0]).square() + (columns[..., None] - chunk[:, 1]).square()
        shape |= (distance <= (thickness / 2 + 0.5) ** 2).any(dim=-1)
    return shape


def spots_shape(generator: torch.Generator, height: int, width: int, area: float) -> Tensor:
    """Three to eight tiny blobs near each other, together covering about ``area``."""
    count = int(torch.randint(3, 9, (), generator=generator))
    spread = max(4.0, math.sqrt(area * height * width) * 4)
    centre_row, centre_column = _uniform(generator, 0, height - 1), _uniform(generator, 0, width - 1)
    rows, columns = _grid(height, width)
    shape = torch.zeros(height, width, dtype=torch.bool)
    radius = max(0.7, math.sqrt(area * height * width / count / math.pi))
    for _ in range(count):
        row = min(max(centre_row + spread * float(torch.randn((), generator=generator)), 0.0), height - 1.0)
        column = min(max(centre_column + spread * float(torch.randn((), generator=generator)), 0.0), width - 1.0)
        shape |= (rows - row).square() + (columns - column).square() <= radius**2
    return shape


SHAPE_MAKERS = {"blob": blob_shape, "scratch": scratch_shape, "spots": spots_shape}


def _appearance(generator: torch.Generator, image: Tensor, kind: str, strength: float) -> Tensor:
    """The whole image as the defect would make it look (pasted only inside the shape)."""
    scale = image.flatten(1).std(dim=1).clamp(min=1e-6)[:, None, None]
    height, width = image.shape[-2:]
    if kind == "cutpaste":
        shift_rows = int(
            torch.randint(height // 8, max(height // 8 + 1, height - height // 8), (), generator=generator)
        )
        shift_columns = int(torch.randint(width // 8, max(width // 8 + 1, width - width // 8), (), generator=generator))
        moved = torch.roll(image, shifts=(shift_rows, shift_columns), dims=(1, 2))
        if float(torch.rand((), generator=generator)) < 0.5:
            moved = moved.flip(2)
        gain = _uniform(generator, 0.5, 1.5)
        mean = image.mean(dim=(1, 2), keepdim=True)
        return mean + gain * (moved - mean)
    if kind == "shift":
        sign = 1.0 if float(torch.rand((), generator=generator)) < 0.5 else -1.0
        return image + sign * strength * scale
    if kind == "smooth":
        size = max(3, (max(height, width) // 32) | 1)
        blurred = F.avg_pool2d(image[None], size, stride=1, padding=size // 2, count_include_pad=False)[0]
        return blurred + 0.25 * strength * scale * (1 if float(torch.rand((), generator=generator)) < 0.5 else -1)
    noise = torch.randn(image.shape, generator=generator)
    return image + 0.5 * strength * scale * noise


@dataclass
class SyntheticDefects:
    """Pastes synthetic defects into good images, with exact masks (see the module's description).

    Args:
        per_image: Defective versions made of each good image.
        defects: Most defects per image (one to this many, each of its own shape, size and appearance).
        min_area: Smallest defect, as a share of the image.
        max_area: Largest defect, as a share of the image.
        min_change: Smallest change, in the image's standard deviations, that counts as changed (the mask).
        strength: The range of a defect's strength, in the image's standard deviations (drawn log-uniformly).
        feather: Blend each defect into the image over about this many pixels at a 256-pixel side (0: hard edges);
            the mask stays exact, the blend's faint rim below ``min_change`` being undone.

    Example:
        >>> images = torch.randn(2, 3, 64, 64)
        >>> made = SyntheticDefects(per_image=3)(images, seed=0)
        >>> made.images.shape, made.masks.shape, made.sources.tolist()
        (torch.Size([6, 3, 64, 64]), torch.Size([6, 64, 64]), [0, 0, 0, 1, 1, 1])
        >>> changed = (made.images - images[made.sources]).abs().amax(dim=1) > 0
        >>> bool((changed == made.masks).all()) and bool(made.masks.flatten(1).any(dim=1).all())
        True
    """

    per_image: int = 4
    defects: int = 2
    min_area: float = 0.0003
    max_area: float = 0.1
    min_change: float = 0.5
    strength: tuple[float, float] = (1.0, 4.0)
    feather: float = 0.0

    def __post_init__(self) -> None:
        if self.per_image < 1 or self.defects < 1:
            msg = f"per_image and defects must be >= 1, got {self.per_image} and {self.defects}"
            raise ValueError(msg)
        if not 0 < self.min_area <= self.max_area < 1:
            msg = f"areas must satisfy 0 < min_area <= max_area < 1, got {self.min_area} and {self.max_area}"
            raise ValueError(msg)

    def __call__(self, images: Tensor, seed: int = 0) -> DefectiveImages:
        """``per_image`` defective versions of each of the ``(N, C, H, W)`` ``images``, in order."""
        generator = torch.Generator().manual_seed(seed)
        source_images = images.detach().float().cpu()
        made, masks, sources = [], [], []
        for index, image in enumerate(source_images):
            for _ in range(self.per_image):
                defective, mask = self.one(generator, image)
                made.append(defective)
                masks.append(mask)
                sources.append(index)
        return DefectiveImages(
            images=torch.stack(made).to(images.device, images.dtype),
            masks=torch.stack(masks).to(images.device),
            sources=torch.tensor(sources, device=images.device),
        )

    def one(self, generator: torch.Generator, image: Tensor) -> tuple[Tensor, Tensor]:
        """One defective version of a ``(C, H, W)`` image and its exact mask (never empty)."""
        height, width = image.shape[-2:]
        scale = image.flatten(1).std(dim=1).clamp(min=1e-6)[:, None, None]
        for _ in range(20):
            result = image.clone()
            count = int(torch.randint(1, self.defects + 1, (), generator=generator))
            for _ in range(count):
                shape_kind = SHAPES[int(torch.randint(len(SHAPES), (), generator=generator))]
                kind = APPEARANCES[int(torch.randint(len(APPEARANCES), (), generator=generator))]
                area = _log_uniform(generator, self.min_area, self.max_area)
                strength = _log_uniform(generator, *self.strength)
                shape = SHAPE_MAKERS[shape_kind](generator, height, width, area).float()
                if self.feather > 0:
                    size = 1 + 2 * max(1, round(self.feather * max(height, width) / 256 / 2))
                    shape = F.avg_pool2d(shape[None, None], size, stride=1, padding=size // 2)[0, 0]
                result = result + shape * (_appearance(generator, result, kind, strength) - result)
            changed = ((result - image).abs() / scale).amax(dim=0) >= self.min_change
            result = torch.where(changed, result, image)
            if bool(changed.any()):
                return result, changed
        msg = "could not make a visible defect in 20 tries: the image is constant"
        raise ValueError(msg)


@dataclass
class GoodVariations:
    """Good images as a line varies them: light, shading, focus and noise, for counting false alarms.

    A handful of validation images shows little of how good parts vary on a line; a binarization that flags none
    of them may still flag many good test images. Each variation changes the image's contrast around its mean
    (``1 +- gain``), adds a left-to-right or top-to-bottom shading ramp (``+- shading``), blurs it (a box of up to
    ``blur`` pixels at 256 px) and adds noise (``noise``), every amount in the image's own standard deviations and
    drawn at random up to these bounds.

    Args:
        per_image: Variations made of each good image (0: none).
        gain: Largest change of contrast.
        shading: Largest amplitude of the shading ramp.
        blur: Largest box blur, in pixels at a 256-pixel side.
        noise: Largest noise level.

    Example:
        >>> varied = GoodVariations(per_image=2)(torch.randn(3, 3, 32, 32), seed=0)
        >>> varied.images.shape, bool(varied.masks.any()), varied.sources.tolist()
        (torch.Size([6, 3, 32, 32]), False, [0, 0, 1, 1, 2, 2])
    """

    per_image: int = 2
    gain: float = 0.1
    shading: float = 0.15
    blur: float = 2.0
    noise: float = 0.05

    def __call__(self, images: Tensor, seed: int = 0) -> DefectiveImages:
        """``per_image`` varied versions of each ``(N, C, H, W)`` good image, in order (empty masks)."""
        generator = torch.Generator().manual_seed(seed)
        source_images = images.detach().float().cpu()
        height, width = source_images.shape[-2:]
        rows, columns = _grid(height, width)
        varied, sources = [], []
        for index, image in enumerate(source_images):
            mean = image.mean(dim=(1, 2), keepdim=True)
            scale = image.flatten(1).std(dim=1).clamp(min=1e-6)[:, None, None]
            for _ in range(self.per_image):
                result = mean + (1 + _uniform(generator, -self.gain, self.gain)) * (image - mean)
                ramp = (
                    (columns / max(width - 1, 1))
                    if torch.rand((), generator=generator) < 0.5
                    else (rows / max(height - 1, 1))
                )
                result = result + _uniform(generator, -self.shading, self.shading) * (2 * ramp - 1) * scale
                size = 1 + 2 * int(_uniform(generator, 0, self.blur * max(height, width) / 256 / 2))
                if size > 1:
                    result = F.avg_pool2d(result[None], size, stride=1, padding=size // 2, count_include_pad=False)[0]
                noise = _uniform(generator, 0, self.noise)
                result = result + noise * scale * torch.randn(result.shape, generator=generator)
                varied.append(result)
                sources.append(index)
        count = len(varied)
        return DefectiveImages(
            images=(torch.stack(varied) if varied else source_images[:0]).to(images.device, images.dtype),
            masks=torch.zeros(count, height, width, dtype=torch.bool, device=images.device),
            sources=torch.tensor(sources, dtype=torch.int64, device=images.device),
        )
