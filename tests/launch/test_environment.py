"""Task environments: SLURM host lists, tasks per node, and RANK/WORLD_SIZE/MASTER_* derivation."""

from __future__ import annotations

import pytest

from promoter_dist.launch import environment as E


@pytest.mark.parametrize("nodelist, hosts", [
    ("node7", ["node7"]),
    ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
    ("a1,b[2-3]", ["a1", "b2", "b3"]),
    ("n[001-003]-ib", ["n001-ib", "n002-ib", "n003-ib"]),
    ("n[8-10],m[098-101]", ["n8", "n9", "n10", "m098", "m099", "m100", "m101"]),
    ("n[1-010]", [f"n{i}" for i in range(1, 11)]),  # padding follows the lower bound
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("a[1,3],b", ["a1", "a3", "b"]),
    ("n[0-1],n[0-1]", ["n0", "n1", "n0", "n1"]),  # order and duplicates kept, as scontrol does
    ("n-[1-2]", ["n-1", "n-2"]),
    ("login1.cluster.org,c[5-6].cluster.org", ["login1.cluster.org", "c5.cluster.org", "c6.cluster.org"]),
    ("gpu[7]", ["gpu7"]),
    (" gpu[1-2] ", ["gpu1", "gpu2"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert E.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "n[3-1]", "n[1-2", "n1-2]", "n[[1-2]]", "n[a-b]", "n[1-]", "a,,b", "n[]"])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        E.expand_nodelist(bad)


@pytest.mark.parametrize("spec, counts", [
    ("2", [2]), ("2(x3)", [2, 2, 2]), ("2(x3),1", [2, 2, 2, 1]), ("8(x4)", [8] * 4), ("1,2(x2)", [1, 2, 2]),
])
def test_expand_tasks_per_node(spec, counts):
    assert E.expand_tasks_per_node(spec) == counts


def test_expand_tasks_per_node_rejects_malformed():
    with pytest.raises(ValueError):
        E.expand_tasks_per_node("2(3)")


def test_master_port_is_deterministic_and_in_range():
    ports = {E.master_port(job) for job in range(100_000, 110_000)}
    assert len(ports) == 10_000  # 10,000 consecutive jobs never share a port
    assert min(ports) >= E.PORT_LOW and max(ports) < E.PORT_LOW + E.PORT_SPAN < 32768
    assert E.master_port("12345") == E.master_port(12345) == E.PORT_LOW + 12345 % E.PORT_SPAN
    assert E.master_port("123_4") == E.master_port("123_4")
    assert E.PORT_LOW <= E.master_port("debug-abc") < E.PORT_LOW + E.PORT_SPAN


def slurm_env(**overrides: str) -> dict[str, str]:
    """The variables srun gives task 9 of a 5-node x 2-task job (what a real srun sets)."""
    env = {
        "SLURM_JOB_ID": "4242", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NODEID": "4",
        "SLURM_NTASKS": "10", "SLURM_STEP_NUM_TASKS": "10", "SLURM_JOB_NODELIST": "gpu[01-04,07]",
        "SLURM_STEP_NODELIST": "gpu[01-04,07]", "SLURM_NODELIST": "gpu[01-04,07]", "SLURM_TASKS_PER_NODE": "2(x5)",
        "SLURM_STEP_TASKS_PER_NODE": "2(x5)", "SLURM_STEP_ID": "0", "SUBMITIT_EXECUTOR": "slurm",
    }
    env.update(overrides)
    return env


def test_from_slurm_multi_node():
    dist = E.from_slurm(slurm_env())
    assert (dist.rank, dist.local_rank, dist.world_size, dist.local_world_size) == (9, 1, 10, 2)
    assert (dist.node_rank, dist.num_nodes, dist.master_addr) == (4, 5, "gpu01")
    assert dist.master_port == E.master_port("4242") and dist.source == "slurm"
    assert dist.variables() == {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "10", "LOCAL_WORLD_SIZE": "2",
                                "NODE_RANK": "4", "MASTER_ADDR": "gpu01", "MASTER_PORT": str(E.master_port(4242))}


def test_from_slurm_master_address_override():
    dist = E.from_slurm(slurm_env(PROMOTER_DIST_MASTER_ADDR="gpu07-ib", MASTER_ADDR="stale-login-node"))
    assert dist.master_addr == "gpu07-ib" and dist.variables()["MASTER_ADDR"] == "gpu07-ib"


def test_from_slurm_uneven_tasks_per_node():
    # 7 tasks on 4 nodes: 2,2,2,1; the last node's only task.
    env = slurm_env(SLURM_PROCID="6", SLURM_LOCALID="0", SLURM_NODEID="3", SLURM_NTASKS="7", SLURM_STEP_NUM_TASKS="7",
                    SLURM_STEP_NODELIST="a1,b[2-3],c9", SLURM_JOB_NODELIST="a1,b[2-3],c9",
                    SLURM_STEP_TASKS_PER_NODE="2(x3),1", SLURM_TASKS_PER_NODE="2(x3),1")
    dist = E.from_slurm(env)
    assert (dist.rank, dist.world_size, dist.local_world_size, dist.node_rank, dist.master_addr) == (6, 7, 1, 3, "a1")


def test_from_slurm_prefers_the_step_over_the_job():
    # A step on 2 of the job's 4 nodes: the master is the step's first node.
    env = slurm_env(SLURM_PROCID="3", SLURM_LOCALID="1", SLURM_NODEID="1", SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="4",
                    SLURM_JOB_NODELIST="n[001-004]-ib", SLURM_STEP_NODELIST="n[003-004]-ib",
                    SLURM_TASKS_PER_NODE="2(x4)", SLURM_STEP_TASKS_PER_NODE="2(x2)")
    dist = E.from_slurm(env)
    assert (dist.rank, dist.world_size, dist.local_world_size, dist.num_nodes, dist.master_addr) == (
        3, 4, 2, 2, "n003-ib")


def test_from_slurm_with_only_job_level_variables():
    env = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0", "SLURM_NTASKS": "2",
           "SLURM_NODELIST": "vm", "SLURM_NTASKS_PER_NODE": "2"}
    dist = E.from_slurm(env)
    assert (dist.rank, dist.world_size, dist.local_world_size, dist.master_addr) == (1, 2, 2, "vm")


@pytest.mark.parametrize("overrides, match", [
    ({"SLURM_PROCID": "10"}, "outside world size"),
    ({"SLURM_LOCALID": "2"}, "outside local world size"),
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x4)"}, "lists 4 nodes"),
    ({"SLURM_STEP_TASKS_PER_NODE": "3(x5)"}, "sum to 15"),
    ({"SLURM_PROCID": "x"}, "not an integer"),
])
def test_from_slurm_rejects_inconsistent_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        E.from_slurm(slurm_env(**overrides))


def test_from_slurm_names_a_missing_variable():
    env = slurm_env()
    del env["SLURM_PROCID"]
    with pytest.raises(KeyError, match="SLURM_PROCID"):
        E.from_slurm(env)


def test_derive_dispatches_and_ignores_stale_launcher_variables():
    # sbatch copies the submitting shell's environment: stale RANK/MASTER_ADDR must not win.
    stale = {"RANK": "3", "WORLD_SIZE": "99", "MASTER_ADDR": "login1", "MASTER_PORT": "1"}
    assert E.derive(slurm_env(**stale)).master_addr == "gpu01"
    local = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_NTASKS": "4", "SUBMITIT_LOCAL_GLOBALID": "2",
             "SUBMITIT_LOCAL_LOCALID": "2", "SUBMITIT_LOCAL_JOB_ID": "5555", **slurm_env(), **stale}
    local["SUBMITIT_EXECUTOR"] = "local"  # a local job started inside a SLURM allocation
    dist = E.derive(local)
    assert (dist.source, dist.rank, dist.world_size, dist.local_world_size, dist.master_addr, dist.master_port) == (
        "local", 2, 4, 4, "127.0.0.1", E.master_port(5555))
    single = E.derive({"SUBMITIT_DEBUG_JOB_ID": "abc", **stale})
    assert (single.source, single.rank, single.world_size, single.master_addr) == ("single", 0, 1, "127.0.0.1")


def test_setup_exports_without_touching_cuda_visible_devices():
    environ = slurm_env(CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    dist = E.setup(environ, prefer_scontrol=False)
    assert environ["RANK"] == "9" and environ["LOCAL_RANK"] == "1" and environ["WORLD_SIZE"] == "10"
    assert environ["MASTER_ADDR"] == "gpu01" and environ["MASTER_PORT"] == str(dist.master_port)
    assert environ["LOCAL_WORLD_SIZE"] == "2" and environ["NODE_RANK"] == "4"
    # DeepSpeed picks cuda:LOCAL_RANK among all of the node's GPUs.
    assert environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"


def test_hostnames_falls_back_to_the_parser_without_scontrol(monkeypatch):
    monkeypatch.setattr(E.shutil, "which", lambda name: None)
    assert E.scontrol_hostnames("gpu[1-2]") is None
    assert E.hostnames("gpu[1-2]", prefer_scontrol=True) == ["gpu1", "gpu2"]


# --------------------------------------------------------------------------- each rank's GPU under each binding


def gpu_job_task(node: int, local: int, tasks_per_node: str = "4(x2)", visible: str = "0,1,2,3") -> dict[str, str]:
    """The variables srun gives one task of a 2-node job on gpu[01-02] (4 tasks per node unless told),
    with the ``CUDA_VISIBLE_DEVICES`` SLURM (or the site) set for it."""
    per_node = E.expand_tasks_per_node(tasks_per_node)
    return slurm_env(SLURM_PROCID=str(sum(per_node[:node]) + local), SLURM_LOCALID=str(local), SLURM_NODEID=str(node),
                     SLURM_NTASKS=str(sum(per_node)), SLURM_STEP_NUM_TASKS=str(sum(per_node)),
                     SLURM_JOB_NODELIST="gpu[01-02]", SLURM_STEP_NODELIST="gpu[01-02]", SLURM_NODELIST="gpu[01-02]",
                     SLURM_TASKS_PER_NODE=tasks_per_node, SLURM_STEP_TASKS_PER_NODE=tasks_per_node,
                     CUDA_VISIBLE_DEVICES=visible)


def gpu_of(environ: dict[str, str]) -> tuple[int, str]:
    """The index (among the GPUs the task sees) its rank computes on, and that GPU's entry of
    CUDA_VISIBLE_DEVICES: what the trainer derives in the task (torch counts the listed GPUs)."""
    from promoter_dist.distributed import device_index

    dist = E.setup(environ, prefer_scontrol=False)
    listed = environ["CUDA_VISIBLE_DEVICES"].split(",")
    index = device_index(dist, visible=len(listed), visible_list=environ["CUDA_VISIBLE_DEVICES"])
    return index, listed[index]


def test_every_gpu_of_the_node_visible_each_rank_takes_its_local_rank():
    # --gpus-per-node 4 --ntasks-per-node 4, no binding: every task sees the node's four GPUs.
    for node in (0, 1):
        assert [gpu_of(gpu_job_task(node, local)) for local in range(4)] == [(0, "0"), (1, "1"), (2, "2"), (3, "3")]


@pytest.mark.parametrize("own_id", [lambda local: str(local), lambda local: "0"], ids=["node-index", "cgroup-masked"])
def test_one_gpu_bound_per_task_each_rank_takes_the_one_it_sees(own_id):
    # --gpus-per-task=1 or --gpu-bind=single:1: SLURM lists one GPU per task, by its index on the node,
    # or as 0 where the task's cgroup hides the others (ConstrainDevices=yes).
    for node in (0, 1):
        got = [gpu_of(gpu_job_task(node, local, visible=own_id(local))) for local in range(4)]
        assert got == [(0, own_id(local)) for local in range(4)]


def test_a_sites_own_list_each_rank_takes_its_entry():
    # The site (or the user's --setup) lists the job's GPUs itself: GPUs 4-7 of the node.
    got = [gpu_of(gpu_job_task(1, local, visible="4,5,6,7")) for local in range(4)]
    assert got == [(0, "4"), (1, "5"), (2, "6"), (3, "7")]
    # More GPUs listed than tasks: the first ones, one per task.
    assert [gpu_of(gpu_job_task(0, local, "2(x2)", visible="4,5,6,7")) for local in range(2)] == [(0, "4"), (1, "5")]


def test_uneven_tasks_per_node_and_submitit_local():
    # 4 tasks on the first node, 2 on the second: the second node's ranks 4 and 5 take its GPUs 0 and 1.
    assert [gpu_of(gpu_job_task(1, local, "4,2")) for local in range(2)] == [(0, "0"), (1, "1")]
    # submitit's local executor passes the shell's CUDA_VISIBLE_DEVICES (submit.local_visible_gpus) to every task.
    for local in range(2):
        environ = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": str(local),
                   "SUBMITIT_LOCAL_LOCALID": str(local), "SUBMITIT_LOCAL_JOB_ID": "77", "CUDA_VISIBLE_DEVICES": "5,7"}
        assert gpu_of(environ) == (local, "57"[local])


def test_more_tasks_than_gpus_on_a_node_is_a_clear_error():
    from promoter_dist.distributed import device_index
    from promoter_dist.errors import UserError

    with pytest.raises(UserError, match=r"^rank 7: 4 tasks on this node but 2 GPUs visible to each "
                                        r"\(CUDA_VISIBLE_DEVICES=0,1\): start one task per GPU"):
        gpu_of(gpu_job_task(1, 3, visible="0,1"))
    with pytest.raises(UserError, match=r"^rank 0: no GPU visible \(CUDA_VISIBLE_DEVICES=\)"):
        device_index(E.derive(gpu_job_task(0, 0, visible="")), visible=0, visible_list="")
