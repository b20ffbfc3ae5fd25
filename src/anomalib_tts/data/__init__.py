"""Synthetic, download-free anomaly-detection datasets."""

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
    "available_textures",
    "fix_mvtec3d_mask_paths",
    "load_texture",
    "make_mvtec3d_dataset",
    "make_mvtec_dataset",
]
