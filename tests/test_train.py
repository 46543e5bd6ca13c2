import numpy as np
import pytest
import torch

from unet_pipeline.checkpoint import load_checkpoint
from unet_pipeline.model import UNetConfig
from unet_pipeline.train import SliceSet, TrainConfig, train, train_data_parallel, weighted_cross_entropy
from unet_pipeline.weights import weight_map

MODEL = UNetConfig(base_channels=4, depth=2)


@pytest.fixture(scope="module")
def slices(synthetic_stack):
    raw, labels = synthetic_stack
    weights = np.stack([weight_map(l) for l in labels])
    img = (raw.astype(np.float32) - raw.min()) / (raw.max() - raw.min())
    return SliceSet(img[:3], (labels[:3] > 0).astype(np.uint8), weights[:3]), \
        SliceSet(img[3:], (labels[3:] > 0).astype(np.uint8), weights[3:])


def _cfg(steps, **kw):
    kw = {"log_every": 1, "checkpoint_every": 2, **kw}
    return TrainConfig(steps=steps, tile_size=20, validate_every=3, device="cpu", **kw)


def test_weighted_cross_entropy_matches_definition():
    logits = torch.tensor([[[[2.0]], [[0.0]]]])  # class 0 favoured
    labels = torch.tensor([[[1]]])
    weights = torch.tensor([[[3.0]]])
    p1 = torch.softmax(logits, 1)[0, 1, 0, 0]
    assert weighted_cross_entropy(logits, labels, weights).item() == pytest.approx(-3 * torch.log(p1).item())


def test_resume_gives_identical_weights(slices, tmp_path):
    tr, va = slices
    train(MODEL, _cfg(6), tr, va, tmp_path / "straight", progress=False)
    train(MODEL, _cfg(6), tr, va, tmp_path / "split", progress=False, max_steps_now=3)
    assert load_checkpoint(tmp_path / "split" / "last.pt")["step"] == 3
    train(MODEL, _cfg(6), tr, va, tmp_path / "split", progress=False, resume=True)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "last.pt")
    assert b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    log = (tmp_path / "split" / "training_log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == [str(i) for i in range(1, 7)]


def test_changed_config_starts_a_new_run_instead_of_resuming(slices, tmp_path):
    tr, va = slices
    train(MODEL, _cfg(2), tr, None, tmp_path, progress=False)
    train(MODEL, _cfg(3, learning_rate=0.01), tr, None, tmp_path, progress=False, resume=True)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 3
    assert len((tmp_path / "training_log.csv").read_text().splitlines()) == 4


def test_resumed_log_is_whole_even_when_the_workflow_removed_the_outputs(slices, tmp_path):
    # Snakemake deletes a job's outputs (model.pt, training_log.csv) before rerunning it.
    tr, va = slices
    train(MODEL, _cfg(6), tr, va, tmp_path, progress=False, max_steps_now=3)
    (tmp_path / "training_log.csv").unlink()
    train(MODEL, _cfg(6), tr, va, tmp_path, progress=False, resume=True)
    log = (tmp_path / "training_log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == [str(i) for i in range(1, 7)]


def test_a_finished_run_is_trained_again_not_resumed_for_zero_steps(slices, tmp_path):
    tr, va = slices
    train(MODEL, _cfg(4), tr, va, tmp_path, progress=False)
    first = load_checkpoint(tmp_path / "model.pt")
    for output in ("model.pt", "training_log.csv"):
        (tmp_path / output).unlink()
    train(MODEL, _cfg(4), tr, va, tmp_path, progress=False, resume=True)
    log = (tmp_path / "training_log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == ["1", "2", "3", "4"]
    again = load_checkpoint(tmp_path / "model.pt")
    assert all(torch.equal(first["model"][k], again["model"][k]) for k in first["model"])  # same data, same run


def test_new_training_data_starts_a_new_run(slices, tmp_path):
    tr, va = slices
    train(MODEL, _cfg(6), tr, va, tmp_path, progress=False, max_steps_now=3)
    reweighted = SliceSet(tr.images, tr.labels, tr.weights * 2)
    train(MODEL, _cfg(6), reweighted, va, tmp_path, progress=False, resume=True, max_steps_now=1)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1


def test_training_is_deterministic_on_cpu(slices, tmp_path):
    tr, va = slices
    train(MODEL, _cfg(3), tr, None, tmp_path / "a", progress=False)
    train(MODEL, _cfg(3), tr, None, tmp_path / "b", progress=False)
    a = load_checkpoint(tmp_path / "a" / "model.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "model.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_model_pt_is_the_checkpoint_of_the_best_validation_step(slices, tmp_path, monkeypatch):
    from unet_pipeline import train as train_module

    tr, va = slices
    scripted = iter([0.5, 0.2, 0.4])  # validations at steps 2, 4, 6: the best is step 4, not the last

    def validate(*args):
        return {"val_loss": 1.0, "val_pixel_error": 0.1, "val_rand_error": next(scripted)}

    monkeypatch.setattr(train_module, "validate", validate)
    cfg = _cfg(6, checkpoint_every=2)
    best = train(MODEL, TrainConfig(**{**cfg.to_dict(), "validate_every": 2, "augment": cfg.augment}), tr, va,
                 tmp_path / "run", progress=False)
    chosen = load_checkpoint(best)
    assert chosen["step"] == 4 and chosen["best_val_rand_error"] == 0.2
    train(MODEL, _cfg(4, checkpoint_every=2), tr, None, tmp_path / "four", progress=False)  # the same first 4 steps
    at_four = load_checkpoint(tmp_path / "four" / "last.pt")["model"]
    assert all(torch.equal(chosen["model"][k], at_four[k]) for k in at_four)
    log = (tmp_path / "run" / "training_log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss") and len(log) == 7


def test_data_parallel_on_cpu_with_gloo(slices, tmp_path):
    tr, va = slices
    best = train_data_parallel(2, model_cfg=MODEL, cfg=_cfg(2), train_data=tr, val_data=None,
                               out_dir=tmp_path / "two", progress=False)
    train(MODEL, _cfg(2), tr, None, tmp_path / "one", progress=False)
    two, one = load_checkpoint(best), load_checkpoint(tmp_path / "one" / "model.pt")
    assert two["step"] == 2 and [row["step"] for row in two["log"]] == [1, 2]
    # Two processes average two tiles' gradients per step: not the single process's weights.
    assert any(not torch.equal(two["model"][k], one["model"][k]) for k in one["model"])


def test_loss_is_read_every_log_every_steps_as_the_mean_since_the_last_read(slices, tmp_path):
    tr, _ = slices
    train(MODEL, _cfg(7, log_every=3, checkpoint_every=100), tr, None, tmp_path / "sparse", progress=False)
    train(MODEL, _cfg(7, checkpoint_every=100), tr, None, tmp_path / "dense", progress=False)
    import csv

    def rows(name):
        with open(tmp_path / name / "training_log.csv") as fh:
            return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(fh)}

    sparse, dense = rows("sparse"), rows("dense")
    assert sorted(sparse) == [3, 6, 7]  # every 3 steps, and the last step
    assert sparse[3] == pytest.approx(np.mean([dense[s] for s in (1, 2, 3)]), rel=1e-5)
    assert sparse[7] == pytest.approx(dense[7], rel=1e-5)


def test_a_kill_during_the_final_validation_publishes_the_model_without_training_again(slices, tmp_path,
                                                                                        monkeypatch):
    from unet_pipeline import train as train_module

    tr, va = slices
    train(MODEL, _cfg(6), tr, va, tmp_path / "straight", progress=False)
    real_validate = train_module.validate

    def killed_at_the_last_step(model, data, *args):
        if killed_at_the_last_step.calls == 1:  # validations at steps 3 and 6: die in the second
            raise KeyboardInterrupt("kill -9 during the final validation")
        killed_at_the_last_step.calls += 1
        return real_validate(model, data, *args)

    killed_at_the_last_step.calls = 0
    monkeypatch.setattr(train_module, "validate", killed_at_the_last_step)
    with pytest.raises(KeyboardInterrupt):
        train(MODEL, _cfg(6), tr, va, tmp_path / "killed", progress=False)
    assert not (tmp_path / "killed" / "model.pt").exists()
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["step"] == 6
    monkeypatch.setattr(train_module, "validate", real_validate)
    steps = []
    monkeypatch.setattr(train_module, "sample_tiles", lambda *a: steps.append(1))
    train(MODEL, _cfg(6), tr, va, tmp_path / "killed", progress=False, resume=True)
    assert steps == []  # not one training step repeated
    a = load_checkpoint(tmp_path / "straight" / "model.pt")
    b = load_checkpoint(tmp_path / "killed" / "model.pt")
    assert a["step"] == b["step"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (tmp_path / "killed" / "training_log.csv").read_text().splitlines()[-1].split(",")[0] == "6"
    assert a["log"][-1]["val_rand_error"] == b["log"][-1]["val_rand_error"] != ""


def test_the_log_names_the_checkpoint_that_became_the_model(slices, tmp_path, caplog):
    tr, va = slices
    with caplog.at_level("INFO"):
        train(MODEL, _cfg(6), tr, va, tmp_path, progress=False)
    chosen = load_checkpoint(tmp_path / "model.pt")
    assert f"model.pt: the checkpoint of step {chosen['step']}, best validation Rand error" in caplog.text
    assert "training on cpu" in caplog.text
