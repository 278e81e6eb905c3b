"""A tiny real training run on generated images: MAP must improve, resume must continue exactly.

Images: the attribute ``colour`` is the background fill, ``mark`` the tone of a drawn square
(light or dark). Untrained features rank mostly by colour, so ``mark`` retrieval starts poor and
has to be learned. The model is AG-MAN on a randomly initialised MobileNetV2 at 48 px.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from agman_milvus.core.model import CheckpointError, build_model, load_checkpoint
from agman_milvus.core.runtime import native_bfloat16_cpu
from agman_milvus.training.datasets import TrainTransform, TripletDataset, collate_skipping
from agman_milvus.training.evaluate import embed_labels, evaluate_map
from agman_milvus.training.readers import Triplet
from agman_milvus.training.sampler import TripletSampler
from agman_milvus.training.sources import catalog_source
from agman_milvus.training.trainer import TrainConfig, Trainer
from tests.support.shapes import write_shapes_catalog


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_catalog(tmp_path_factory.mktemp("shapes"), 150, broken=True)


def _setup(catalog: Path, out: Path, epochs: int, cached: bool, triplets: int):
    source = catalog_source(catalog, ["colour", "mark"], min_count=2, seed=0,
                            test_fraction=0.0, valid_fraction=0.4)
    torch.manual_seed(0)
    model = build_model("agman", schema=source.schema, backbone="mobilenet_v2", image_size=48)
    config = TrainConfig(output_dir=out, epochs=epochs, triplets_per_epoch=triplets, batch_size=16,
                         lr=1e-3, seed=3, device="cpu", workers=0, eval_batch_size=64,
                         freeze_backbone=cached, cache_features=cached, threads=1)
    trainer = Trainer(model, config, TripletSampler(source.train, len(source.schema)),
                      source.train_table, valid=source.valid)
    return source, trainer


def test_a_catalog_source_folds_its_valid_images_into_training(catalog: Path) -> None:
    plain = catalog_source(catalog, ["colour", "mark"], min_count=2, test_fraction=0.2, valid_fraction=0.3)
    folded = catalog_source(catalog, ["colour", "mark"], min_count=2, test_fraction=0.2, valid_fraction=0.3,
                            fold_valid=True)
    assert folded.valid is None and folded.test == plain.test
    valid_images = {lab.image for lab in plain.valid.queries + plain.valid.candidates}
    added = folded.train[len(plain.train):]
    assert folded.train[:len(plain.train)] == plain.train
    assert {lab.image for lab in added} == valid_images
    assert len(added) > len(valid_images)  # every label of each, not only the one it was judged by


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.timeout(150)
def test_training_improves_map(catalog: Path, tmp_path: Path) -> None:
    # Frozen (random) trunk with cached maps: the fusion, classifier and heads learn.
    source, trainer = _setup(catalog, tmp_path, epochs=3, cached=True, triplets=320)
    records = trainer.fit()
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    start, best = records[0]["valid_map"], max(r["valid_map"] for r in records)
    assert best > start + 10.0, f"valid MAP did not improve enough: {start:.1f} -> {best:.1f}"
    assert records[1]["cls_loss"] is not None
    assert records[-1]["ranking_loss"] < records[1]["ranking_loss"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1, 2, 3]
    # The cache is exact: the best checkpoint, run on the images themselves, scores what the
    # cached validation recorded for it.
    best_model = load_checkpoint(tmp_path / "best.safetensors")
    rescored = evaluate_map(best_model, source.valid, source.valid_table).overall
    assert rescored == pytest.approx(trainer.best, abs=1e-3)


@pytest.mark.timeout(150)
def test_full_network_training_resumes_exactly(catalog: Path, tmp_path: Path) -> None:
    # Whole network, images decoded every step (DataLoader path); one broken JPEG is skipped.
    _, straight = _setup(catalog, tmp_path / "a", epochs=2, cached=False, triplets=48)
    records = straight.fit()
    assert all(np.isfinite(r["loss"]) for r in records[1:])
    _, first = _setup(catalog, tmp_path / "b", epochs=1, cached=False, triplets=48)
    first.fit()
    _, resumed = _setup(catalog, tmp_path / "b", epochs=2, cached=False, triplets=48)
    assert resumed.resume() == 1
    assert resumed.scheduler.last_epoch == 1
    resumed.fit()
    a = load_checkpoint(tmp_path / "a" / "last.safetensors").state_dict()
    b = load_checkpoint(tmp_path / "b" / "last.safetensors").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)
    epochs_b = [json.loads(x)["epoch"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert epochs_b == [0, 1, 2]


def test_undecodable_image_drops_its_triplet(catalog: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = catalog_source(catalog, ["colour", "mark"], min_count=2)
    broken = source.train_table.relative.index("images/broken.jpg")
    model = build_model("global", schema=source.schema, backbone="mobilenet_v2", image_size=48)
    dataset = TripletDataset([Triplet(0, 1, 2, 0), Triplet(broken, 1, 2, 0)], source.train_table,
                             TrainTransform(model.preprocess))
    fields, dropped = collate_skipping([dataset[0], dataset[1]])
    assert dropped == 1 and fields[0].shape == (1, 3, 48, 48)
    assert "broken.jpg" in caplog.text


def test_resume_without_state_and_cache_without_freeze_fail(catalog: Path, tmp_path: Path) -> None:
    _, trainer = _setup(catalog, tmp_path, epochs=0, cached=True, triplets=16)
    trainer.fit()  # epoch 0 only: validation, no last checkpoint yet
    with pytest.raises(CheckpointError, match="last.safetensors"):
        trainer.resume()
    source, _ = _setup(catalog, tmp_path / "x", epochs=0, cached=True, triplets=16)
    config = TrainConfig(output_dir=tmp_path / "y", cache_features=True, freeze_backbone=False)
    model = build_model("global", schema=source.schema, backbone="mobilenet_v2", image_size=48)
    with pytest.raises(ValueError, match="needs --freeze-backbone"):
        Trainer(model, config, TripletSampler(source.train, 2), source.train_table)


@pytest.mark.timeout(120)
def test_cli_train_then_eval(catalog: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from agman_milvus.app.cli import app

    runner = CliRunner()
    data = ["--catalog", str(catalog), "--attributes", "colour,mark", "--min-count", "2"]
    out, cache = tmp_path / "run", tmp_path / "cache.safetensors"

    def train(model: str, output: Path) -> None:
        result = runner.invoke(app, ["train", model, "-o", str(output), *data, "--recipe", "paper",
                                     "--backbone", "mobilenet_v2",
                                     "--random-init", "--image-size", "48", "--epochs", "1",
                                     "--triplets-per-epoch", "32", "--freeze-backbone", "--cache-features",
                                     "--cache-path", str(cache), "--seed", "1",
                                     "--workers", "0", "--threads", "1", "--device", "cpu"])
        assert result.exit_code == 0, result.output

    train("asen_v2", out)
    built = cache.stat().st_mtime_ns
    train("agman", tmp_path / "agman")  # same seed -> same trunk: the cache is reused, not rebuilt
    assert cache.stat().st_mtime_ns == built
    best = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]["best"]
    report = tmp_path / "valid.json"
    result = runner.invoke(app, ["eval", "--checkpoint", str(out / "best.safetensors"), *data,
                                 "--split", "valid", "--workers", "0", "-o", str(report)])
    assert result.exit_code == 0, result.output
    scores = json.loads(report.read_text())
    assert set(scores["per_attribute"]) == {"colour", "mark"}
    assert scores["overall_map"] == pytest.approx(best, abs=1e-3)
    assert scores["precision"] == "float32" and "overall" in result.output
    result = runner.invoke(app, ["eval", "--checkpoint", str(out / "best.safetensors"), *data,
                                 "--split", "valid", "--workers", "0", "--precision", "bfloat16",
                                 "-o", str(report)])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["precision"] == "bfloat16" and "(bfloat16)" in result.output
    result = runner.invoke(app, ["eval", "--checkpoint", str(out / "best.safetensors"), *data,
                                 "--split", "valid", "--workers", "0", "--precision", "auto",
                                 "-o", str(report)])
    assert result.exit_code == 0, result.output  # "auto" is recorded as what it computed in here
    assert json.loads(report.read_text())["precision"] == ("bfloat16" if native_bfloat16_cpu() else "float32")
    refused = runner.invoke(app, ["eval", "--checkpoint", str(out / "best.safetensors"), *data,
                                  "--precision", "float16"])
    assert refused.exit_code != 0 and "--precision is one of" in refused.output


def test_evaluation_embeds_in_the_precision_asked_for(catalog: Path) -> None:
    """``precision`` "bfloat16" computes the embeddings in bfloat16 (as the service may), close
    to float32's but not equal to them; the default stays float32 on CPU."""
    source = catalog_source(catalog, ["colour", "mark"], min_count=2, seed=0,
                            test_fraction=0.0, valid_fraction=0.4)
    torch.manual_seed(0)
    model = build_model("agman", schema=source.schema, backbone="mobilenet_v2", image_size=48)
    labels = source.valid.queries[:32]
    default, as_float32, as_bfloat16 = (
        embed_labels(model, labels, source.valid_table, workers=0, precision=p)[0]
        for p in (None, "float32", "bfloat16"))
    assert np.array_equal(default, as_float32)
    assert not np.array_equal(as_float32, as_bfloat16)
    assert np.abs(as_float32 - as_bfloat16).max() < 0.05


def test_no_cls_loss_switch(catalog: Path, tmp_path: Path) -> None:
    source = catalog_source(catalog, ["colour", "mark"], min_count=2, valid_fraction=0.4, test_fraction=0.0)
    model = build_model("agman", schema=source.schema, backbone="mobilenet_v2", image_size=48)
    config = TrainConfig(output_dir=tmp_path, epochs=1, triplets_per_epoch=32, cls_loss=False, workers=0,
                         freeze_backbone=True, cache_features=True, threads=1, device="cpu")
    trainer = Trainer(model, config, TripletSampler(source.train, 2), source.train_table, valid=source.valid)
    head_before = model.fc_embed.weight.detach().clone()
    record = trainer.fit()[-1]
    assert record["cls_loss"] is None and record["loss"] == pytest.approx(record["ranking_loss"])
    assert torch.equal(model.fc_embed.weight, head_before)  # the classifier gets no gradient
