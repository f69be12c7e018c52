"""Names shared by every face of napari-restore, defined once (no imports: any module may use them).

The core (:mod:`.options`, :mod:`.inference`, :mod:`.models.card`, :mod:`.training.config`), the CLI
and the widget (``_napari._state``) import these; none of them spells the tuples again.
"""
from __future__ import annotations

#: What :func:`napari_restore.restore` can do; ``"restore"`` runs :data:`PIPELINE` in order.
TASKS = ("denoise", "deblur", "enhance", "restore")
#: The steps of the ``"restore"`` task, in the order they run.
PIPELINE = ("denoise", "deblur", "enhance")
#: Tasks a model can be trained for (``napari-restore train``).
TRAIN_TASKS = ("denoise", "deblur")
#: What a person reads for each task (widget combo boxes, messages).
TASK_LABELS = {"denoise": "Denoise", "deblur": "Deblur", "enhance": "Enhance edges",
               "restore": "Full restore (denoise > deblur > enhance)"}

#: Modalities with their own models and intensity mapping; any other is treated as "unknown".
IMAGE_MODALITIES = ("CT", "MR")
#: What a model card may say it is for.
MODALITIES = (*IMAGE_MODALITIES, "any")

#: ``"2d"``: slice by slice along the acquisition axis; ``"3d"``: sliding window.
MODES = ("2d", "3d")
#: Sizes of the geometric self-ensemble (in-plane flips/rotations averaged, networks.SelfEnsemble).
ENSEMBLE_SIZES = (1, 2, 4, 8)

__all__ = ["TASKS", "PIPELINE", "TRAIN_TASKS", "TASK_LABELS", "IMAGE_MODALITIES", "MODALITIES", "MODES",
           "ENSEMBLE_SIZES"]
