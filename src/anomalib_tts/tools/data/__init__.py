"""Synthetic, download-free anomaly-detection datasets, and anomalib's MVTec3D datamodule trainable under pandas 3."""

from .mvtec3d import MVTec3D
from .synthetic import (
    DEFECT_KINDS,
    GEOMETRY_DEFECT_KINDS,
    MASK_THRESHOLD,
    TEXTURES,
    available_textures,
    fix_mvtec3d_mask_paths,
    load_texture,
    make_mvtec3d_dataset,
    make_mvtec_dataset,
)

__all__ = [
    "DEFECT_KINDS",
    "GEOMETRY_DEFECT_KINDS",
    "MASK_THRESHOLD",
    "TEXTURES",
    "MVTec3D",
    "available_textures",
    "fix_mvtec3d_mask_paths",
    "load_texture",
    "make_mvtec3d_dataset",
    "make_mvtec_dataset",
]
