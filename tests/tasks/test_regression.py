"""Expression regression: NAD's label map, label noise, the per-head loss, metrics and predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from promoter_dist.config import load_config
from promoter_dist.tasks import build_task
from promoter_dist.tasks.regression import RegressionTask, nad_label_map, nad_label_unmap

TINY = ["data.glove=", "model.nad.channels=[8,8,16,16,16]", "model.nad.fpn_dim=16", "model.nad.heads=2",
        "model.nad.head_dim=8", "model.nad.depths=[1,1,1,1]"]


def task(*overrides: str) -> RegressionTask:
    built = build_task(load_config(overrides=[*TINY, *overrides]))
    assert isinstance(built, RegressionTask)
    return built


# --------------------------------------------------------------------------- label map


def test_label_map_fixed_points():
    y = torch.tensor([0.0, 4.0, 8.0, 11.0, 17.0])
    t = nad_label_map(y)
    assert t.tolist() == pytest.approx([0.0, (5 + 1.5 - 5) / 12, 0.25, 0.5, 1.0], abs=1e-7)


def test_label_map_is_continuous_and_increasing_at_8():
    eps = torch.tensor([1e-3, 1e-5], dtype=torch.float64)
    below, above = nad_label_map(8 - eps), nad_label_map(8 + eps)
    assert torch.allclose(below, torch.full_like(below, 0.25), atol=1e-3)
    assert torch.allclose(above, torch.full_like(above, 0.25), atol=1e-3)
    assert (below < 0.25).all() and (above > 0.25).all()
    # slopes: 3/8/12 = 1/32 below 8, 1/12 above
    assert ((0.25 - below) / eps).tolist() == pytest.approx([1 / 32] * 2, rel=1e-6)
    assert ((above - 0.25) / eps).tolist() == pytest.approx([1 / 12] * 2, rel=1e-6)
    grid = torch.linspace(0, 17, 1001, dtype=torch.float64)
    assert (nad_label_map(grid).diff() > 0).all()


def test_label_unmap_round_trip():
    y = torch.linspace(0, 17, 341, dtype=torch.float64)
    assert torch.allclose(nad_label_unmap(nad_label_map(y)), y, atol=1e-12)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.allclose(nad_label_map(nad_label_unmap(t)), t, atol=1e-12)
    assert nad_label_unmap(torch.tensor([0.0, 0.25, 1.0])).tolist() == pytest.approx([0.0, 8.0, 17.0])


# --------------------------------------------------------------------------- targets and noise


def test_training_noise_has_std_0_05_and_is_clipped_to_unit_interval():
    regression = task()
    torch.manual_seed(0)
    middle = regression.target(torch.full((40_000,), 11.0), training=True)  # 0.5 on the target scale
    noise = middle - 0.5
    assert float(noise.std()) == pytest.approx(0.05, rel=0.03)
    assert abs(float(noise.mean())) < 0.002
    ends = regression.target(torch.cat([torch.zeros(5000), torch.full((5000,), 17.0)]), training=True)
    assert float(ends.min()) == 0.0 and float(ends.max()) == 1.0
    assert 0.4 < float((ends[:5000] == 0).float().mean()) < 0.6  # about half clipped at each end
    assert 0.4 < float((ends[5000:] == 1).float().mean()) < 0.6


def test_noise_differs_per_draw_and_follows_the_global_seed():
    regression = task()
    y = torch.full((16,), 11.0)
    torch.manual_seed(3)
    a, b = regression.target(y, True), regression.target(y, True)
    torch.manual_seed(3)
    assert torch.equal(regression.target(y, True), a)
    assert not torch.equal(a, b)


def test_no_noise_in_evaluation_or_when_off():
    y = torch.tensor([0.0, 3.0, 8.0, 12.5, 17.0])
    assert torch.equal(task().target(y, training=False), nad_label_map(y))
    assert torch.equal(task("task.label_noise=0").target(y, training=True), nad_label_map(y))
    assert torch.equal(task("task.label_map=none").target(y, training=False), y)


def test_no_label_map_adds_unclipped_noise_on_the_expression_scale():
    regression = task("task.label_map=none", "task.label_noise=0.5")
    torch.manual_seed(1)
    noisy = regression.target(torch.zeros(4000), training=True)
    assert float(noisy.min()) < -0.5 and float(noisy.std()) == pytest.approx(0.5, rel=0.06)
    assert torch.equal(regression.to_expression(torch.tensor([3.0])), torch.tensor([3.0]))


def test_noise_is_made_on_the_labels_device():
    """Labels on an accelerator get noise there (a CPU noise tensor cannot be added to them)."""
    y = torch.full((8,), 11.0, device="meta")
    assert task().target(y, training=True).device.type == "meta"
    assert task("task.label_map=none").target(y, training=True).device.type == "meta"


# --------------------------------------------------------------------------- loss


def test_smooth_l1_loss_is_the_mean_over_heads_with_beta():
    regression = task("task.smooth_l1_beta=0.1")
    heads = torch.tensor([[0.50, 0.55, 0.20, 0.90], [0.0, 1.0, 0.3, 0.3]])
    target = torch.tensor([0.5, 0.3])

    def smooth(d: float) -> float:
        d = abs(d)
        return 0.5 * d * d / 0.1 if d < 0.1 else d - 0.05

    expected = [np.mean([smooth(h - t) for h in row]) for row, t in zip(heads.tolist(), target.tolist())]
    got = regression.loss(heads, target)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(regression.loss(heads, target).mean()) == pytest.approx(float(
        F.smooth_l1_loss(heads, target[:, None].expand_as(heads), beta=0.1)), rel=1e-6)


def test_mse_loss_is_the_mean_over_heads():
    regression = task("task.loss=mse")
    heads = torch.tensor([[0.50, 0.55, 0.20, 0.90], [0.0, 1.0, 0.3, 0.3]])
    target = torch.tensor([0.5, 0.3])
    expected = ((heads - target[:, None]) ** 2).mean(dim=1)
    assert torch.allclose(regression.loss(heads, target), expected)
    assert not torch.allclose(task().loss(heads, target), expected)


def test_training_loss_uses_noisy_targets_but_evaluation_does_not():
    regression = task("task.loss=mse")
    model = regression.build_model().eval()
    batch = {"words": torch.randint(0, 1024, (6, 80)), "y": torch.tensor([0.0, 2.0, 8.0, 9.0, 15.0, 17.0]),
             "line": torch.arange(6)}
    with torch.no_grad():
        exact = regression.loss(regression.heads(model, batch), nad_label_map(batch["y"])).mean()
        torch.manual_seed(0)
        noisy = regression.training_loss(model, batch)
        out = regression.evaluate_batch(model, batch)
    assert float(out["loss"].mean()) == pytest.approx(float(exact), rel=1e-6)
    assert float(noisy) != pytest.approx(float(exact), rel=1e-6)
    assert torch.equal(out["y"], batch["y"]) and torch.equal(out["line"], batch["line"])


# --------------------------------------------------------------------------- metrics and predictions


def test_summarize_known_arrays():
    regression = task()
    y = np.array([1.0, 2.0, 3.0, 4.0, 5.0], dtype=np.float32)
    same = regression.summarize({"pred": 2 * y + 1, "y": y, "loss": np.array([0.1, 0.2, 0.3, 0.4, 0.5])})
    assert same["pearson"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0)
    assert same["loss"] == pytest.approx(0.3) and same["rows"] == 5.0
    reverse = regression.summarize({"pred": -y, "y": y, "loss": np.zeros(5)})
    assert reverse["pearson"] == pytest.approx(-1.0) and reverse["spearman"] == pytest.approx(-1.0)
    curved = regression.summarize({"pred": y.astype(np.float64) ** 4, "y": y, "loss": np.zeros(5)})
    assert curved["spearman"] == pytest.approx(1.0)
    assert curved["pearson"] == pytest.approx(float(np.corrcoef(y.astype(np.float64) ** 4, y)[0, 1]), rel=1e-9)
    assert curved["pearson"] < 0.95
    ties = regression.summarize({"pred": np.array([1.0, 1.0, 2.0, 3.0]), "y": np.array([1.0, 2.0, 3.0, 4.0]),
                                 "loss": np.zeros(4)})
    assert ties["spearman"] == pytest.approx(float(np.corrcoef([1.5, 1.5, 3, 4], [1, 2, 3, 4])[0, 1]))


@pytest.mark.parametrize("bias, expression", [(0.0, 0.0), (0.25, 8.0), (0.5, 11.0), (1.0, 17.0)])
def test_predict_with_nad_tiny_model_is_on_the_expression_scale(bias, expression):
    regression = task()
    model = regression.build_model().eval()
    with torch.no_grad():
        for encoder in model.encoders:
            encoder.head.weight.zero_()
            encoder.head.bias.fill_(bias)
    batch = {"words": torch.randint(0, 1024, (5, 80)), "y": torch.zeros(5), "line": torch.arange(5)}
    with torch.no_grad():
        pred = regression.predict(model, batch)
        out = regression.evaluate_batch(model, batch)
    assert pred.shape == (5,) and pred.dtype == torch.float32
    assert pred.tolist() == pytest.approx([expression] * 5, abs=1e-5)
    assert out["pred"].tolist() == pytest.approx([expression] * 5, abs=1e-5)


def test_predict_is_the_inverse_map_of_the_mean_head():
    regression = task()
    torch.manual_seed(5)
    model = regression.build_model().eval()
    batch = {"words": torch.randint(0, 1024, (7, 80))}
    with torch.no_grad():
        heads = model(batch["words"])
        pred = regression.predict(model, batch)
    assert heads.shape == (7, 4)
    assert torch.allclose(pred, nad_label_unmap(heads.mean(dim=1)), atol=1e-6)


def test_bert_all_frames_averages_the_three_frames_outputs(small_shards):
    """data.kmer_all_frames: the loader gives (B, 3, T) ids; the prediction is the mean of the model's
    outputs on the three frame sequences, each exactly what a one-frame batch of that frame gives."""
    from promoter_dist.data.loader import LoaderConfig, ShardLoader

    bert = ["model.name=bert", "model.bert.hidden=32", "model.bert.layers=1", "model.bert.heads=2",
            "model.bert.intermediate=64", "model.bert.dropout=0.0"]
    all_frames = task(*bert, "data.kmer_all_frames=true")
    torch.manual_seed(0)
    model = all_frames.build_model().eval()

    def first_batch(**options) -> dict[str, torch.Tensor]:
        config = LoaderConfig(split="val", tokens="kmer", batch_size=8, shuffle=False, drop_last=False, **options)
        return next(iter(ShardLoader(small_shards, config, rank=0, world_size=1)))

    batch = first_batch(kmer_all_frames=True)
    assert batch["input_ids"].ndim == 3 and batch["input_ids"].shape[:2] == (8, 3)
    with torch.no_grad():
        averaged = all_frames.heads(model, batch)
        per_frame = []
        for frame in (0, 1, 2):
            one = first_batch(kmer_frame=frame)
            assert torch.equal(one["line"], batch["line"])
            width = one["input_ids"].shape[1]
            assert torch.equal(one["input_ids"], batch["input_ids"][:, frame, :width])
            per_frame.append(task(*bert).heads(model, one))
    assert averaged.shape == (8, 1)
    torch.testing.assert_close(averaged, torch.stack(per_frame).mean(dim=0), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(per_frame[0], per_frame[1])  # the frames really differ
    assert torch.isfinite(all_frames.training_loss(model.train(), batch))
