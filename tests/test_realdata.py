"""Integration on real CellaVision images (../shared/data/pbc): a small build, query, evaluate."""

import os

import pytest

from atlas.ingest import read_image_bytes
from atlas.reference import LoadedAtlas
from indexer.build import build
from indexer.evaluate import evaluate
from tests.conftest import require_shared, tiny_config

pytestmark = pytest.mark.realdata
TRAIN_PER_CLASS, TEST_PER_CLASS = 30, 6


@pytest.fixture(scope="module")
def pbc_split(tmp_path_factory):
    pbc = require_shared("pbc")
    root = tmp_path_factory.mktemp("pbc")
    for class_dir in sorted(p for p in pbc.iterdir() if p.is_dir()):
        files = sorted(f for f in class_dir.iterdir() if not f.name.startswith("."))  # PBC has a .DS_ file
        files = files[: TRAIN_PER_CLASS + TEST_PER_CLASS]
        for part, chosen in (("train", files[:TRAIN_PER_CLASS]), ("test", files[TRAIN_PER_CLASS:])):
            (root / part / class_dir.name).mkdir(parents=True)
            for f in chosen:
                os.symlink(f, root / part / class_dir.name / f.name)
    return root


@pytest.fixture(scope="module")
def pbc_atlas(pbc_split, tmp_path_factory):
    home = tmp_path_factory.mktemp("pbc-atlas")
    # The real default preset (cpu), cut to 2 epochs to keep CI short.
    result = build(tiny_config(pbc_split / "train", home, preset="cpu", epochs=2, threads=2))
    return home, result


def test_build_on_real_cells_publishes_every_class(pbc_atlas):
    home, result = pbc_atlas
    manifest = result.manifest
    inputs = manifest["inputs"]
    # PBC holds a few byte-identical copies of one image under two names: those are rejected
    # with a reason; every other real image gives a cell.
    assert inputs["cells"] + inputs["rejected"] == 8 * TRAIN_PER_CLASS
    assert set(inputs["rejections_by_reason"]) <= {"identical file already ingested"}
    assert len(manifest["classes"]) == 8
    # Features + a briefly trained backbone already beat chance (1/8) by far.
    assert manifest["classifier"]["out_of_fold_accuracy"] > 0.5


def test_query_and_evaluate_on_unseen_real_images(pbc_atlas, pbc_split):
    home, _ = pbc_atlas
    atlas = LoadedAtlas.open(home)
    unseen = next((pbc_split / "test" / "lymphocyte").iterdir())
    result = atlas.query_image(read_image_bytes(unseen.read_bytes()), k=8)
    assert len(result.references) == 8
    assert result.prediction.label in atlas.classes
    report = evaluate(home, pbc_split / "test", rotmes_per_class=2, progress=False)
    assert report["evaluated"] == 8 * TEST_PER_CLASS
    assert report["accuracy"] > 0.4 and 0 <= report["precision_at_8"] <= 1
    rotation = report["rotation_invariance"]
    assert rotation["copies"] == 8 * 2 * 3
    assert rotation["found_first_by_transform"]["flipped_horizontal"] > 0.5
