"""Process settings of a job: OpenMP waiting by whether the job shares its cores."""

from atlas.runtime import OPENMP_WAIT, set_openmp_wait


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
