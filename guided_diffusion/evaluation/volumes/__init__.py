"""Whole-volume anomaly segmentation in the patient's own space: NIfTI in, NIfTI out, per-volume metrics.

``anofpdm segment`` is the command line (``commands/segment.py``; ``scripts/segment.py`` its upstream-named wrapper);
``settings.py`` checks its flags, ``subjects.py`` finds the subjects, ``subject.py`` segments one, ``run.py`` runs them
all, ``report.py`` summarises. For every subject (a BraTS 2021 / ATLAS subject folder, a data set
root holding such folders, or explicit per-modality files):

1. the volume is prepared exactly as training data were (``preprocess.load_subject`` + ``prepare_slices``: the
   canonical orientation of ``--orientation``, so slices are axial whatever the storage (``data/geometry.py``), the
   per-channel 99th-percentile scaling, the brain slice range, the bilinear resize; then the loaders' per-slice
   min-max scaling to [-1, 1]);
2. its kept slices go through the slice method (``--method``, any of ``methods.base.METHODS``) in batches of
   ``--batch_size`` with the hyper-parameters of a validation run (``--hyperparams_file``, e.g. a translation
   run's ``hyperparams.json``) or of a validation pass this command runs itself (``--data_dir`` with ``npy_val/``);
3. the map and the mask are resized back in the canonical frame and put back on the scan's grid losslessly
   (``data/nifti.py``), and written as ``<id>_anomaly_map.nii.gz`` (float32, zero outside the brain unless
   ``--raw_map True``) and ``<id>_anomaly_mask.nii.gz`` (uint8, slices classified healthy are empty unless
   ``--zero_healthy_slices False``) with the input's shape (trailing singleton axes included), affine, qform and
   sform; slices outside the kept range are zero;
4. ``<id>_segmentation.json`` records the slices classified unhealthy, the lesion volume in ml, the
   hyper-parameters, settings and checkpoint, and (with a ground-truth file) 3-D Dice / IoU / AUPRC next to the
   slice-level metrics of that subject, and what was done to the scan's geometry (``geometry``: stored and
   canonical grids, the transform, the resize; ``warnings`` for an oblique scan or one far from the training data's
   voxel size or field of view); ``<id>_overlay.png`` shows a few axial slices.

At the end, ``subjects.csv`` (one row per subject) and ``summary.json`` (mean ± sd across subjects, failures).
Subjects are dealt to processes (rank r takes every world-th subject in name order; ``torchrun``); a subject whose
``_segmentation.json`` (written last, every file atomically) matches this run is skipped, so a killed run resumes
where it stopped. A subject with a missing modality, a corrupt file or mismatched shapes is reported by name
(``summary.json``, the log, the exit code) and the others go on.
"""
