"""Hostile checkpoint files and rank-local failures, through the real commands.

One real 2-rank DeepSpeed run (ZeRO-2, tiny NAD) on shards whose validation split fits in one block,
so one rank has no validation rows at all. Copies of its run folder then get a pickle payload (which
would create a marker file when unpickled) in each kind of checkpoint file, and go through `predict`,
`export` and a resume under the `deepspeed` launcher on 2 ranks: nothing may run, nothing may hang, and
the one-line message names the file (and, on 2 ranks, the rank that found it).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from promoter_dist.cli import main
from tests.conftest import DEMO_TRAIN, REPO, TEST_LABELLED
from tests.distributed.launch import deepspeed_launcher, free_port
from tests.security.payloads import plain_pickle_payload, torch_payload

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TRAIN = REPO / "train.py"
FAIL_WITHIN_S = 120  # start-up (15-30 s here) plus the failure; a hang would reach engine.timeout_s


def tiny_args(shards: Path, out: Path) -> list[str]:
    return ["--config", str(REPO / "configs" / "nad" / "debug.yaml"), f"run.out_dir={out}", f"data.shards={shards}",
            "data.glove=", "data.batch_size=16", "model.nad.channels=[8,8,16,16,16]", "model.nad.fpn_dim=16",
            "model.nad.heads=2", "model.nad.head_dim=8", "run.log_every=2", "run.checkpoint_every=2",
            "run.max_steps=4", "engine.zero_stage=2", "run.plots=false", "engine.tensorboard=false",
            "engine.csv=false", "engine.timeout_s=300"]


def launch(args: list[str], timeout: float = 600) -> tuple[int, str, float]:
    """``deepspeed --num_gpus 2 train.py ARGS``: (exit status, stdout + stderr, seconds)."""
    command = [str(deepspeed_launcher()), "--num_gpus", "2", "--master_port", str(free_port()), str(TRAIN), *args]
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_clean_env())
    return done.returncode, done.stdout + done.stderr, time.monotonic() - start


def _clean_env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONWARNINGS"] = "ignore"
    return env


@pytest.fixture(scope="module")
def one_block_val_shards(tmp_path_factory) -> Path:
    """Real rows; the validation split (3%, about 190 rows) is a single block: one rank reads it all."""
    from promoter_dist.data.shards import ShardOptions, build_shards, load_manifest

    out = tmp_path_factory.mktemp("one_block_val")
    build_shards(DEMO_TRAIN, out, ShardOptions(splits=(("train", 0.97), ("val", 0.03)), rows_per_block=256,
                                               blocks_per_shard=4), workers=1, progress=False)
    val_blocks = [b for s in load_manifest(out)["splits"]["val"]["shards"] for b in s["blocks"]]
    assert len(val_blocks) == 1
    return out


@pytest.fixture(scope="module")
def trained(one_block_val_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    status, output, _ = launch(tiny_args(one_block_val_shards, out))
    assert status == 0, output[-4000:]
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def latest_dir(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def one_line_naming(message: str, *names: str) -> None:
    lines = [line for line in message.strip().splitlines() if "error" in line]
    assert lines, message[-3000:]
    assert any(all(name in line for name in names) for line in lines), (names, message[-3000:])


# --------------------------------------------------------------------------- validation on one rank only


def test_a_rank_without_validation_rows_is_normal(trained, one_block_val_shards):
    import json

    from promoter_dist.data.shards import load_manifest

    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"]
    expected = load_manifest(one_block_val_shards)["splits"]["val"]["rows_nad"]  # NAD reads the 110-bp rows
    assert val and all(r["rows"] == expected for r in val)  # every row, from the one rank that holds them
    assert (trained / "checkpoints" / "best.json").is_file()


# --------------------------------------------------------------------------- predict and export


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                    "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
@pytest.mark.parametrize("command", ["predict", "export"])
def test_a_pickle_payload_in_a_checkpoint_file_is_refused(trained, tmp_path, capsys, victim, command):
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "ran"
    torch_payload(latest_dir(run) / victim, marker)
    args = ["--checkpoint", str(run), "--which", "latest"]
    if command == "predict":
        args += ["--input", str(TEST_LABELLED), "--out", str(tmp_path / "sub.json"), "--no-progress"]
    else:
        args += ["--out", str(tmp_path / "model.safetensors")]
    assert main([command, *args]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    one_line_naming(err, victim, "refused")
    assert not (tmp_path / "sub.json").exists() and not (tmp_path / "model.safetensors").exists()


def test_a_payload_inside_a_dict_is_refused_too(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "ran"
    state_file = latest_dir(run) / "mp_rank_00_model_states.pt"
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    torch_payload(state_file, marker, wrap=lambda payload: {**state, "extra": payload})
    assert main(["export", "--checkpoint", str(run), "--which", "latest", "--out", str(tmp_path / "m.st")]) == 2
    assert not marker.exists()
    one_line_naming(capsys.readouterr().err, "mp_rank_00_model_states.pt")


def test_a_bare_pickle_as_a_checkpoint_file_is_refused(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "ran"
    plain_pickle_payload(latest_dir(run) / "mp_rank_00_model_states.pt", marker)
    assert main(["export", "--checkpoint", str(run), "--which", "latest", "--out", str(tmp_path / "m.st")]) == 2
    assert not marker.exists()
    one_line_naming(capsys.readouterr().err, "mp_rank_00_model_states.pt")


def test_a_users_own_legacy_file_loads_with_the_explicit_opt_in(trained, tmp_path, capsys):
    """A checkpoint holding a type outside the allow-list (here argparse.Namespace) needs --trust-pickle."""
    run = copy_run(trained, tmp_path)
    state_file = latest_dir(run) / "mp_rank_00_model_states.pt"
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    torch.save({**state, "args": argparse.Namespace(lr=1e-3)}, state_file)
    out = tmp_path / "m.safetensors"
    assert main(["export", "--checkpoint", str(run), "--which", "latest", "--out", str(out)]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(run), "--which", "latest", "--out", str(out), "--trust-pickle"]) == 0
    assert out.is_file()


def test_a_pickle_named_like_an_export_is_not_read_as_one(tmp_path, capsys):
    marker = tmp_path / "ran"
    fake = plain_pickle_payload(tmp_path / "model.safetensors", marker)
    assert main(["predict", "--checkpoint", str(fake), "--input", str(TEST_LABELLED), "--out",
                 str(tmp_path / "sub.json"), "--no-progress"]) == 2
    assert not marker.exists()
    one_line_naming(capsys.readouterr().err, "model.safetensors", "not a safetensors model file")


# --------------------------------------------------------------------------- resume on 2 ranks


@pytest.mark.parametrize("case", ["rank_file_payload", "optim_payload", "missing_rank_file"])
def test_resume_on_two_ranks_ends_every_rank_with_the_reason(trained, one_block_val_shards, tmp_path, case):
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "ran"
    tag_dir = latest_dir(run)
    # Every rank checks every file of the checkpoint before DeepSpeed loads it: rank 0 finds a bad file first.
    if case == "rank_file_payload":
        victim, rank, why = "trainer-rank1.pt", 0, "refused"
        torch_payload(tag_dir / victim, marker, wrap=lambda payload: {"loader": payload, "rng": {}})
    elif case == "optim_payload":
        victim, rank, why = "zero_pp_rank_1_mp_rank_00_optim_states.pt", 0, "refused"
        torch_payload(tag_dir / victim, marker)
    else:
        victim, rank, why = "trainer-rank1.pt", 1, "missing"  # only rank 1 needs its own state
        (tag_dir / victim).unlink()
    args = tiny_args(one_block_val_shards, run)
    args[args.index("run.max_steps=4")] = "run.max_steps=6"
    status, output, seconds = launch(args, timeout=FAIL_WITHIN_S + 60)
    assert status != 0 and not marker.exists()
    assert seconds < FAIL_WITHIN_S, seconds
    # Every rank ends with the same line, naming the rank that found the problem and the file.
    reasons = [line for line in output.splitlines()
               if f"error: rank {rank}:" in line and victim in line and why in line]
    assert len(reasons) == 2, output[-4000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == tag_dir.name  # nothing was saved


# --------------------------------------------------------------------------- a corrupt block on one rank


def test_a_corrupt_block_read_by_one_rank_ends_both_ranks_with_its_name(one_block_val_shards, tmp_path):
    """A flipped byte in one training block: the rank that reads it finds the checksum mismatch, and
    both ranks stop promptly with the same line naming that rank, the shard and the block."""
    import json

    shards = tmp_path / "shards"
    shutil.copytree(one_block_val_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][0]
    offset, nbytes = shard["blocks"][1][0], shard["blocks"][1][1]
    with open(shards / shard["file"], "r+b") as handle:
        handle.seek(offset + nbytes // 2)
        byte = handle.read(1)
        handle.seek(offset + nbytes // 2)
        handle.write(bytes([byte[0] ^ 0x40]))
    status, output, seconds = launch(tiny_args(shards, tmp_path / "run"), timeout=FAIL_WITHIN_S + 60)
    assert status != 0 and seconds < FAIL_WITHIN_S, (seconds, output[-3000:])
    reasons = [line for line in output.splitlines() if "error: rank " in line and shard["file"] in line]
    assert len(reasons) == 2 and reasons[0] == reasons[1], output[-4000:]
    assert "block 1" in reasons[0], reasons[0]
