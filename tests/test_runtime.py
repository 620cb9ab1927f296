"""Process settings of a job: OpenMP waiting by whether the job shares its cores."""

import os

import pytest

from atlas.runtime import OPENMP_WAIT, openmp_wait_of, set_openmp_wait


def test_a_job_sharing_its_cores_sleeps_at_once_and_a_batch_job_spins_briefly():
    shared, own = {}, {}
    set_openmp_wait(shares_cores=True, environ=shared)
    set_openmp_wait(shares_cores=False, environ=own)
    assert shared == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}
    assert own == OPENMP_WAIT["own"] and "OMP_WAIT_POLICY" not in own


def test_a_job_started_by_the_server_keeps_its_passive_waiting_and_set_values_are_kept():
    environ = {}
    set_openmp_wait(shares_cores=True, environ=environ)  # the server's child environment
    set_openmp_wait(shares_cores=False, environ=environ)  # the child's own CLI start
    assert environ["GOMP_SPINCOUNT"] == "0" and environ["OMP_WAIT_POLICY"] == "PASSIVE"
    mine = {"GOMP_SPINCOUNT": "5"}
    set_openmp_wait(shares_cores=False, environ=mine)
    assert mine == {"GOMP_SPINCOUNT": "5"}


def test_ray_workers_on_a_cluster_started_elsewhere_wait_as_the_driver_does(monkeypatch):
    """Nodes started before the driver set its waiting (as `ray start` on another machine is)
    keep their own environment; the engine hands the driver's setting to the job's workers."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    from ray.cluster_utils import Cluster

    from indexer.engines import RayEngine, RayOptions

    if ray.is_initialized():
        ray.shutdown()
    for name in OPENMP_WAIT["shared"]:
        monkeypatch.delenv(name, raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        for name, value in OPENMP_WAIT["shared"].items():  # the driver's setting, after the nodes started
            monkeypatch.setenv(name, value)
        engine = RayEngine(1, RayOptions(address=cluster.address))
        try:
            seen = engine.ray.get(engine.ray.remote(num_cpus=1)(
                lambda: {name: os.environ.get(name) for name in OPENMP_WAIT["shared"]}).remote())
        finally:
            engine.close()
        assert seen == OPENMP_WAIT["shared"]
    finally:
        cluster.shutdown()


def test_the_waiting_handed_to_workers_is_only_what_is_set():
    assert openmp_wait_of({"PATH": "/bin"}) == {}
    assert openmp_wait_of({"GOMP_SPINCOUNT": "1000", "PATH": "/bin"}) == {"GOMP_SPINCOUNT": "1000"}
