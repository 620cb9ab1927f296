"""Drift: how a batch of new cells sits against the archive the models were trained on.

The frozen models (backbone, VAE, classifier) know the archive they were trained on; cells of
another stain, scanner or population land away from it in the latent space and their
predictions grow unsure. The yardstick is the archive's own spread: the distance from an
archived cell to its nearest other archived cell (its duplicates left out), whose
FAR_PERCENTILE-th percentile 1% of the archive itself exceeds. A batch in which more than
DRIFT_SHARE of the cells lie farther than that from every archived cell is drift: the models
should be retrained on the grown archive (`cellatlas rebuild --retrain-backbone`).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

FAR_PERCENTILE = 99.0
# Share of a batch beyond the archive's FAR_PERCENTILE nearest-neighbour distance that is drift.
# Measured: 96 held-out PBC cells of the atlas's own source 0% (expected about 1%), the same kind
# of cells under a bluer stain (optical density x 0.6, 1.0, 1.5 per channel) 65%; a small generated
# atlas (120 cells, whose whitening fits its few cells) 20% on its own source, 85% restained.
DRIFT_SHARE = 1 / 3
ARCHIVE_SAMPLE = 5000  # archived cells whose nearest neighbours estimate the percentile
RETRAIN_COMMAND = "cellatlas rebuild --retrain-backbone"


def archive_far_distance(index, latents: np.ndarray, duplicate_groups, seed: int = 0) -> float:
    """The FAR_PERCENTILE-th percentile of archived cells' nearest-neighbour distances (mean
    squared error between latents, as `LatentIndex.search` reports it), each cell's own
    duplicate group left out; estimated on ARCHIVE_SAMPLE cells of a large archive."""
    groups = np.asarray(duplicate_groups, dtype=object)
    if len(latents) < 2:
        return float("inf")
    rng = np.random.default_rng(seed)
    sample = np.arange(len(latents))
    if len(sample) > ARCHIVE_SAMPLE:
        sample = np.sort(rng.choice(sample, ARCHIVE_SAMPLE, replace=False))
    largest_group = max(Counter(groups.tolist()).values())
    distances, found = index.search(latents[sample], 1 + largest_group)
    other = (found >= 0) & (groups[found.clip(0)] != groups[sample][:, None])
    nearest = np.where(other, distances, np.inf).min(1)
    nearest = nearest[np.isfinite(nearest)]
    return float(np.percentile(nearest, FAR_PERCENTILE)) if len(nearest) else float("inf")


def drift_report(nearest_distance: np.ndarray, entropy_bits: np.ndarray, flagged: np.ndarray, sources,
                 far_distance: float, archive_mean_entropy: float | None = None) -> dict:
    """What a batch of new cells says about drift: share beyond `far_distance` (the archive's
    own FAR_PERCENTILE nearest-neighbour distance), mean entropy, share flagged, the same per
    source (folder or free text), and whether to retrain, with the reason in plain words."""
    nearest = np.asarray(nearest_distance, float)
    far = nearest > far_distance
    entropy = np.asarray(entropy_bits, float)
    flagged = np.asarray(flagged, bool)
    sources = np.asarray([str(s) for s in sources], dtype=object)
    report = {
        "cells": int(len(nearest)),
        "archive_far_distance": float(far_distance),
        "far_percentile": FAR_PERCENTILE,
        "threshold_share": DRIFT_SHARE,
        **_measures(far, entropy, flagged),
        "archive_mean_entropy_bits": archive_mean_entropy,
        "by_source": {str(source): _measures(far[sources == source], entropy[sources == source],
                                             flagged[sources == source])
                      for source in sorted(set(sources.tolist()))},
    }
    drifting = [s for s, m in report["by_source"].items() if m["share_far"] > DRIFT_SHARE]
    report["drift"] = bool(len(nearest)) and report["share_far"] > DRIFT_SHARE
    report["drifting_sources"] = drifting
    report["message"] = _message(report, drifting)
    return report


def _measures(far: np.ndarray, entropy: np.ndarray, flagged: np.ndarray) -> dict:
    return {"cells": int(len(far)),
            "share_far": float(far.mean()) if len(far) else 0.0,
            "mean_entropy_bits": float(entropy.mean()) if len(entropy) else None,
            "share_flagged": float(flagged.mean()) if len(flagged) else 0.0}


def _message(report: dict, drifting: list[str]) -> str:
    share, expected = report["share_far"], 1 - FAR_PERCENTILE / 100
    if not report["cells"]:
        return "no new cells"
    if report["drift"]:
        return (f"DRIFT: {share:.0%} of the new cells lie farther from every archived cell than "
                f"{FAR_PERCENTILE:g}% of archived cells lie from their nearest neighbour (expected about "
                f"{expected:.0%}, threshold {DRIFT_SHARE:.0%}); mean entropy {report['mean_entropy_bits']:.2f} bits, "
                f"{report['share_flagged']:.0%} flagged. The frozen models were not trained on cells like "
                f"these{' (sources: ' + ', '.join(drifting) + ')' if drifting else ''}: their references and "
                f"predictions are less reliable. Retrain on the grown archive: `{RETRAIN_COMMAND}`.")
    note = f"; sources beyond the threshold: {', '.join(drifting)}" if drifting else ""
    return (f"no drift: {share:.0%} of the new cells lie beyond the archive's {FAR_PERCENTILE:g}th-percentile "
            f"nearest-neighbour distance (threshold {DRIFT_SHARE:.0%}){note}")
