"""anomalib's ``MVTec3D`` datamodule, trainable under pandas >= 3."""

from anomalib.data import MVTec3D as AnomalibMVTec3D
from typing_extensions import override

from .synthetic import fix_mvtec3d_mask_paths


class MVTec3D(AnomalibMVTec3D):
    """anomalib's ``MVTec3D`` (RGB + organized XYZ ``depth_map``), with the training rows' mask paths fixed.

    Same arguments as ``anomalib.data.MVTec3D``; use it where a model is trained on MVTec 3D-AD (see
    :func:`~anomalib_tts.data.fix_mvtec3d_mask_paths` for the pandas >= 3 problem it avoids).

    Example:
        >>> import tempfile
        >>> from anomalib_tts.tools.data import make_mvtec3d_dataset
        >>> root = tempfile.mkdtemp()
        >>> _ = make_mvtec3d_dataset(root, n_train=2, n_test_good=1, n_test_defect=1, image_size=32)
        >>> datamodule = MVTec3D(root=root, category="texture3d", num_workers=0)
        >>> datamodule.setup()
        >>> tuple(next(iter(datamodule.train_dataloader())).depth_map.shape)
        (2, 3, 32, 32)
    """

    @override
    def _setup(self, _stage: str | None = None) -> None:
        super()._setup(_stage)
        fix_mvtec3d_mask_paths(self)
