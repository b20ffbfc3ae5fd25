"""Checks at the boundary: an argument or a batch that would give a wrong mask fails with a message naming it.

The callback checks its arguments when it is built, the model's PostProcessor in ``setup`` and every batch at
the entry of ``refine_batch``, so that a misuse never reaches torch as an unexplained crash or, worse, as masks
computed on the wrong scale.
"""

from collections.abc import Sequence
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from anomalib_tts.features import Modalities


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an ``int``; a ``ValueError`` naming ``name`` unless it is an integer ``>= minimum``.

    Example:
        >>> check_count("max_positives", 10)
        10
        >>> check_count("max_positives", 10.5)
        Traceback (most recent call last):
        ...
        ValueError: max_positives must be an integer >= 1, got 10.5
    """
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        msg = f"{name} must be an integer >= {minimum}, got {value!r}"
        raise ValueError(msg)
    return int(value)


def as_stages(stages: str | Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    """The loops to refine in; one name alone (``"test"``) is one stage.

    Example:
        >>> as_stages("test", ("test", "predict")), as_stages(["test", "predict"], ("test", "predict"))
        (('test',), ('test', 'predict'))
    """
    stages = (stages,) if isinstance(stages, str) else tuple(stages)
    unknown = [stage for stage in stages if stage not in allowed]
    if unknown:
        msg = f"stages must be among {tuple(allowed)} (a name or a list of names), got {unknown}"
        raise ValueError(msg)
    return stages


def check_post_processor(post_processor: Any, model_name: str) -> None:
    """``ValueError`` unless ``post_processor`` normalizes the maps and thresholds them, as the refinement needs.

    The pseudo-label recipes read maps normalized so that anomalib's pixel threshold sits at 0.5; without
    normalization the maps are raw scores of any scale, and without thresholding there is no pixel threshold
    (and anomalib writes no ``pred_mask`` to keep).
    """
    leave_out = "or leave TestTimeSegmentation out of the run"
    if post_processor is None:
        msg = (
            f"TestTimeSegmentation reads the normalized maps and pixel threshold of the model's PostProcessor; "
            f"{model_name} has none: keep post_processor=True (the default) or pass a PostProcessor(), {leave_out}"
        )
        raise ValueError(msg)
    name = type(post_processor).__name__
    if getattr(post_processor, "enable_normalization", True) is False:
        msg = (
            f"TestTimeSegmentation reads maps normalized around anomalib's pixel threshold (0.5); the {name} of "
            f"{model_name} has enable_normalization=False, so its maps are raw scores whose scale the pseudo-label "
            f"recipes cannot read: keep enable_normalization=True (the default), {leave_out}"
        )
        raise ValueError(msg)
    if getattr(post_processor, "enable_thresholding", True) is False:
        msg = (
            f"TestTimeSegmentation refines from anomalib's pixel threshold; the {name} of {model_name} has "
            f"enable_thresholding=False, so there is no threshold and anomalib writes no pred_mask: keep "
            f"enable_thresholding=True (the default), {leave_out}"
        )
        raise ValueError(msg)


def scaled_images(image: Tensor) -> Tensor:
    """8-bit images scaled to ``[0, 1]`` like float images: ``uint8``, or float holding whole numbers up to 255.

    anomalib's batches cast ``uint8`` images to float without scaling them, so 8-bit data is recognized by its
    values too: an image (decided per image) whose values are all whole numbers in ``[0, 255]``, at least one
    above 1. Normalized and ``[0, 1]`` images are returned as they are.

    Raises:
        ValueError: ``image`` has another integer or a boolean dtype.

    Example:
        >>> scaled_images(torch.tensor([[[[0, 51, 255]]]], dtype=torch.uint8))
        tensor([[[[0.0000, 0.2000, 1.0000]]]])
        >>> scaled_images(torch.tensor([[[[0.0, 51.0, 255.0]]], [[[-1.5, 0.2, 2.0]]]]))
        tensor([[[[ 0.0000,  0.2000,  1.0000]]],
        <BLANKLINE>
        <BLANKLINE>
                [[[-1.5000,  0.2000,  2.0000]]]])
    """
    if image.dtype == torch.uint8:
        return image.float() / 255
    if not image.is_floating_point():
        msg = (
            f"batch.image has dtype {image.dtype}: pass float images (as anomalib's pre-processor leaves them) or "
            "uint8 images (0-255)"
        )
        raise ValueError(msg)
    flat = image.flatten(1)
    low, high = flat.amin(dim=1), flat.amax(dim=1)  # on CPU much faster than aminmax(dim=1)
    candidates = (low >= 0) & (high > 1) & (high <= 255)
    if not bool(candidates.any()):
        return image
    eight_bit = candidates & (flat == flat.round()).all(dim=1)
    return torch.where(eight_bit[:, None, None, None], image / 255, image)


def _shape(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else f"a {type(value).__name__}"


def batch_inputs(
    batch: Any, anomaly_map: Tensor, min_positives: int, min_negatives: int, reads_pred_label: bool = False
) -> Modalities:
    """The batch's modalities for the refinement, once its fields are known to fit together.

    Args:
        batch: An anomalib batch (or any object with its fields).
        anomaly_map: ``batch.anomaly_map``.
        min_positives: The refinement's minimum of positives per image.
        min_negatives: The refinement's minimum of negatives per image.
        reads_pred_label: ``pred_label`` is read too (gating).

    Returns:
        ``image`` (8-bit images scaled to ``[0, 1]``, see :func:`scaled_images`) and ``depth_map``.

    Raises:
        ValueError: A field is missing or has the wrong shape, the fields disagree in batch size, or the maps
            have fewer pixels than ``min_positives + min_negatives``; the message names them.
    """
    if (
        not isinstance(anomaly_map, Tensor)
        or anomaly_map.ndim not in {3, 4}
        or anomaly_map.shape[1:-2]
        not in {
            torch.Size(),
            torch.Size([1]),
        }
    ):
        msg = f"batch.anomaly_map must be a (B, H, W) or (B, 1, H, W) tensor, got {_shape(anomaly_map)}"
        raise ValueError(msg)
    image = getattr(batch, "image", None)
    if image is None:
        msg = (
            "the batch has no image (batch.image is None): the refinement computes its pixel features from the "
            "images; pass the model's input images, (B, C, H, W), as batch.image"
        )
        raise ValueError(msg)
    if not isinstance(image, Tensor) or image.ndim != 4 or image[0, 0].numel() == 0:
        msg = f"batch.image must be a (B, C, H, W) tensor with H, W > 0, got {_shape(image)}"
        raise ValueError(msg)

    sizes = {"anomaly_map": anomaly_map.shape[0], "image": image.shape[0]}
    depth_map = getattr(batch, "depth_map", None)
    if isinstance(depth_map, Tensor) and depth_map.ndim == 4:  # other shapes are warned about and left unused
        sizes["depth_map"] = depth_map.shape[0]
    pred_mask = getattr(batch, "pred_mask", None)
    if pred_mask is not None:
        sizes["pred_mask"] = pred_mask.shape[0] if pred_mask.ndim else 1
    paths = getattr(batch, "image_path", None)
    if paths:
        sizes["image_path"] = len(paths)
    pred_label = getattr(batch, "pred_label", None)
    if reads_pred_label and pred_label is not None:
        sizes["pred_label"] = pred_label.numel()
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {size}" for name, size in sizes.items())
        msg = (
            f"the batch's fields disagree in batch size ({listed}): each must hold one entry per image; pass "
            "fields of the same batch"
        )
        raise ValueError(msg)
    if pred_mask is not None and pred_mask.numel() != anomaly_map.numel():
        msg = (
            f"batch.pred_mask ({_shape(pred_mask)}) does not fit batch.anomaly_map ({_shape(anomaly_map)}): "
            "it must have the map's size"
        )
        raise ValueError(msg)

    height, width = anomaly_map.shape[-2:]
    if min_positives + min_negatives > height * width:
        msg = (
            f"min_positives + min_negatives ({min_positives} + {min_negatives}) exceed the {height * width} pixels "
            f"of the batch's {height}x{width} anomaly maps: no image could be refined; lower them"
        )
        raise ValueError(msg)
    return Modalities(image=scaled_images(image), depth_map=depth_map)
