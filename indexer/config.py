"""What a build is asked to do: one dataclass that build, rebuild and the CLI share, and the
way a rebuild recovers the configuration its parent version was built with."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from atlas.backbone import PRESETS
from atlas.calibration import DEFAULT_COVERAGE, check_coverage
from atlas.cell import REFERENCE_UM_PER_PIXEL
from atlas.classifier import DEFAULT_FLAG_BITS
from atlas.runtime import default_threads
from atlas.scale import check_um_per_pixel


class BuildError(RuntimeError):
    """Nothing can be built from the input; the message says why and what to do."""


@dataclass
class BuildConfig:
    images: Path
    home: Path
    preset: str = "cpu"
    epochs: int | None = None  # backbone epochs; None = the preset's
    latent_dim: int = 50
    vae_epochs: int = 40
    som_shape: tuple[int, int] | None = None  # None = rule of thumb from the archive size
    som_epochs: int = 30
    val_fraction: float = 0.1
    flag_entropy: float | str = DEFAULT_FLAG_BITS  # bits, or "auto"; flags only uncalibrated classifiers
    coverage: float | str = DEFAULT_COVERAGE  # of the prediction sets, or "auto" (chosen out-of-fold, >= 0.99)
    um_per_pixel: float = REFERENCE_UM_PER_PIXEL  # the atlas's scale (and its images', unless below)
    folder_scales: dict[str, float] = field(default_factory=dict)  # {folder under images: its um/px}
    segmenter: str | None = None  # a folder from `cellatlas segmenter train`; None = classical
    seed: int = 0
    threads: int = field(default_factory=default_threads)
    device: str = "auto"
    pretrained: bool = False
    stain_jitter: bool = False  # train the backbone with stain, hue, blur and grey jitter (atlas/backbone.py)
    progress: bool = True

    def __post_init__(self):
        if self.segmenter == "classical":  # how manifests name it (rebuilds read them back)
            self.segmenter = None
        if self.preset not in PRESETS:
            raise BuildError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        try:
            self.coverage = check_coverage(self.coverage)
        except ValueError as error:
            raise BuildError(str(error)) from None
        self.um_per_pixel = check_um_per_pixel(self.um_per_pixel)
        self.folder_scales = {str(folder): check_um_per_pixel(x) for folder, x in (self.folder_scales or {}).items()}


def parent_config(manifest: dict, version_dir: Path, home: Path, threads: int, progress: bool) -> BuildConfig:
    """The BuildConfig a version was built with (its manifest), for this ATLAS_HOME and machine;
    a trained segmenter is the version's own copy, not the folder it was first built from."""
    parameters = manifest.get("parameters", {})
    names = {f.name for f in fields(BuildConfig)} - {"images", "home", "threads", "progress"}
    chosen = {name: value for name, value in parameters.items() if name in names}
    if chosen.get("som_shape") is not None:
        chosen["som_shape"] = tuple(chosen["som_shape"])
    segmenter_path = (manifest.get("segmenter") or {}).get("path")
    if segmenter_path:
        chosen["segmenter"] = str(Path(version_dir) / segmenter_path)
    images = manifest.get("inputs", {}).get("images") or parameters.get("images")
    return BuildConfig(images=Path(images), home=home, threads=threads, progress=progress, **chosen)
