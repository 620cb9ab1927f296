"""Where the per-cell work of a build or an add runs: on this machine, or on a Ray cluster.

    local  (default) images prepared in worker processes of this machine, cells embedded in
           this process with its torch threads, best SOM nodes and the index computed here
    ray    the same functions, fanned out: `prepare` (ingest, segment, describe, hash) and
           `embed` are Ray Data `map_batches` stages whose actors hold the segmenter or the
           models (sized by CPUs/GPUs per worker); each cell's best SOM node is computed in Ray
           tasks over shards, and an IVF index is filled shard by shard and merged

Training (backbone, VAE, SOM, classifier, UMAP) and de-duplication stay on the driver, as in a
local build (`indexer.build`): the engine only changes where the per-cell stages run, never
what they compute, so the same inputs and seed give the same version with either engine
(tests/test_ray_engine.py). Results come back to the driver in input order.

Ray is an optional extra (`pip install 'cellatlas[ray]'`): only this module imports it, and
only when the ray engine is asked for.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from atlas.backbone import Backbone
from atlas.embedder import Embedder
from atlas.progress import progress
from atlas.runtime import keep_freed_memory, openmp_wait_of
from atlas.search import LatentIndex, empty_index
from atlas.som import BatchSOM
from atlas.vae import VAE
from indexer.config import BuildError
from indexer.steps import ImageWork, in_processes, som_best_nodes

ENGINES = ("local", "ray")
RAY_INSTALL = "pip install 'cellatlas[ray]'"
# Cells per Ray task or actor call. Prepare: images per call (a few seconds of work each, so
# that progress moves and a lost worker costs little); embed: one forward pass's worth of crops.
PREPARE_BATCH = 16
EMBED_BATCH = 64
# Below this many cells an index or a best-node pass is computed on the driver: shipping the
# shards would cost more than the work (an exact index is a copy of the latents anyway).
SHARD_ABOVE = 200_000
SHARD_CELLS = 250_000


@dataclass
class RayOptions:
    address: str | None = None  # a running cluster ("ray://host:10001", "host:6379" or "auto"); None = start one here
    workers: int | None = None  # actors per stage; None = the cluster's CPUs / cpus_per_worker
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # > 0: embedding actors run their models on a GPU


class LocalEngine:
    """This machine: worker processes for the images, this process's threads for the models."""

    name = "local"

    def __init__(self, threads: int):
        self.threads = threads

    def map_images(self, work: ImageWork, records: list) -> Iterator:
        return in_processes(self.threads)(work, records)

    def tap(self, backbone: Backbone, inputs: np.ndarray, show_progress: bool = False) -> np.ndarray:
        """The backbone's tapped features of every model input (the VAE's training input)."""
        return backbone.embed(inputs, progress=show_progress)

    def embed(self, embedder: Embedder, inputs: np.ndarray, show_progress: bool = False) -> np.ndarray:
        """Latents of every model input."""
        return embedder.embed_inputs(inputs, show_progress=show_progress)

    def best_nodes(self, som: BatchSOM, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return som_best_nodes(som, latents)

    def build_index(self, latents: np.ndarray) -> LatentIndex:
        return LatentIndex.build(latents)

    def describe(self) -> dict:
        return {"engine": self.name, "threads": self.threads}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RayEngine(LocalEngine):
    """A Ray cluster (or a local one started for the job). Every node must have CellAtlas
    installed (the same image) and see ATLAS_HOME and the images at the same paths: prepare
    actors write crops there and read images from there."""

    name = "ray"

    def __init__(self, threads: int, options: RayOptions):
        super().__init__(threads)
        try:
            import ray
            import ray.data  # noqa: F401  (the Data extra)
        except ImportError:
            raise BuildError(f"the ray engine needs Ray, which is not installed: {RAY_INSTALL}") from None
        self.ray = ray
        self.options = options
        _check_reachable(options.address)
        self._started = not ray.is_initialized()
        if self._started:
            try:
                # The workers wait for OpenMP work as this driver does (atlas.runtime.OPENMP_WAIT):
                # on a cluster started elsewhere they would otherwise keep their raylet's setting.
                ray.init(address=options.address, num_cpus=None if options.address else threads,
                         include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                         configure_logging=False, runtime_env={"env_vars": openmp_wait_of()})
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise BuildError(f"cannot reach the Ray cluster at {options.address or 'this machine'}: {error}") from None
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        # A short job has fewer batches than actors; Ray warns of idle actors, which is no fault.
        warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # results in input order, as the local engine's
        context.enable_progress_bars = False  # the driver reports progress itself, per stage
        context.print_on_execution_start = False
        cpus = ray.cluster_resources().get("CPU", 1)
        self.workers = options.workers or max(1, int(cpus // max(options.cpus_per_worker, 1e-9)))

    # -- the per-image stage ----------------------------------------------------------------
    def map_images(self, work: ImageWork, records: list) -> Iterator:
        items = [{"path": str(r.path), "label": "" if r.label is None else r.label,
                  "um_per_pixel": np.nan if r.um_per_pixel is None else float(r.um_per_pixel)} for r in records]
        dataset = self.ray.data.from_items(items, override_num_blocks=_blocks(len(items), PREPARE_BATCH)).map_batches(
            _Prepare, fn_constructor_args=(work, self._actor_threads()), batch_size=PREPARE_BATCH,
            batch_format="numpy", compute=self._pool(), num_cpus=self.options.cpus_per_worker)
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for result in batch["result"]:
                yield pickle.loads(result)

    # -- the embedding stage ----------------------------------------------------------------
    def tap(self, backbone: Backbone, inputs: np.ndarray, show_progress: bool = False) -> np.ndarray:
        return self._map_models(_saved(backbone), None, inputs, backbone.feature_dim, "tap", show_progress)

    def embed(self, embedder: Embedder, inputs: np.ndarray, show_progress: bool = False) -> np.ndarray:
        return self._map_models(_saved(embedder.backbone), _saved(embedder.vae), inputs, embedder.latent_dim,
                                "embed", show_progress)

    def _map_models(self, backbone: bytes, vae: bytes | None, inputs: np.ndarray, width: int, desc: str,
                    show_progress: bool) -> np.ndarray:
        if not len(inputs):
            return np.zeros((0, width), np.float32)
        # One block per batch, cut here: a repartition would need CPUs the actor pool already holds.
        chunks = [np.ascontiguousarray(inputs[start : start + EMBED_BATCH]) for start in range(0, len(inputs), EMBED_BATCH)]
        dataset = self.ray.data.from_numpy(chunks).map_batches(
            _Embed, fn_constructor_args=(backbone, vae, self._actor_threads()), batch_size=EMBED_BATCH,
            batch_format="numpy", compute=self._pool(), num_cpus=self.options.cpus_per_worker,
            num_gpus=self.options.gpus_per_worker or None)

        def rows() -> Iterator[np.ndarray]:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                yield from batch["out"]

        found = list(progress(rows(), show_progress, total=len(inputs), desc=desc, unit="cell"))
        result = np.stack(found).astype(np.float32) if found else np.zeros((0, width), np.float32)
        if len(result) != len(inputs):  # never silently misalign cells and latents
            raise RuntimeError(f"the Ray embedding stage returned {len(result)} rows for {len(inputs)} cells")
        return result

    # -- shards ------------------------------------------------------------------------------
    def best_nodes(self, som: BatchSOM, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(latents) <= SHARD_ABOVE:
            return som_best_nodes(som, latents)
        som_ref = self.ray.put(som.to_arrays())
        task = self.ray.remote(num_cpus=self.options.cpus_per_worker)(_best_nodes_of_shard)
        parts = self.ray.get([task.remote(som_ref, latents[start : start + SHARD_CELLS])
                              for start in range(0, len(latents), SHARD_CELLS)])
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def build_index(self, latents: np.ndarray) -> LatentIndex:
        """Above SHARD_ABOVE cells (IVF by `INDEX_BY_SIZE`): lists trained on a sample here, then
        filled shard by shard in Ray tasks and merged in order."""
        import faiss

        empty = empty_index(latents)
        if len(latents) <= SHARD_ABOVE or not isinstance(empty, faiss.IndexIVF):
            empty.add(np.ascontiguousarray(latents, dtype=np.float32))
            return LatentIndex(empty)
        empty_ref = self.ray.put(faiss.serialize_index(empty))
        task = self.ray.remote(num_cpus=self.options.cpus_per_worker)(_fill_shard)
        shards = self.ray.get([task.remote(empty_ref, latents[start : start + SHARD_CELLS])
                               for start in range(0, len(latents), SHARD_CELLS)])
        return LatentIndex.merged([faiss.deserialize_index(shard) for shard in shards])

    def describe(self) -> dict:
        resources = self.ray.cluster_resources()
        return {"engine": self.name, "address": self.options.address, "workers": self.workers,
                "cpus_per_worker": self.options.cpus_per_worker, "gpus_per_worker": self.options.gpus_per_worker,
                "cluster_cpus": resources.get("CPU", 0), "cluster_gpus": resources.get("GPU", 0),
                "nodes": len([n for n in self.ray.nodes() if n.get("Alive")])}

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()

    def _pool(self):
        return self.ray.data.ActorPoolStrategy(size=self.workers)

    def _actor_threads(self) -> int:
        return max(1, math.floor(self.options.cpus_per_worker))


Engine = LocalEngine  # what build and add are given: the local engine or one that extends it


def open_engine(name: str, threads: int, ray_options: RayOptions | None = None) -> Engine:
    """The engine called `name` ("local" or "ray"), to be closed after the job (a context manager)."""
    if name == "local":
        return LocalEngine(threads)
    if name == "ray":
        return RayEngine(threads, ray_options or RayOptions())
    raise BuildError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")


# -- what runs on the workers ------------------------------------------------------------------
class _Prepare:
    """A Ray actor holding the job's segmenter (loaded once): prepares a batch of images."""

    def __init__(self, work: ImageWork, threads: int):
        torch.set_num_threads(threads)
        keep_freed_memory()
        self.work = work

    def __call__(self, batch: dict) -> dict:
        results = [pickle.dumps(self.work(str(path), str(label) or None, None if np.isnan(scale) else float(scale)))
                   for path, label, scale in zip(batch["path"], batch["label"], batch["um_per_pixel"])]
        return {"result": np.array(results, dtype=object)}


class _Embed:
    """A Ray actor holding the backbone (and the VAE for latents), on its GPU when it has one."""

    def __init__(self, backbone: bytes, vae: bytes | None, threads: int):
        torch.set_num_threads(threads)
        keep_freed_memory()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.backbone = Backbone.load(io.BytesIO(backbone), device=device)
        self.vae = VAE.load(io.BytesIO(vae), device=device) if vae is not None else None

    def __call__(self, batch: dict) -> dict:
        with torch.inference_mode():
            tapped = self.backbone.embed(batch["data"])
            return {"out": tapped if self.vae is None else self.vae.transform(tapped)}


def _best_nodes_of_shard(som_arrays: dict, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    torch.set_num_threads(1)
    return som_best_nodes(BatchSOM.from_arrays(som_arrays), latents)


def _fill_shard(empty: np.ndarray, latents: np.ndarray) -> np.ndarray:
    import faiss

    index = faiss.deserialize_index(empty)
    index.add(np.ascontiguousarray(latents, dtype=np.float32))
    return faiss.serialize_index(index)


def _check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """A cluster given as host:port (or ray://host:port) answers a TCP connection within
    `timeout_s`, or the job stops with a message: Ray itself keeps retrying for minutes."""
    if not address or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise BuildError(f"--ray-address must be host:port, ray://host:port or auto, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise BuildError(f"cannot reach the Ray cluster at {address}: {error.strerror or error}") from None


def _blocks(items: int, batch: int) -> int:
    """Blocks to cut `items` into: one per batch, so that every actor of the pool gets work."""
    return max(1, math.ceil(items / batch))


def _saved(model) -> bytes:
    """A model as its own file's bytes: what travels to the actors (loaded there onto their device)."""
    buffer = io.BytesIO()
    model.save(buffer)
    return buffer.getvalue()
