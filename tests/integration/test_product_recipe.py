"""The product training recipe (issue #12) on tiny generated images: it trains, saves a checkpoint
the serving path loads into the same network, and the paper's recipe stays available."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agman_milvus.core.model import build_model, load_checkpoint, read_checkpoint_config
from agman_milvus.services.embedding import Embedder
from agman_milvus.training.evaluate import evaluate_map
from agman_milvus.training.feature_cache import cached_trunk
from agman_milvus.training.product import ProductConfig, ProductTrainer
from agman_milvus.training.sources import catalog_source
from agman_milvus.training.trainer import Callbacks
from tests.support.shapes import write_shapes_catalog


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """90 images: a coloured background (``colour``) with a light or dark square (``mark``)."""
    return write_shapes_catalog(tmp_path_factory.mktemp("shapes"), 90)


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _source(catalog: Path):
    return catalog_source(catalog, ["colour", "mark"], min_count=2, seed=0, test_fraction=0.0,
                          valid_fraction=0.4)


@pytest.mark.parametrize("name", ["agman", "asen_v2", "global"])
def test_product_recipe_trains_saves_and_loads_the_same_network(catalog: Path, tmp_path: Path,
                                                                name: str) -> None:
    source = _source(catalog)
    torch.manual_seed(0)
    model = build_model(name, schema=source.schema, backbone="mobilenet_v2", taps="late",
                        pretrained="imagenet", image_size=64)
    assert not model.has_classifier and model.trunk.mid_channels == 96
    frozen = {k: v.clone() for k, v in model.trunk.state_dict().items() if k.startswith("features.0.")}
    tuned = {k: v.clone() for k, v in model.trunk.state_dict().items() if k.startswith("features.18.")}
    config = ProductConfig(output_dir=tmp_path, epochs=2, batch_size=16, device="cpu", workers=0, threads=1)
    trainer = ProductTrainer(model, config, source.train, source.train_table, valid=source.valid)
    records = trainer.fit()
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and 0 <= r["valid_map"] <= 100 for r in records)
    assert set(records[-1]["valid_per_attribute"]) == {"colour", "mark"}
    state = model.trunk.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # mid stage frozen
    assert not all(torch.equal(state[k], v) for k, v in tuned.items())  # high stage fine-tuned

    config_json = read_checkpoint_config(tmp_path / "last.safetensors")
    assert config_json["taps"] == "late" and config_json["extra"]["recipe"] == "product"
    loaded = load_checkpoint(tmp_path / "last.safetensors")
    photos = [Image.open(source.train_table.path(i)).convert("RGB") for i in range(6)]
    images = torch.stack([model.preprocess(photo) for photo in photos])
    model.eval()
    with torch.no_grad():
        expected = model.embed_all(images)
        assert torch.equal(loaded.embed_all(images), expected)
    served = Embedder(checkpoint=tmp_path / "last.safetensors", device="cpu",  # serving path, exact
                      precision="float32").encode(photos)
    np.testing.assert_allclose(served.embeddings, expected.numpy(), atol=1e-5)
    assert served.descriptors.shape == (6, loaded.descriptor_dim)
    # the validation MAP from cached float16 mid maps is the MAP of the network on the images
    result = evaluate_map(loaded, source.valid, source.train_table, workers=0)
    assert result.overall == pytest.approx(trainer.validate().overall, abs=0.5)


@pytest.mark.parametrize("taps", ["late", "late_fine"])
def test_product_recipe_fine_tunes_the_mid_levels_last_blocks_on_request(catalog: Path, tmp_path: Path,
                                                                          taps: str) -> None:
    """With ``late_fine`` the stride-8 maps are cached beside the frozen mid maps, and the cached
    network is the served one."""
    source = _source(catalog)
    torch.manual_seed(0)
    model = build_model("agman", schema=source.schema, backbone="mobilenet_v2", taps=taps,
                        pretrained="imagenet", image_size=64)

    def trunk_part(prefix: str) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in model.trunk.state_dict().items() if k.startswith(prefix)}

    before_tail, tail = trunk_part("features.10."), trunk_part("features.13.")
    config = ProductConfig(output_dir=tmp_path, epochs=1, batch_size=16, device="cpu", workers=0, threads=1,
                           tuned_mid_blocks=3)
    trainer = ProductTrainer(model, config, source.train, source.train_table, valid=source.valid)
    trainer.fit()
    assert trainer.cache is not None and trainer.cache.mid.shape[1] == 64  # the maps before the tail
    if taps == "late_fine":
        assert trainer.cache.fine is not None and trainer.cache.fine.shape[1:] == (32, 8, 8)
    else:
        assert trainer.cache.fine is None
    state = model.trunk.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before_tail.items())
    assert not all(torch.equal(state[k], v) for k, v in tail.items())
    loaded = load_checkpoint(tmp_path / "last.safetensors")
    assert loaded.trunk.taps == taps
    images = sorted({lab.image for lab in source.valid.queries})[:4]
    photos = torch.stack([loaded.preprocess(Image.open(source.train_table.path(i)).convert("RGB"))
                          for i in images])
    rows = torch.tensor([trainer.cache.row(i) for i in images])
    with torch.no_grad(), cached_trunk(model.eval(), trainer.cache):
        from_cache = model.embed_all(rows)
    with torch.no_grad():
        # float16 cache: ~4e-6 apart; a missing fine level moved them 2e-3
        assert torch.allclose(from_cache, loaded.embed_all(photos), atol=1e-4)
    result = evaluate_map(loaded, source.valid, source.train_table, workers=0)
    assert result.overall == pytest.approx(trainer.validate().overall, abs=0.5)


def test_a_cache_with_the_fine_level_serves_models_without_it(catalog: Path, tmp_path: Path) -> None:
    """AG-MAN with ``late_fine`` taps and ASEN_v2 with ``late`` share one cache file (as
    bench/quality.sh trains them); a cache without fine maps is rebuilt for AG-MAN's fine level."""
    source = _source(catalog)
    caches = {}
    for run, (name, taps) in enumerate([("agman", "late_fine"), ("asen_v2", "late"), ("agman", "late"),
                                        ("agman", "late_fine")]):
        model = build_model(name, schema=source.schema, backbone="mobilenet_v2", taps=taps,
                            pretrained="imagenet", image_size=64)
        config = ProductConfig(output_dir=tmp_path / str(run), epochs=0, device="cpu", workers=0, threads=1,
                               cache_path=tmp_path / "cache.safetensors")
        trainer = ProductTrainer(model, config, source.train, source.train_table, valid=source.valid)
        built: list[int] = []
        trainer.fit(Callbacks(on_epoch_start=lambda epoch, n, built=built: built.append(n)))
        caches[run] = (bool(built), trainer.cache)
    assert caches[0][0] and caches[0][1].fine is not None
    assert not caches[1][0] and caches[1][1].fine is None  # read, its fine maps left unread
    assert torch.equal(caches[1][1].mid, caches[0][1].mid)
    assert not caches[2][0]
    assert not caches[3][0] and torch.equal(caches[3][1].fine, caches[0][1].fine)
    model = build_model("asen_v2", schema=source.schema, backbone="mobilenet_v2", taps="late",
                        pretrained="imagenet", image_size=64)
    config = ProductConfig(output_dir=tmp_path / "plain", epochs=0, device="cpu", workers=0, threads=1,
                           cache_path=tmp_path / "plain.safetensors")
    ProductTrainer(model, config, source.train, source.train_table, valid=source.valid).fit()
    model = build_model("agman", schema=source.schema, backbone="mobilenet_v2", taps="late_fine",
                        pretrained="imagenet", image_size=64)
    config.output_dir = tmp_path / "fine"
    trainer = ProductTrainer(model, config, source.train, source.train_table, valid=source.valid)
    built = []
    trainer.fit(Callbacks(on_epoch_start=lambda epoch, n: built.append(n)))
    assert built and trainer.cache.fine is not None  # a cache without fine maps cannot serve it


def test_product_recipe_trains_in_bfloat16_on_request(catalog: Path, tmp_path: Path) -> None:
    """``precision`` "bfloat16" builds the feature cache and runs the training steps under
    bfloat16 autocast, on CPU too: the same seed trains other weights than float32 (the CPU's
    default), and a working model; a cache built in one precision is not reused in the other."""
    source = _source(catalog)
    tuned: dict[str, dict[str, torch.Tensor]] = {}
    mids: dict[str, torch.Tensor] = {}
    for precision in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = build_model("agman", schema=source.schema, backbone="mobilenet_v2", taps="late",
                            pretrained="imagenet", image_size=64)
        config = ProductConfig(output_dir=tmp_path / precision, epochs=2, batch_size=16, device="cpu",
                               workers=0, threads=1, precision=precision, cache_path=tmp_path / "cache")
        trainer = ProductTrainer(model, config, source.train, source.train_table, valid=source.valid)
        record = trainer.fit()[-1]
        assert np.isfinite(record["loss"]) and record["valid_map"] > 50
        tuned[precision] = {k: v for k, v in model.trunk.state_dict().items() if k.startswith("features.18.")}
        mids[precision] = trainer.cache.mid
    assert mids["bfloat16"].dtype == torch.float16 and not torch.equal(mids["float32"], mids["bfloat16"])
    exact, rounded = mids["float32"].float(), mids["bfloat16"].float()  # the same trunk's maps
    assert float((exact - rounded).abs().mean()) < 0.25 * float(exact.abs().mean())
    assert not all(torch.equal(tuned["float32"][k], v) for k, v in tuned["bfloat16"].items())
    weights = {v.dtype for v in tuned["bfloat16"].values() if v.is_floating_point()}
    assert weights == {torch.float32}
    built: list[int] = []  # a run in the same precision reads the saved cache back, not rebuilding it
    fresh = build_model("agman", schema=source.schema, backbone="mobilenet_v2", taps="late",
                        pretrained="imagenet", image_size=64)
    again = ProductTrainer(fresh, replace(config, epochs=0), source.train, source.train_table,
                           valid=source.valid)
    again.fit(Callbacks(on_epoch_start=lambda epoch, n: built.append(n)))
    assert built == [] and torch.equal(again.cache.mid, mids["bfloat16"])


def test_product_recipe_learns_the_attributes(catalog: Path, tmp_path: Path) -> None:
    source = _source(catalog)
    torch.manual_seed(0)
    model = build_model("agman", schema=source.schema, backbone="mobilenet_v2", taps="late",
                        pretrained="imagenet", image_size=64)
    trainer = ProductTrainer(model, ProductConfig(output_dir=tmp_path, epochs=0, device="cpu", workers=0),
                             source.train, source.train_table, valid=source.valid)
    trainer.fit()
    before = trainer.validate().overall
    trainer.config.epochs = 4
    trainer.config.batch_size = 16
    after = trainer.fit()[-1]["valid_map"]
    assert after > before + 5 and after > 85


def test_cli_trains_product_by_default_and_paper_on_request(catalog: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from agman_milvus.app.cli import app

    runner = CliRunner()
    data = ["--catalog", str(catalog), "--attributes", "colour,mark", "--min-count", "2"]
    common = [*data, "--image-size", "48", "--epochs", "1", "--seed", "1",
              "--workers", "0", "--threads", "1", "--device", "cpu"]
    result = runner.invoke(app, ["train", "agman", "-o", str(tmp_path / "product"), *common,
                                 "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    assert "valid MAP" in result.output and ", mark " in result.output  # per-attribute valid MAP
    product = read_checkpoint_config(tmp_path / "product" / "best.safetensors")
    assert (product["taps"], product["backbone"]) == ("late_fine", "efficientnet_lite0")
    # AG-MAN's fusion reads Lite0's stride-8 level, and the recipe fine-tunes its mid level's last
    # 3 blocks; other trunks neither unless asked; the steps compute in float32 on CPU unless asked
    product_json = json.loads((tmp_path / "product" / "config.json").read_text())
    assert (product_json["tuned_mid_blocks"], product_json["precision"]) == (3, "float32")
    result = runner.invoke(app, ["train", "agman", "-o", str(tmp_path / "mnv2"), *common,
                                 "--batch-size", "16", "--backbone", "mobilenet_v2", "--random-init",
                                 "--epochs", "1", "--fold-valid"])
    assert result.exit_code == 0, result.output
    assert "valid MAP" not in result.output  # the valid images are training images now
    mnv2 = json.loads((tmp_path / "mnv2" / "config.json").read_text())
    assert mnv2["tuned_mid_blocks"] == 0 and mnv2["fold_valid"] is True and mnv2["taps"] == "late"
    assert read_checkpoint_config(tmp_path / "mnv2" / "best.safetensors")["taps"] == "late"
    refused = runner.invoke(app, ["train", "asen_v2", "-o", str(tmp_path / "asen"), *common,
                                  "--taps", "late_fine"])
    assert refused.exit_code == 2 and "asen_v2 reads no fine level" in refused.output
    refused = runner.invoke(app, ["train", "agman", "-o", str(tmp_path / "asen"), *common, "--taps", "paper"])
    assert refused.exit_code == 2 and "--taps is late or late_fine" in refused.output
    assert (tmp_path / "mnv2" / "best.safetensors").exists()  # the last epoch
    refused = runner.invoke(app, ["train", "agman", "-o", str(tmp_path / "f16"), *common,
                                  "--precision", "float16"])
    assert refused.exit_code == 2 and "--precision is one of" in refused.output
    if not torch.cuda.is_available():  # a typed error: one line, no traceback
        refused = runner.invoke(app, ["train", "agman", "-o", str(tmp_path / "gpu"), *common,
                                      "--device", "cuda"])
        assert refused.exit_code == 2 and "error: device 'cuda' was asked for" in refused.output
    refused = runner.invoke(app, ["train", "agman", "-o", str(tmp_path / "ref"), "--refdata", str(tmp_path),
                                  "--images", str(tmp_path), "--fold-valid"])
    assert refused.exit_code == 2 and "--fold-valid needs --catalog" in refused.output
    result = runner.invoke(app, ["train", "agman", "-o", str(tmp_path / "paper"), *common,
                                 "--recipe", "paper", "--backbone", "mobilenet_v2", "--random-init",
                                 "--triplets-per-epoch", "16",
                                 "--freeze-backbone", "--cache-features", "--precision", "bfloat16"])
    assert result.exit_code == 0, result.output
    paper = read_checkpoint_config(tmp_path / "paper" / "best.safetensors")
    assert paper["taps"] == "paper"
    paper_json = json.loads((tmp_path / "paper" / "config.json").read_text())
    assert (paper_json["lr"], paper_json["precision"]) == (1e-4, "bfloat16")
    assert load_checkpoint(tmp_path / "paper" / "best.safetensors").has_classifier
    # an option of the other recipe is refused, not silently ignored
    refused = runner.invoke(app, ["train", "agman", "-o", str(tmp_path / "mixed"), *common,
                                  "--freeze-backbone", "--step-size", "2"])
    assert refused.exit_code == 2 and "--step-size, --freeze-backbone: only --recipe paper" in refused.output
    refused = runner.invoke(app, ["train", "agman", "-o", str(tmp_path / "mixed"), *common,
                                  "--recipe", "paper", "--proxy-scale", "4"])
    assert refused.exit_code == 2 and "--proxy-scale: only --recipe product uses it" in refused.output
    assert not (tmp_path / "mixed").exists()


def test_eval_ranks_a_checkpoint_at_another_value_weight(catalog: Path, tmp_path: Path) -> None:
    """`agman eval --value-weight W` ranks with that blend of the value posterior, as the
    checkpoint would with W built in; the checkpoint's own weight gives its own result."""
    from typer.testing import CliRunner

    from agman_milvus.app.cli import app
    from agman_milvus.core.model import save_checkpoint

    runner = CliRunner()
    data = ["--catalog", str(catalog), "--attributes", "colour,mark", "--min-count", "2"]
    trained = runner.invoke(app, ["train", "global", "-o", str(tmp_path / "run"), *data, "--image-size", "48",
                                  "--epochs", "1", "--batch-size", "16", "--backbone", "mobilenet_v2",
                                  "--random-init", "--workers", "0", "--threads", "1", "--device", "cpu"])
    assert trained.exit_code == 0, trained.output
    checkpoint = tmp_path / "run" / "best.safetensors"
    net = load_checkpoint(checkpoint)
    own = net.value_head.config()["weight"]
    evaluate = [*data, "--split", "test", "--workers", "0", "--threads", "1",
                "--checkpoint", str(checkpoint)]
    reports = {}
    for weight in (None, own, 0.3):
        out = tmp_path / f"{weight}.json"
        option = [] if weight is None else ["--value-weight", str(weight)]
        result = runner.invoke(app, ["eval", *evaluate, *option, "-o", str(out)])
        assert result.exit_code == 0, result.output
        reports[weight] = json.loads(out.read_text())
    assert "value_weight" not in reports[None] and reports[0.3]["value_weight"] == 0.3
    assert reports[own]["per_attribute"] == reports[None]["per_attribute"]
    net.value_head.set_weight(0.3)
    retrieval, table = catalog_source(catalog, ["colour", "mark"], min_count=2, seed=0).split("test")
    blended = evaluate_map(net, retrieval, table, workers=0, precision="float32").to_json()
    maps = {name: [report["per_attribute"][a]["map"] for a in ("colour", "mark")]
            for name, report in (("option", reports[0.3]), ("built in", blended))}
    assert maps["option"] == pytest.approx(maps["built in"])
    # a checkpoint without a value head (the paper's recipe), or no checkpoint, is refused
    net.value_head = None
    save_checkpoint(net, tmp_path / "bare.safetensors")
    refused = runner.invoke(app, ["eval", *evaluate[:-1], str(tmp_path / "bare.safetensors"),
                                  "--value-weight", "0.5"])
    assert refused.exit_code == 2 and "needs a checkpoint with a value head" in refused.output
    refused = runner.invoke(app, ["eval", *data, "--imagenet-floor", "mobilenet_v2", "--value-weight", "0.5"])
    assert refused.exit_code == 2 and "--value-weight is for --checkpoint" in refused.output


def test_eval_linear_probe_reports_intervals(catalog: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from agman_milvus.app.cli import app

    data = ["--catalog", str(catalog), "--attributes", "colour,mark", "--min-count", "2", "--split", "test",
            "--image-size", "64", "--workers", "0", "--threads", "1"]
    reports = {}
    for option in ("--linear-probe", "--imagenet-floor"):
        out = tmp_path / f"{option}.json"
        result = CliRunner().invoke(app, ["eval", option, "mobilenet_v2", *data, "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert "95% interval" in result.output
        reports[option] = json.loads(out.read_text())
    probe = reports["--linear-probe"]
    assert set(probe["ci95"]) == {"colour", "mark", "overall"}
    for name, (low, high) in probe["ci95"].items():
        value = probe["overall_map"] if name == "overall" else probe["per_attribute"][name]["map"]
        assert low <= value <= high
    # supervised on the attributes, the probe ranks far better than generic ImageNet similarity
    assert probe["overall_map"] > reports["--imagenet-floor"]["overall_map"] + 10
    # as `agman train --fold-valid`, the probe can learn from the valid images too
    out = tmp_path / "folded.json"
    result = CliRunner().invoke(app, ["eval", "--linear-probe", "mobilenet_v2", *data, "--fold-valid",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    folded = json.loads(out.read_text())
    assert folded["probe_training_labels"] > probe["probe_training_labels"] > 0
    assert folded["per_attribute"].keys() == probe["per_attribute"].keys()  # the same test split
    refused = CliRunner().invoke(app, ["eval", "--linear-probe", "mobilenet_v2", *data[:6], "--split",
                                       "valid", "--fold-valid"])
    assert refused.exit_code == 2 and "--fold-valid trains on the valid split" in refused.output
    refused = CliRunner().invoke(app, ["eval", "--imagenet-floor", "mobilenet_v2", *data, "--fold-valid"])
    assert refused.exit_code == 2 and "--fold-valid is for --linear-probe" in refused.output
