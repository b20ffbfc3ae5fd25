"""Adds the refinement to Trainers that take no user callbacks, such as the jobs of ``anomalib benchmark``.

Lightning calls every function registered under the entry-point group ``lightning.pytorch.callbacks_factory``
when it builds a Trainer. This package registers :func:`callbacks_from_environment`: it returns nothing unless the
environment variable ``ANOMALIB_TTS_CONFIG`` names a YAML file with the callback's arguments, in one of two forms:

.. code-block:: yaml

    # the callback's init args (components as names, or class_path + init_args)
    features: model
    gate: none

.. code-block:: yaml

    # or the entry as it is written under trainer.callbacks (class_path: a TestTimeSegmentation subclass)
    class_path: anomalib_tts.TestTimeSegmentation
    init_args:
      features: model

Lightning imports this module whenever it builds a Trainer; it imports the rest of the package only when the
variable is set.

Example:
    .. code-block:: bash

        ANOMALIB_TTS_CONFIG=configs/benchmark/refinement.yaml \\
            anomalib benchmark --config configs/benchmark/benchmark.yaml
"""

import importlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

if TYPE_CHECKING:
    from anomalib_tts.lightning.callback import TestTimeSegmentation

logger = logging.getLogger(__name__)

CONFIG_VARIABLE = "ANOMALIB_TTS_CONFIG"


def callbacks_from_environment() -> list[Callback]:
    """The Trainer's extra callbacks: the refinement when ``ANOMALIB_TTS_CONFIG`` is set, else none.

    Returns:
        ``[callback, guard]`` (see :class:`ConfiguredCallbackGuard`) when the variable names a file, ``[]`` when it
        is unset or empty.

    Raises:
        FileNotFoundError: The variable names a file that does not exist.
        ValueError: The file is not valid YAML or does not describe the callback; the message names the file.

    Example:
        >>> import os
        >>> os.environ.pop(CONFIG_VARIABLE, None) and None
        >>> callbacks_from_environment()
        []
    """
    path = os.environ.get(CONFIG_VARIABLE, "").strip()
    if not path:
        return []
    callback = load_callback(path)
    logger.info("%s=%s: adding %s to the Trainer", CONFIG_VARIABLE, path, type(callback).__name__)
    return [callback, ConfiguredCallbackGuard(callback)]


def load_callback(path: str | Path) -> "TestTimeSegmentation":
    """Build the callback that the YAML file at ``path`` describes (init args, or ``class_path`` + ``init_args``).

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as file:
        ...     _ = file.write("features: model\\nmax_positives: 500\\n")
        >>> load_callback(file.name).pipeline.max_positives
        500
    """
    import yaml

    from anomalib_tts.lightning.callback import TestTimeSegmentation

    path = Path(path)
    if not path.is_file():
        msg = f"{CONFIG_VARIABLE} names {path}, which is not a file"
        raise FileNotFoundError(msg)
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        msg = f"{path} (named by {CONFIG_VARIABLE}) is not valid YAML: {error}"
        raise ValueError(msg) from error
    content = {} if content is None else content
    if not isinstance(content, dict):
        msg = f"{path} (named by {CONFIG_VARIABLE}) must hold a mapping of the callback's arguments, got {content!r}"
        raise ValueError(msg)
    cls, init_args = _callback_class(content, path) if "class_path" in content else (TestTimeSegmentation, content)
    if not isinstance(init_args, dict):
        msg = f"{path}: init_args must be a mapping, got {init_args!r}"
        raise ValueError(msg)
    try:
        return cls.from_init_args(init_args)
    except (TypeError, ValueError) as error:
        msg = f"{path} (named by {CONFIG_VARIABLE}) does not fit {cls.__name__}: {error}"
        raise ValueError(msg) from error


def _callback_class(entry: dict[str, Any], path: Path) -> tuple[type["TestTimeSegmentation"], Any]:
    from anomalib_tts.lightning.callback import TestTimeSegmentation

    unknown = sorted(set(entry) - {"class_path", "init_args"})
    if unknown:
        msg = f"{path}: next to class_path only init_args is allowed, got {unknown}"
        raise ValueError(msg)
    module_name, _, class_name = str(entry["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name or "anomalib_tts"), class_name)
    except (ImportError, AttributeError) as error:
        msg = f"{path}: class_path {entry['class_path']!r} cannot be imported: {error}"
        raise ValueError(msg) from error
    if not (isinstance(cls, type) and issubclass(cls, TestTimeSegmentation)):
        msg = f"{path}: class_path must name TestTimeSegmentation or a subclass, got {entry['class_path']!r}"
        raise ValueError(msg)
    return cls, entry.get("init_args") or {}


class ConfiguredCallbackGuard(Callback):
    """Drops the environment's callback from a Trainer whose own callbacks already refine (no double refinement).

    The factory runs for every Trainer, also for ``anomalib test --config configs/padim.yaml``, whose config lists
    the callback itself; there the configured one wins.

    Args:
        callback: The callback the factory added.
    """

    def __init__(self, callback: "TestTimeSegmentation") -> None:
        self.callback = callback

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        from anomalib_tts.lightning.callback import TestTimeSegmentation
        from anomalib_tts.lightning.placement import remove_callbacks

        refiners = [other for other in trainer.callbacks if isinstance(other, TestTimeSegmentation)]
        configured = [other for other in refiners if other is not self.callback]
        if configured:
            name = type(configured[0]).__name__
            logger.info("%s ignored: the Trainer's callbacks already hold %s", CONFIG_VARIABLE, name)
            self.callback.remove_from(trainer)
        remove_callbacks(trainer, [self])
