"""Hostile GloVe vector files and pretrained BERT folders, through the real loaders and training.

A pickle payload (which would create a marker file when unpickled) under each name a vector file
takes goes through ``load_vectors`` and through a real single-process training run
(``promoter_dist.train.main``) that points ``data.glove`` at it; a pretrained folder whose weights are
only a pickled ``pytorch_model.bin`` goes through fine-tuning's model build and ``load_exported``.
Nothing may run, nothing may hang, and the one-line message names the file. The opt-in
(``data.trust_pickled_vectors``) loads a user's own gensim ``.kv``.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from promoter_dist.config import load_config
from promoter_dist.data.glove import load_vectors
from promoter_dist.data.nad_words import VOCABULARY
from promoter_dist.errors import ConfigError, UserError
from promoter_dist.models.bert import build_mlm_model, build_regression_model
from promoter_dist.tasks.bert_io import export_pretrained, load_exported
from promoter_dist.tasks.regression import RegressionTask
from promoter_dist.train import main as train_main
from tests.conftest import REPO
from tests.security.payloads import MarkerPayload, plain_pickle_payload, torch_payload

pytestmark = pytest.mark.timeout(300)

NAD_DEBUG = REPO / "configs" / "nad" / "debug.yaml"
BERT_FINETUNE = REPO / "configs" / "bert" / "finetune_debug.yaml"
VECTOR_NAMES = ["vectors.kv", "vectors.txt", "vectors.npy"]
QUIET = ["run.plots=false", "engine.tensorboard=false", "engine.csv=false"]


def one_line_naming(message: str, *names: str) -> None:
    """``message`` is one line that names every one of ``names``."""
    assert "\n" not in message.strip(), message
    assert all(name in message for name in names), (names, message)


def nad_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(NAD_DEBUG), f"run.out_dir={out}", f"data.shards={shards}", "data.batch_size=16",
            "model.nad.channels=[8,8,16,16,16]", "model.nad.fpn_dim=16", "model.nad.heads=2",
            "model.nad.head_dim=8", "run.max_steps=2", *QUIET, *extra]


def train(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """(exit status, the one error line) of a real training run in this process."""
    status = train_main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return status, errors[0]


# --------------------------------------------------------------------------- vector files


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_a_pickle_vector_file_is_refused(tmp_path, name):
    marker = tmp_path / "ran"
    path = plain_pickle_payload(tmp_path / name, marker)
    with pytest.raises(UserError) as info:
        load_vectors(path)
    one_line_naming(str(info.value), str(path), "pickle", "promoter-dist glove", "data.trust_pickled_vectors")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["protocol 0 pickle", "torch.save zip"])
def test_other_pickled_vector_files_are_refused(tmp_path, kind):
    marker = tmp_path / "ran"
    if kind == "protocol 0 pickle":  # text-like, without the 0x80 marker of later protocols
        path = tmp_path / "vectors.txt"
        path.write_bytes(pickle.dumps(MarkerPayload(marker), protocol=0))
    else:
        path = torch_payload(tmp_path / "vectors.npy", marker)
    with pytest.raises(UserError) as info:
        load_vectors(path)
    one_line_naming(str(info.value), str(path))
    assert not marker.exists()


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_training_refuses_a_pickle_vector_file(lone_process_group, small_shards, tmp_path, capsys, name):
    marker = tmp_path / "ran"
    path = plain_pickle_payload(tmp_path / name, marker)
    status, error = train(nad_args(small_shards, tmp_path / "run", f"data.glove={path}"), capsys)
    assert status == 2
    one_line_naming(error, str(path), "pickle")
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def gensim_kv(path: Path, vectors: np.ndarray) -> Path:
    """A real gensim ``KeyedVectors.save`` file of every 5-mer (the format earlier versions wrote)."""
    from gensim.models import KeyedVectors

    kv = KeyedVectors(vector_size=vectors.shape[1], count=0, dtype=np.float32)
    kv.add_vectors(list(VOCABULARY), vectors)
    with open(path, "wb") as handle:
        kv.save(handle)
    return path


def test_the_opt_in_loads_a_users_own_gensim_kv(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(len(VOCABULARY), 128)).astype(np.float32)
    path = gensim_kv(tmp_path / "vectors.kv", vectors)
    base = [f"data.glove={path}", "model.nad.channels=[8,8,16,16,16]", "model.nad.fpn_dim=16",
            "model.nad.heads=2", "model.nad.head_dim=8"]
    with pytest.raises(UserError) as info:
        RegressionTask(load_config(NAD_DEBUG, base)).build_model()
    one_line_naming(str(info.value), str(path), "data.trust_pickled_vectors=true")
    model = RegressionTask(load_config(NAD_DEBUG, [*base, "data.trust_pickled_vectors=true"])).build_model()
    np.testing.assert_array_equal(model.embedding.numpy(), vectors)  # word-id order is VOCABULARY's


def test_nad_published_text_vectors_still_train_the_embedding():
    config = load_config(NAD_DEBUG, [f"data.glove={REPO / 'data' / 'dream2022' / 'nad_glove' / 'vectors.txt'}",
                                     "model.nad.channels=[8,8,16,16,16]", "model.nad.fpn_dim=16",
                                     "model.nad.heads=2", "model.nad.head_dim=8"])
    model = RegressionTask(config).build_model()
    assert tuple(model.embedding.shape) == (1024, 128) and model.embedding.abs().sum() > 0


# --------------------------------------------------------------------------- pretrained folders


def finetune_config(folder: Path, out: Path | None = None):
    overrides = [f"model.bert.pretrained={folder}", *QUIET]
    if out is not None:
        overrides.append(f"run.out_dir={out}")
    return load_config(BERT_FINETUNE, overrides)


def real_export(folder: Path) -> Path:
    """A masked-LM export of the size the fine-tuning config expects (safetensors, tokenizer.json)."""
    config = finetune_config(folder)
    settings = dataclasses.replace(config.model.bert, pretrained="")
    torch.manual_seed(0)
    export_pretrained(build_mlm_model(settings), folder, frame=0, flank_bp=config.data.kmer_flank_bp)
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    return folder


def pickled_export(folder: Path, marker: Path, payload) -> Path:
    """A real export whose weights were replaced by a pickle payload in ``pytorch_model.bin``."""
    real_export(folder)
    (folder / "model.safetensors").unlink()
    payload(folder / "pytorch_model.bin", marker)
    return folder / "pytorch_model.bin"


@pytest.mark.parametrize("payload", [torch_payload, plain_pickle_payload], ids=["torch_zip", "plain_pickle"])
def test_fine_tuning_refuses_a_folder_with_only_pickled_weights(tmp_path, payload):
    marker = tmp_path / "ran"
    weights = pickled_export(tmp_path / "export", marker, payload)
    with pytest.raises(ConfigError) as info:
        RegressionTask(finetune_config(tmp_path / "export")).build_model()
    one_line_naming(str(info.value), "model.bert.pretrained=", str(weights), "pickled")
    with pytest.raises(UserError) as info:
        load_exported(tmp_path / "export", "mlm")
    one_line_naming(str(info.value), str(weights), "pickled")
    assert not marker.exists()


def test_training_refuses_a_folder_with_only_pickled_weights(lone_process_group, small_shards, tmp_path, capsys):
    marker = tmp_path / "ran"
    weights = pickled_export(tmp_path / "export", marker, torch_payload)
    args = ["--config", str(BERT_FINETUNE), f"run.out_dir={tmp_path / 'run'}", f"data.shards={small_shards}",
            f"model.bert.pretrained={tmp_path / 'export'}", *QUIET]
    status, error = train(args, capsys)
    assert status == 2
    one_line_naming(error, str(weights), "pickled")
    assert not marker.exists()


def test_pickles_beside_safetensors_are_never_read(tmp_path):
    folder = real_export(tmp_path / "export")
    marker = tmp_path / "ran"
    for name in ("pytorch_model.bin", "vocab.pkl", "tokenizer.pkl", "training_args.bin"):
        torch_payload(folder / name, marker)
    model = RegressionTask(finetune_config(folder)).build_model()
    tokenizer, exported = load_exported(folder, "mlm")
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, exported.bert.embeddings.word_embeddings.weight)
    assert tokenizer("ACG")["input_ids"][0] == tokenizer.cls_token_id
    assert not marker.exists()


def test_a_config_naming_pickled_weights_is_refused(tmp_path):
    folder = real_export(tmp_path / "export")
    marker = tmp_path / "ran"
    torch_payload(folder / "adapter_model.bin", marker)  # the one non-safetensors name transformers accepts there
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    with pytest.raises(ConfigError) as info:
        RegressionTask(finetune_config(folder)).build_model()
    one_line_naming(str(info.value), str(folder / "config.json"), "adapter_model.bin")
    with pytest.raises(UserError) as info:
        load_exported(folder, "mlm")
    one_line_naming(str(info.value), str(folder / "config.json"), "adapter_model.bin")
    assert not marker.exists()


def test_remote_code_named_by_a_config_is_not_run(tmp_path):
    folder = real_export(tmp_path / "export")
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    config = json.loads((folder / "config.json").read_text())
    hostile = {**config, "model_type": "evil-bert",
               "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForMaskedLM": "evil.EvilModel"}}
    (folder / "config.json").write_text(json.dumps(hostile))
    with pytest.raises(ConfigError) as info:  # refused, without asking on the terminal
        build_regression_model(finetune_config(folder).model.bert)
    one_line_naming(str(info.value), "model.bert.pretrained=", "custom code")
    with pytest.raises(UserError) as info:
        load_exported(folder, "mlm")
    one_line_naming(str(info.value), str(folder / "config.json"), "custom code")
    assert not marker.exists()
