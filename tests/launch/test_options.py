"""Cluster options: SLURM times, validation, and the submitit keywords they map to (pure, no SLURM)."""

from __future__ import annotations

import pytest

from promoter_dist.errors import UserError
from promoter_dist.launch.options import (ClusterOptions, executor_parameters, parse_time,
                                          refuse_control_characters)


@pytest.mark.parametrize("text, minutes", [
    ("90", 90), ("1:30", 2), ("24:00:00", 1440), ("0:00:59", 1), ("2-0", 2880), ("1-12:30", 2190),
    ("1-00:00:01", 1441), (45, 45),
])
def test_parse_time(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize("bad", ["", "1h", "00:00:00", "1:2:3:4", "-5"])
def test_parse_time_rejects(bad):
    with pytest.raises(UserError, match="--time"):
        parse_time(bad)


def test_cluster_options_validation():
    with pytest.raises(UserError, match="--cluster"):
        ClusterOptions(cluster="kubernetes")
    with pytest.raises(UserError, match="--nodes 1"):
        ClusterOptions(cluster="local", nodes=2)
    with pytest.raises(UserError, match="--cluster local"):
        ClusterOptions(cluster="debug", tasks_per_node=2)
    with pytest.raises(UserError, match="--gpus-per-node"):
        ClusterOptions(gpus_per_node=-1)
    assert ClusterOptions(gpus_per_node=8).tasks == 8
    assert ClusterOptions(gpus_per_node=8, tasks_per_node=1).tasks == 1
    assert ClusterOptions().tasks == 1
    # GPUs unset (None: the submission asks the cluster) and 0 both mean one task unless told.
    assert ClusterOptions().gpus_per_node is None and ClusterOptions(gpus_per_node=0).tasks == 1


def test_more_tasks_than_gpus_is_refused_before_the_job_queues():
    with pytest.raises(UserError, match=r"^--tasks-per-node 4 with --gpus-per-node 2: more tasks than GPUs"):
        ClusterOptions(gpus_per_node=2, tasks_per_node=4)
    assert ClusterOptions(gpus_per_node=0, tasks_per_node=4).tasks == 4  # CPU ranks
    assert ClusterOptions(tasks_per_node=4).tasks == 4  # GPUs not decided yet


def test_command_line_leaves_gpus_and_cores_unset():
    import argparse

    from promoter_dist.launch.options import add_cluster_arguments, cluster_options_from_args

    parser = argparse.ArgumentParser()
    add_cluster_arguments(parser, time="1:00:00", job_name="x")
    options = cluster_options_from_args(parser.parse_args([]))
    assert options.gpus_per_node is None and options.cpus_per_task is None
    assert cluster_options_from_args(parser.parse_args(["--gpus-per-node", "0"])).gpus_per_node == 0
    shards = argparse.ArgumentParser()
    add_cluster_arguments(shards, time="1:00:00", job_name="x", training=False)
    assert cluster_options_from_args(shards.parse_args([])).gpus_per_node == 0  # the shard build is a CPU job


def test_executor_parameters_maps_every_knob():
    options = ClusterOptions(
        nodes=4, gpus_per_node=8, cpus_per_task=10, mem_gb=480, partition="gpu", account="bio", qos="high",
        constraint="a100|h100", time="1-00:00:00", job_name="nad", signal_delay_s=180, max_timeouts=5,
        exclusive=True, setup=["module load cuda"], additional={"mail-type": "END"})
    assert executor_parameters(options) == {
        "name": "nad", "timeout_min": 1440, "nodes": 4, "tasks_per_node": 8, "gpus_per_node": 8,
        "cpus_per_task": 10, "mem_gb": 480, "slurm_partition": "gpu", "slurm_account": "bio", "slurm_qos": "high",
        "slurm_constraint": "a100|h100", "slurm_signal_delay_s": 180, "slurm_exclusive": True,
        "slurm_setup": ["module load cuda"], "local_setup": ["module load cuda"],
        "slurm_additional_parameters": {"mail-type": "END"},
        "slurm_srun_args": ["--kill-on-bad-exit=1", "--cpus-per-task", "10"],
    }
    # Unset knobs are left to the cluster; a CPU job asks for no GPUs at all. One failing task
    # always ends the others.
    assert executor_parameters(ClusterOptions(time="10")) == {
        "name": "promoter-dist", "timeout_min": 10, "nodes": 1, "tasks_per_node": 1, "slurm_signal_delay_s": 120,
        "slurm_srun_args": ["--kill-on-bad-exit=1"]}


@pytest.mark.parametrize("field, option", [
    ("job_name", "--job-name"), ("partition", "--partition"), ("account", "--account"), ("qos", "--qos"),
    ("constraint", "--constraint"), ("time", "--time"),
])
@pytest.mark.parametrize("char, name", [("\n", "newline"), ("\r", "carriage return"), ("\0", "NUL"),
                                        ("\t", "tab"), ("\x7f", "DEL"), ("\x01", "U+0001")])
def test_control_characters_are_refused_naming_the_option(field, option, char, name):
    value = f"ab{char}cd" if field != "time" else f"10{char}"
    with pytest.raises(UserError) as info:
        ClusterOptions(**{field: value})
    message = str(info.value)
    assert message.startswith(f"{option}: ") and f"control character ({name}) at position 3" in message
    assert "\n" not in message  # one line: the value is shown escaped


def test_control_characters_in_setup_and_slurm_params_are_refused():
    with pytest.raises(UserError, match=r"^--setup: .*\(newline\) at position 12"):
        ClusterOptions(setup=["module load", "module load\nrm -rf x"])
    with pytest.raises(UserError, match=r"^--setup: .*\(carriage return\)"):
        ClusterOptions(setup=["export A=1\r"])
    with pytest.raises(UserError, match=r"^--slurm-param mail-user: .*\(newline\)"):
        ClusterOptions(additional={"mail-user": "me@x\nrm -rf x"})
    with pytest.raises(UserError, match=r"^--slurm-param: 'mail\\ntype' holds .*\(newline\)"):
        ClusterOptions(additional={"mail\ntype": "END"})
    # A tab is plain shell whitespace inside a setup line the user writes.
    assert ClusterOptions(setup=["export\tA=1"]).setup == ["export\tA=1"]


def test_refuse_control_characters_accepts_clean_text():
    refuse_control_characters("gpu,a100|h100 name-with spaces/and:colons", "--x")
    refuse_control_characters("caf\u00e9 \u2014 unicode is fine", "--x")
