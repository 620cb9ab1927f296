"""Indexing benchmark (issue #15): cells per second of each step of adding images to an atlas
(decode, segment, describe, hash, embed, search insert) and end to end, against a plain
single-process loop doing the same work, in one run.

    PYTHONPATH=. .venv/bin/python bench/index_bench.py [--tiny] [--home H --images DIR]
        [--threads 1] [--limit 300] [--segmenter MODEL_DIR] [--label-from-folders] [--out index.json]
    (or: cellatlas bench index ...)

Everything runs the product's own functions with the live version's frozen models; nothing is
published (the atlas is only read; crops are written to a scratch folder that is removed):
- steps (one process, `--threads` threads, on the same images): each image read, hashed
  (SHA-256), decoded and segmented; each cell found cropped on its nucleus, described, hashed
  (64- and 256-bit average hashes), its crop and mask written, turned into the backbone's input;
  then all cells embedded in one call (backbone over its views, then the VAE) and inserted into
  a copy of the atlas's FAISS index. Cells per second of each step, and its share of the sum
  (where the time goes). Image steps (read to segment) count the cells their images gave;
- views: the embedding at the atlas's views (8 per view angle), at 8 views and at 1 view (the
  identity alone: not a product option yet). Cells per second, and how far the latents move:
  recall@8 of each cell's archived neighbours against those of its latent at the atlas's views,
  the same among the new cells (each set embedded alike), and recall@8 of a 90-degree-turned
  copy of each cell against the cell itself (D4 views make that 1 by construction);
- batch: the embedding at the atlas's views with 16 to 256 views per forward pass of the
  backbone (`Backbone.embed(views_per_batch=...)`); the latents are the same;
- end to end: what `cellatlas add` does per image (`steps.prepare_images` in its pool of
  `--threads` worker processes, `Embedder.embed_inputs` in one batch, `LatentIndex.extended`),
  and its peer, the plain loop a user would write: one process, each image prepared by the same
  per-image function (`steps.ImageWork`), its cells embedded and inserted one at a time.
The classical segmenter always; with --segmenter, a trained cellpose one as well. Without --home
a tiny atlas is built on generated images first (seconds) and other generated images indexed.
Model loading is timed apart (`load`): `add` pays it once per run. Wall times on a shared
machine are inflated by the other work; the CPU columns are not (the pool's workers counted).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, set_threads, write_json  # noqa: E402
from bench.search_bench import recall_at_k  # noqa: E402

K = 8
ONE_VIEW = "1 view"
STEP_COLUMNS = [("segmenter", "segmenter", "s"), ("step", "step", "s"), ("cells_per_s", "cells/s", ".1f"),
                ("ms_per_cell", "ms/cell", ".2f"), ("cpu_ms_per_cell", "CPU ms/cell", ".2f"),
                ("share", "share", ".1%")]
VIEW_COLUMNS = [("views", "views", "d"), ("angles", "angles", "s"), ("cells_per_s", "cells/s", ".1f"),
                ("cpu_ms_per_cell", "CPU ms/cell", ".2f"), ("recall_archive", "recall@8 archive", ".3f"),
                ("recall_new", "recall@8 new", ".3f"), ("recall_turned", "recall@8 turned 90", ".3f"),
                ("latent_mse", "latent MSE", ".4f")]
BATCH_COLUMNS = [("views_per_batch", "views per pass", "d"), ("images_per_pass", "cells per pass", "d"),
                 ("cells_per_s", "cells/s", ".1f"), ("cpu_ms_per_cell", "CPU ms/cell", ".2f"),
                 ("max_latent_difference", "max |latent - default|", ".2g")]
RUN_COLUMNS = [("segmenter", "segmenter", "s"), ("method", "method", "s"), ("images", "images", "d"),
               ("cells", "cells", "d"), ("seconds", "seconds", ".1f"), ("cells_per_s", "cells/s", ".2f"),
               ("cpu_seconds", "CPU s", ".1f"), ("cpu_cells_per_s", "cells/CPU s", ".2f"),
               ("prepare_cpu_s", "prepare CPU s", ".1f"), ("embed_cpu_s", "embed CPU s", ".1f"),
               ("insert_s", "insert s", ".3f")]


class StepClock:
    """Wall and CPU seconds (this process, all threads) summed per step name."""

    def __init__(self):
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, step: str):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall[step] += time.perf_counter() - wall
        self.cpu[step] += time.process_time() - cpu


VIEWS_PER_BATCH = (16, 32, 64, 128, 256)  # views in one forward pass of the backbone


def cpu_with_children() -> float:
    """CPU seconds of this process and of its ended children (the add's pool workers)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


# -- the steps one at a time ------------------------------------------------------------------
def step_by_step(records, segmenter, um_per_pixel: float, input_size: int, scratch: Path,
                 clock: StepClock) -> tuple[np.ndarray, int]:
    """Every image through the per-image steps of `steps.ImageWork` (`atlas.prepare.prepare_cells`
    and what follows it), each step under its own clock. Returns the model inputs of the cells
    found and the number of images rejected."""
    from PIL import Image

    from atlas.cell import SegmentationError, check_image
    from atlas.crop import crop_cell, model_input
    from atlas.dedup import average_hash, fine_hash
    from atlas.features import describe
    from atlas.files import save_image_atomic
    from atlas.ingest import ImageReadError, content_hash, read_image_bytes
    from atlas.version import crop_path, mask_path

    inputs, rejected = [], 0
    for record in records:
        with clock("read"):
            data = Path(record.path).read_bytes()
        with clock("content hash"):
            sha = content_hash(data)
        try:
            with clock("decode"):
                image = read_image_bytes(data)
                check_image(image)
            with clock("segment"):
                regions = segmenter.segment(image, main_only=record.label is not None)
        except (ImageReadError, SegmentationError):
            rejected += 1
            continue
        if not regions:
            rejected += 1
            continue
        for index, region in enumerate(regions):
            with clock("crop"):
                crop = crop_cell(image, region, um_per_pixel)
            with clock("describe"):
                describe(crop.image, crop.mask)
            with clock("hash"):
                average_hash(crop.image)
                fine_hash(crop.image)
            with clock("save crop"):
                target = scratch / crop_path(segmenter.name, f"{sha[:16]}-{index}")
                target.parent.mkdir(parents=True, exist_ok=True)
                save_image_atomic(Image.fromarray(crop.image), target, quality=92)
                save_image_atomic(Image.fromarray(crop.mask), mask_path(target))
            with clock("model input"):
                inputs.append(model_input([crop], input_size)[0])
    return (np.stack(inputs) if inputs else np.zeros((0, input_size, input_size, 3), np.uint8)), rejected


def step_rows(name: str, clock: StepClock, cells: int) -> list[dict]:
    total = sum(clock.wall.values())
    rows = [{"segmenter": name, "step": step, "seconds": seconds, "cpu_seconds": clock.cpu[step],
             "cells_per_s": cells / seconds if seconds else None, "ms_per_cell": 1000 * seconds / cells,
             "cpu_ms_per_cell": 1000 * clock.cpu[step] / cells, "share": seconds / total}
            for step, seconds in clock.wall.items()]
    rows.append({"segmenter": name, "step": "sum of steps", "seconds": total, "cpu_seconds": sum(clock.cpu.values()),
                 "cells_per_s": cells / total, "ms_per_cell": 1000 * total / cells,
                 "cpu_ms_per_cell": 1000 * sum(clock.cpu.values()) / cells, "share": 1.0})
    return rows


# -- views ---------------------------------------------------------------------------------------
def one_view_latents(embedder, inputs: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Latents from the identity view alone. The backbone averages over 8 views per view angle
    and has no setting for fewer, so this calls its input preparation and feature tap directly
    (what a `views` option of `Backbone.embed` would do)."""
    import torch

    backbone = embedder.backbone
    with torch.inference_mode():
        tapped = [backbone._tap(backbone._prepare(inputs[start : start + chunk])).cpu().numpy()
                  for start in range(0, len(inputs), chunk)]
        return embedder.vae.transform(np.concatenate(tapped).astype(np.float32))


def latents_at(embedder, inputs: np.ndarray, angles) -> np.ndarray:
    if angles == ONE_VIEW:
        return one_view_latents(embedder, inputs)
    kept = embedder.backbone.view_angles
    embedder.backbone.view_angles = tuple(angles)
    try:
        return embedder.embed_inputs(inputs)
    finally:
        embedder.backbone.view_angles = kept


def neighbours(index, queries: np.ndarray, k: int = K, skip_self: bool = False) -> np.ndarray:
    from atlas.search import LatentIndex

    found = (index if isinstance(index, LatentIndex) else LatentIndex.build(index, kind="exact"))
    _, positions = found.search(queries, k + 1 if skip_self else k)
    if skip_self:  # each query's own row (distance 0) removed; ties keep the first k others
        positions = np.array([[p for p in row if p != i][:k] for i, row in enumerate(positions)])
    return positions


def view_rows(embedder, inputs: np.ndarray, index) -> list[dict]:
    full_angles = tuple(embedder.backbone.view_angles)
    settings = [full_angles] + ([(0.0,)] if full_angles != (0.0,) else []) + [ONE_VIEW]
    turned = np.ascontiguousarray(np.rot90(inputs, 1, axes=(1, 2)))
    rows, full = [], None
    for angles in settings:
        cpu, wall = time.process_time(), time.perf_counter()
        latents = latents_at(embedder, inputs, angles)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if full is None:
            full = latents
            archive_truth = neighbours(index, full)
            new_truth = neighbours(full, full, skip_self=True)
        turned_latents = latents_at(embedder, turned, angles)
        rows.append({
            "views": 1 if angles == ONE_VIEW else 8 * len(angles),
            "angles": "identity" if angles == ONE_VIEW else ", ".join(f"{a:g}" for a in angles),
            "seconds": wall, "cpu_seconds": cpu, "cells_per_s": len(inputs) / wall,
            "cpu_ms_per_cell": 1000 * cpu / len(inputs),
            "recall_archive": recall_at_k(neighbours(index, latents), archive_truth),
            "recall_new": recall_at_k(neighbours(latents, latents, skip_self=True), new_truth),
            "recall_turned": recall_at_k(neighbours(index, turned_latents), neighbours(index, latents)),
            "latent_mse": float(np.mean((latents - full) ** 2)),
        })
    return rows


def batch_rows(embedder, inputs: np.ndarray) -> list[dict]:
    """The embedding at the atlas's views with `views_per_batch` views per forward pass (the
    backbone's batch: whole cells, all their views in one pass), and how far its latents are
    from those at the backbone's default (float rounding only, if the model is the same)."""

    import torch

    from atlas.backbone import EMBED_VIEWS_PER_PASS

    default = EMBED_VIEWS_PER_PASS.get(embedder.backbone.device.type, 32)
    views = 8 * len(embedder.backbone.view_angles)
    with torch.inference_mode():
        reference = embedder.vae.transform(embedder.backbone.embed(inputs, views_per_batch=default))
        rows = []
        for views_per_batch in sorted(set(VIEWS_PER_BATCH) | {default}):
            cpu, wall = time.process_time(), time.perf_counter()
            latents = embedder.vae.transform(embedder.backbone.embed(inputs, views_per_batch=views_per_batch))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            rows.append({"views_per_batch": views_per_batch, "images_per_pass": max(1, views_per_batch // views),
                         "default": views_per_batch == default, "seconds": wall, "cpu_seconds": cpu,
                         "cells_per_s": len(inputs) / wall, "cpu_ms_per_cell": 1000 * cpu / len(inputs),
                         "max_latent_difference": float(np.abs(latents - reference).max())})
    return rows


# -- end to end -----------------------------------------------------------------------------------
def add_like(records, segmenter, config, embedder, index) -> dict:
    """What `cellatlas add` does with the images: its prepare step (worker pool), one embedding
    call, one insert."""
    from indexer import steps

    clock = StepClock()
    wall, cpu = time.perf_counter(), cpu_with_children()
    with clock("prepare"):
        prepared = steps.prepare_images(records, segmenter, config)
    # With its workers' CPU: they have ended (and are counted) when prepare_images returns.
    clock.cpu["prepare"] = cpu_with_children() - cpu
    with clock("embed"):
        latents = embedder.embed_inputs(prepared.model_inputs)
    with clock("insert"):
        index.extended(latents)
    return _run_row("add (pool, batched)", records, len(latents), time.perf_counter() - wall,
                    cpu_with_children() - cpu, clock)


def plain_loop(records, segmenter, config, embedder, index) -> dict:
    """The peer: one process, each image prepared by the product's per-image function, each of
    its cells embedded and inserted on its own (no worker pool, no batching)."""
    import faiss

    from atlas.backbone import PRESETS
    from indexer import steps

    work = steps.ImageWork(segmenter, config.um_per_pixel, PRESETS[config.preset].input_size, str(config.home))
    faiss_index = faiss.clone_index(index.index)
    clock, cells = StepClock(), 0
    wall, cpu = time.perf_counter(), cpu_with_children()
    for record in records:
        with clock("prepare"):
            result = work(str(record.path), record.label)
        if isinstance(result, str):
            continue
        for _, model_input in result:
            with clock("embed"):
                latent = embedder.embed_inputs(model_input[None])
            with clock("insert"):
                faiss_index.add(latent)
            cells += 1
    return _run_row("plain loop (1 process, 1 cell at a time)", records, cells, time.perf_counter() - wall,
                    cpu_with_children() - cpu, clock)


def _run_row(method, records, cells, seconds, cpu_seconds, clock: StepClock) -> dict:
    return {"method": method, "images": len(records), "cells": cells, "seconds": seconds,
            "cells_per_s": cells / seconds, "cpu_seconds": cpu_seconds, "cpu_cells_per_s": cells / cpu_seconds,
            **{f"{part}_s": clock.wall[part] for part in ("prepare", "embed", "insert")},
            **{f"{part}_cpu_s": clock.cpu[part] for part in ("prepare", "embed", "insert")}}


# -- the atlas and the images ------------------------------------------------------------------------
def tiny_atlas(root: Path, threads: int) -> tuple[Path, Path]:
    """A tiny atlas built on generated images, and other generated images to add to it."""
    from atlas.synthetic import write_synthetic_archive
    from indexer.build import build
    from indexer.config import BuildConfig

    archive = write_synthetic_archive(root / "archive", per_class=6, seed=0)
    home = root / "atlas"
    build(BuildConfig(images=archive, home=home, preset="tiny", epochs=1, vae_epochs=3, som_epochs=4,
                      threads=threads, progress=False))
    return home, write_synthetic_archive(root / "new", per_class=3, seed=1)


def chosen_records(images: Path, limit: int | None, label_from_folders: bool) -> list:
    """The images of `images` (`list_images`), `limit` of them spread evenly over the sorted
    list (so every class folder is represented); unlabelled unless `label_from_folders`, as
    `cellatlas add` treats them (every white cell of an unlabelled image is indexed)."""
    from atlas.ingest import ImageRecord, list_images

    records = list_images(images)
    if limit is not None and limit < len(records):
        records = [records[i] for i in np.linspace(0, len(records) - 1, limit).round().astype(int)]
    return records if label_from_folders else [ImageRecord(r.path, None) for r in records]


def run(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    set_threads(args.threads)
    import torch

    from atlas.backbone import PRESETS
    from atlas.segmentation import load_segmenter
    from atlas.store import AtlasStore
    from indexer.config import parent_config

    scratch = Path(tempfile.mkdtemp(prefix="cellatlas-bench-index-"))
    try:
        home, images = args.home, args.images
        if home is None:
            print("building a tiny atlas on generated images (no --home given)")
            home, images = tiny_atlas(scratch / "tiny", args.threads)
        records = chosen_records(images, args.limit, args.label_from_folders)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        store = AtlasStore(home)
        version = store.version(store.require_current())
        config = parent_config(version.manifest, version.folder, scratch / "home", threads=args.threads,
                               progress=False)
        embedder = version.read_embedder(device="cpu")
        index = version.read_index()
        timings["load"] = time.perf_counter() - started
        segmenters = [("classical", load_segmenter("classical", config.um_per_pixel))]
        if args.segmenter:
            cellpose = load_segmenter(args.segmenter, config.um_per_pixel)
            segmenters.append((cellpose.name, cellpose))
        input_size = PRESETS[config.preset].input_size
        print(f"atlas {version.folder} ({index.size} cells, preset {config.preset}, views "
              f"{8 * len(embedder.backbone.view_angles)}); {len(records)} images from {images}; "
              f"{args.threads} thread(s)")

        # Warm-up, untimed: the first network calls allocate and (cellpose) load weights.
        warm = chosen_records(images, 1, args.label_from_folders)
        for _, segmenter in segmenters:
            step_by_step(warm, segmenter, config.um_per_pixel, input_size, scratch / "warm", StepClock())
        embedder.embed_inputs(np.zeros((2, input_size, input_size, 3), np.uint8))

        steps_table, runs, per_segmenter, inputs = [], [], {}, None
        for name, segmenter in segmenters:
            clock = StepClock()
            found, rejected = step_by_step(records, segmenter, config.um_per_pixel, input_size,
                                           scratch / f"steps-{name}", clock)
            if not len(found):
                raise ValueError(f"the {name} segmenter found no cell in the {len(records)} images")
            with clock("embed"):
                latents = embedder.embed_inputs(found)
            with clock("search insert"):
                index.extended(latents)
            steps_table += step_rows(name, clock, len(found))
            per_segmenter[name] = {"cells": len(found), "images_rejected": rejected,
                                   "images_per_s_segment": len(records) / clock.wall["segment"]}
            inputs = found if inputs is None else inputs
            for method in (add_like, plain_loop):
                run_config = replace(config, home=scratch / f"{method.__name__}-{name}")
                runs.append({"segmenter": name, **method(records, segmenter, run_config, embedder, index)})
        views = view_rows(embedder, inputs, index)
        batches = batch_rows(embedder, inputs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print("\nsteps, one process (where the time goes; image steps per cell found)")
    print_table(steps_table, STEP_COLUMNS)
    print(f"\nembedding by number of views (classical crops; recall against the atlas's {views[0]['views']} views)")
    print_table(views, VIEW_COLUMNS)
    print(f"\nembedding by batch (views per forward pass; {views[0]['views']} views per cell)")
    print_table(batches, BATCH_COLUMNS)
    print("\nend to end: add's steps against a plain loop")
    print_table(runs, RUN_COLUMNS)
    result = {"benchmark": "index",
              "setting": {"home": str(home) if args.home else "tiny generated atlas", "images": str(images),
                          "image_count": len(records), "threads": args.threads, "tiny": args.tiny,
                          "label_from_folders": args.label_from_folders, "preset": config.preset,
                          "um_per_pixel": config.um_per_pixel, "atlas_cells": index.size,
                          "view_angles": list(embedder.backbone.view_angles),
                          "segmenters": [name for name, _ in segmenters], "torch_threads": torch.get_num_threads(),
                          "load_seconds": timings["load"]},
              "segmenters": per_segmenter, "steps": steps_table, "views": views, "batches": batches,
              "end_to_end": runs}
    write_json(result, args.out)
    return result


def parse(argv):
    parser = argparse.ArgumentParser(prog="cellatlas bench index", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="a seconds-long run (CI): a few images (a tiny generated atlas without --home)")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--home", type=Path, help="ATLAS_HOME whose live version is used (only read); "
                                                  "default: a tiny atlas built on generated images")
    parser.add_argument("--images", type=Path, help="images to index (a folder, or one sub-folder per class)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads and add's worker processes")
    parser.add_argument("--limit", type=int, help="this many images, spread over the folder (default: all; "
                                                  "--tiny: 8)")
    parser.add_argument("--segmenter", help="a trained segmenter folder (cellatlas segmenter train): "
                                            "measured beside the classical one")
    parser.add_argument("--label-from-folders", action="store_true",
                        help="one cell per image (the main one), as 'cellatlas add --label-from-folders'; "
                             "default: every white cell of each image")
    args = parser.parse_args(argv)
    if args.threads < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--threads and --limit must be positive")
    if (args.home is None) != (args.images is None):
        parser.error("give --home and --images together (or neither: a tiny generated atlas)")
    if args.segmenter == "classical":
        args.segmenter = None  # measured anyway
    if args.tiny and args.limit is None:
        args.limit = 8
    return args


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
