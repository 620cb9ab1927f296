"""Stratified train/test split of a class-folder archive, written as symbolic links, so that
`cellatlas evaluate` can be run on images the build never saw."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from atlas.ingest import IngestError, list_images


def split_folder(images: Path, out: Path, test_fraction: float, seed: int = 0) -> dict:
    if not 0 < test_fraction < 1:
        raise ValueError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    by_class = defaultdict(list)
    for record in list_images(images):
        if record.label is None:
            raise IngestError(f"{record.path} is not in a class sub-folder; split needs labelled images")
        by_class[record.label].append(record.path)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new folder")
    rng = np.random.default_rng(seed)
    counts = {}
    for label, paths in sorted(by_class.items()):
        order = rng.permutation(len(paths))
        n_test = int(round(test_fraction * len(paths)))
        for part, chosen in (("test", order[:n_test]), ("train", order[n_test:])):
            folder = out / part / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                os.symlink(paths[i].resolve(), folder / paths[i].name)
        counts[label] = {"train": len(paths) - n_test, "test": n_test}
    return counts
