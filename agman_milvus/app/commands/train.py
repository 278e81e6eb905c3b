"""``agman train`` and ``agman eval``: train any registered model the same way, and measure it."""

from __future__ import annotations

import json
from pathlib import Path

import typer

_DATA = "Data"
_RECIPE = "Recipe"
#: The models agman_milvus registers itself (named in the help without importing torch; a
#: test checks them against ``list_models()``).
BUILT_IN_MODELS = ("agman", "asen_v2", "global")


def _source(catalog: Path | None, attributes: str, min_count: int, split_seed: int,
            refdata: Path | None, images: Path | None, dataset: str | None, fold_valid: bool = False):
    from agman_milvus.training.sources import catalog_source, reference_source

    if (catalog is None) == (refdata is None):
        raise typer.BadParameter("give exactly one of --catalog or --refdata")
    if catalog is not None:
        names = [a.strip() for a in attributes.split(",") if a.strip()]
        if not names:
            raise typer.BadParameter("--attributes needs at least one column name")
        return catalog_source(catalog, names, min_count=min_count, seed=split_seed,
                              image_root=images, fold_valid=fold_valid)
    if fold_valid:
        raise typer.BadParameter("--fold-valid needs --catalog (a reference dataset's valid images have "
                                 "one label each)")
    if images is None:
        raise typer.BadParameter("--refdata needs --images (the dataset's image root)")
    return reference_source(refdata, images, dataset=dataset)


def _map_table(title: str, result, intervals: dict[str, list[float]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("attribute")
    table.add_column("queries", justify="right")
    table.add_column("MAP", justify="right")
    table.add_column("95% interval", justify="right")

    def interval(name: str) -> str:
        return "[{:.1f}, {:.1f}]".format(*intervals[name]) if name in intervals else ""

    for name, entry in result.to_json()["per_attribute"].items():
        table.add_row(name, str(entry["queries"]), f"{entry['map']:.2f}", interval(name))
    table.add_row("[b]overall[/b]", str(sum(result.queries.values())), f"[b]{result.overall:.2f}[/b]",
                  interval("overall"))
    Console().print(table)


#: options that only one recipe reads: giving one to the other recipe is an error, not a no-op
_RECIPE_ONLY = {
    "paper": ("triplets_per_epoch", "step_size", "gamma", "no_cls_loss", "freeze_backbone",
              "cache_features", "resume"),
    "product": ("high_lr", "tune_mid_blocks", "taps", "weight_decay", "proxy_scale", "value_weight"),
}


def _refuse_other_recipes_options(ctx: typer.Context, recipe: str) -> None:
    for other, names in _RECIPE_ONLY.items():
        given = [name for name in names if other != recipe
                 and ctx.get_parameter_source(name).name in ("COMMANDLINE", "ENVIRONMENT")]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            pronoun = "it" if len(given) == 1 else "them"
            raise typer.BadParameter(f"{flags}: only --recipe {other} uses {pronoun}")


def _check_precision(precision: str | None) -> None:
    """Refuse a ``--precision`` that is not a :data:`~agman_milvus.core.config.Precision`."""
    from typing import get_args

    from agman_milvus.core.config import Precision

    if precision is not None and precision not in get_args(Precision):
        raise typer.BadParameter(f"--precision is one of {', '.join(get_args(Precision))}")


def _product_trainer(net, source, options: dict):
    from agman_milvus.training.product import ProductConfig, ProductTrainer, tuned_mid_blocks

    tuned = options["tune_mid_blocks"]
    tuned = tuned_mid_blocks(options["backbone"]) if tuned is None else tuned
    chosen = {"value_weight": options["value_weight"]} if options["value_weight"] is not None else {}
    config = ProductConfig(
        output_dir=options["output"], epochs=options["epochs"], batch_size=options["batch_size"] or 64,
        lr=options["lr"] or 1e-3, high_lr=options["high_lr"], tuned_mid_blocks=tuned,
        weight_decay=options["weight_decay"],
        proxy_scale=options["proxy_scale"], margin=options["margin"], cache_path=options["cache_path"],
        seed=options["seed"], device=options["device"], workers=options["workers"],
        threads=options["threads"], precision=options["precision"], **chosen)
    if source.valid is not None and source.valid_table is not source.train_table:
        raise typer.BadParameter("the product recipe caches train and valid images in one image table")
    return ProductTrainer(net, config, source.train, source.train_table, valid=source.valid), config


def _paper_trainer(net, source, options: dict):
    from agman_milvus.training.sampler import TripletSampler
    from agman_milvus.training.trainer import TrainConfig, Trainer

    config = TrainConfig(
        output_dir=options["output"], epochs=options["epochs"],
        triplets_per_epoch=options["triplets_per_epoch"],
        batch_size=options["batch_size"] or 16, lr=options["lr"] or 1e-4, step_size=options["step_size"],
        gamma=options["gamma"], margin=options["margin"], cls_loss=not options["no_cls_loss"],
        freeze_backbone=options["freeze_backbone"], cache_features=options["cache_features"],
        cache_path=options["cache_path"], seed=options["seed"], device=options["device"],
        workers=options["workers"], threads=options["threads"], precision=options["precision"],
    )
    trainer = Trainer(net, config, TripletSampler(source.train, len(source.schema)),
                      source.train_table, valid=source.valid, valid_table=source.valid_table)
    if options["resume"]:
        trainer.resume()
    return trainer, config


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        ctx: typer.Context,
        model: str = typer.Argument(..., help=f"Model to train: {', '.join(BUILT_IN_MODELS)} (or one "
                                    "registered with register_model)"),
        output: Path = typer.Option(..., "--output", "-o", help="Run directory (checkpoints, metrics.jsonl)"),
        catalog: Path | None = typer.Option(None, help="Catalog CSV (file, id, one column per attribute)",
                                            rich_help_panel=_DATA),
        attributes: str = typer.Option("articleType,baseColour,gender,usage,season,subCategory",
                                       help="Catalog attribute columns, comma separated",
                                       rich_help_panel=_DATA),
        min_count: int = typer.Option(10, help="Drop catalog values with fewer images",
                                      rich_help_panel=_DATA),
        split_seed: int = typer.Option(0, help="Seed of the catalog split rule", rich_help_panel=_DATA),
        fold_valid: bool = typer.Option(False, help="Train on the catalog's valid images too (all their "
                                        "labels); no validation, the last epoch is kept",
                                        rich_help_panel=_DATA),
        refdata: Path | None = typer.Option(None, help="Reference dataset dir (ASEN layout)",
                                            rich_help_panel=_DATA),
        images: Path | None = typer.Option(None, help="Image root (default: the catalog's folder)",
                                           rich_help_panel=_DATA),
        dataset: str | None = typer.Option(None, help="meta.json section (default: refdata dir name)",
                                           rich_help_panel=_DATA),
        recipe: str = typer.Option("product", help="product (default: late taps, cached frozen mid maps, "
                                   "fine-tuned high stage, value-proxy + triplet loss) or paper (spec §3)"),
        backbone: str | None = typer.Option(None, help="resnet50, mobilenet_v2 or efficientnet_lite0/1/2 "
                                            "(default: efficientnet_lite0 for --recipe product, resnet50 "
                                            "for paper)"),
        pretrained: bool = typer.Option(True, "--pretrained/--random-init",
                                        help="ImageNet weights for the backbone"),
        image_size: int = typer.Option(224, min=32, help="Square input size"),
        epochs: int | None = typer.Option(None, min=0, help="Default: 6 (product), 150 (paper)",
                                          rich_help_panel=_RECIPE),
        triplets_per_epoch: int = typer.Option(100_000, min=1, help="paper: triplets re-sampled each epoch",
                                               rich_help_panel=_RECIPE),
        batch_size: int | None = typer.Option(None, min=1, help="Images per step (product, default 64) or "
                                              "triplets per step (paper, default 16)",
                                              rich_help_panel=_RECIPE),
        lr: float | None = typer.Option(None, help="Head lr (default: 1e-3 product, 1e-4 paper)",
                                        rich_help_panel=_RECIPE),
        high_lr: float = typer.Option(3e-4, help="product: lr of the fine-tuned high stage",
                                      rich_help_panel=_RECIPE),
        tune_mid_blocks: int | None = typer.Option(
            None, min=0, rich_help_panel=_RECIPE,
            help="product: also fine-tune the mid level's last N blocks (at the high stage's lr; cached: "
                 "the maps before them; default: 3 on efficientnet_lite0, else 0)"),
        taps: str | None = typer.Option(
            None, rich_help_panel=_RECIPE,
            help="product: the trunk's tap points, late or late_fine (late plus the stride-8 stage's map "
                 "in AG-MAN's multi-level fusion; agman only); default: late_fine for agman on "
                 "efficientnet_lite0, else late"),
        weight_decay: float = typer.Option(1e-4, help="product: AdamW weight decay", rich_help_panel=_RECIPE),
        proxy_scale: float = typer.Option(16.0, help="product: scale of the value-proxy cosine logits",
                                          rich_help_panel=_RECIPE),
        value_weight: float | None = typer.Option(
            None, min=0.0, max=1.0, rich_help_panel=_RECIPE,
            help="product: how much of the value posterior each retrieval vector blends in (0 = the raw "
                 "attribute embedding; default: the recipe's)"),
        step_size: int = typer.Option(3, min=1, help="paper: StepLR epochs", rich_help_panel=_RECIPE),
        gamma: float = typer.Option(0.9, help="paper: StepLR factor", rich_help_panel=_RECIPE),
        margin: float = typer.Option(0.2, rich_help_panel=_RECIPE),
        no_cls_loss: bool = typer.Option(False, "--no-cls-loss",
                                         help="paper: ranking loss only (Zappos setting)",
                                         rich_help_panel=_RECIPE),
        freeze_backbone: bool = typer.Option(False, "--freeze-backbone", help="paper: train the heads only",
                                             rich_help_panel=_RECIPE),
        cache_features: bool = typer.Option(False, "--cache-features",
                                            help="paper, with --freeze-backbone: compute trunk maps once "
                                            "(exact, faster)",
                                            rich_help_panel=_RECIPE),
        cache_path: Path | None = typer.Option(None, help="Reuse/save the feature cache here",
                                               rich_help_panel=_RECIPE),
        seed: int = typer.Option(1, rich_help_panel=_RECIPE),
        device: str = typer.Option("auto", help="auto, cpu or cuda"),
        workers: int = typer.Option(2, min=0, help="Decode workers: DataLoader processes for "
                                    "training batches, threads for evaluation and the feature cache"),
        threads: int | None = typer.Option(None, min=1, help="torch CPU threads"),
        precision: str | None = typer.Option(None, help="What the feature cache and the training steps "
                                             "compute in: float32, bfloat16, or auto (bfloat16 on CUDA "
                                             "and on CPUs that compute it natively); default float32 on "
                                             "CPU, auto on CUDA"),
        resume: bool = typer.Option(False, "--resume", help="paper: continue from OUTPUT/last.safetensors"),
    ) -> None:
        """Train MODEL with the product recipe (default) or the paper's triplet recipe (either the
        same for every model)."""
        import torch
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from agman_milvus.core.model import build_model, list_models
        from agman_milvus.core.model.backbones import LATE_TAPS
        from agman_milvus.core.runtime import resolve_device
        from agman_milvus.training.evaluate import computed_precision
        from agman_milvus.training.product import PRODUCT_BACKBONE, product_taps
        from agman_milvus.training.trainer import Callbacks

        if model not in list_models():
            raise typer.BadParameter(f"unknown model {model!r}; choose from {', '.join(list_models())}")
        if recipe not in ("product", "paper"):
            raise typer.BadParameter(f"unknown recipe {recipe!r}; use product or paper")
        product = recipe == "product"
        _refuse_other_recipes_options(ctx, recipe)
        _check_precision(precision)
        precision = computed_precision(resolve_device(device), precision)  # recorded as computed
        source = _source(catalog, attributes, min_count, split_seed, refdata, images, dataset, fold_valid)
        if not source.train:
            raise typer.BadParameter("the data source has no training labels")
        backbone = backbone or (PRODUCT_BACKBONE if product else "resnet50")
        epochs = epochs if epochs is not None else (6 if product else 150)
        torch.manual_seed(seed)  # the heads' random init is part of the seeded run
        taps = (taps or product_taps(model, backbone)) if product else "paper"
        if product and taps not in LATE_TAPS:
            raise typer.BadParameter(f"--taps is {' or '.join(LATE_TAPS)}, not {taps!r}")
        try:
            net = build_model(model, schema=source.schema, backbone=backbone, taps=taps,
                              pretrained="imagenet" if pretrained else None, image_size=image_size)
        except ValueError as exc:  # e.g. a fine level for a model that reads none
            raise typer.BadParameter(str(exc)) from None
        trainer, config = (_product_trainer if product else _paper_trainer)(net, source, locals())
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text(json.dumps(
            {"model": model, "backbone": backbone, "pretrained": pretrained, "image_size": image_size,
             "taps": taps, "fold_valid": fold_valid, **config.to_json()}, indent=1))
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), TextColumn("{task.fields[info]}")) as progress:
            task = progress.add_task("", total=1, info="")

            def epoch_start(epoch: int, steps: int) -> None:
                title = f"epoch {epoch}/{epochs}" if epoch else "caching frozen maps"
                progress.reset(task, total=steps, description=title, info="")

            def step(info) -> None:
                progress.update(task, completed=info.step, info=f"loss {info.loss:.4f}")

            def cached(images: int) -> None:
                progress.advance(task, images)

            def epoch_end(record: dict) -> None:
                score = record.get("score")
                per_attribute = record.get("valid_per_attribute") or {}
                progress.console.print(
                    f"epoch {record['epoch']}: loss {record['loss']:.4f}"
                    + (f", valid MAP {score:.2f} (best {record['best']:.2f})" if score is not None else "")
                    + ("".join(f", {k} {v:.1f}" for k, v in per_attribute.items()) if product else ""))

            trainer.fit(Callbacks(on_step=step, on_epoch_start=epoch_start, on_epoch_end=epoch_end,
                                  on_eval=cached if product else None))
        typer.echo(f"best checkpoint: {trainer.best_path} (valid score {trainer.best})")

    @app.command("eval")
    def evaluate(
        checkpoint: Path | None = typer.Option(None, help="Checkpoint (.safetensors) to evaluate"),
        imagenet_floor: str | None = typer.Option(None, help="Instead: untrained ImageNet BACKBONE, pooled"),
        linear_probe: str | None = typer.Option(None, help="Instead: frozen ImageNet BACKBONE, pooled, plus "
                                                "one linear classifier per attribute trained on the train "
                                                "split"),
        image_size: int = typer.Option(224, min=32, help="Input size for --imagenet-floor / --linear-probe"),
        catalog: Path | None = typer.Option(None, rich_help_panel=_DATA),
        attributes: str = typer.Option("articleType,baseColour,gender,usage,season,subCategory",
                                       rich_help_panel=_DATA),
        min_count: int = typer.Option(10, rich_help_panel=_DATA),
        split_seed: int = typer.Option(0, rich_help_panel=_DATA),
        refdata: Path | None = typer.Option(None, rich_help_panel=_DATA),
        images: Path | None = typer.Option(None, rich_help_panel=_DATA),
        dataset: str | None = typer.Option(None, rich_help_panel=_DATA),
        split: str = typer.Option("test", help="valid or test"),
        fold_valid: bool = typer.Option(False, help="With --linear-probe: the probe learns from the "
                                        "catalog's valid images too, as `agman train --fold-valid` does",
                                        rich_help_panel=_DATA),
        zappos: Path | None = typer.Option(None, help="CSN Zappos dir: TR accuracy on its triplet lists"),
        zappos_triplets: int = typer.Option(160_000, help="Zappos triplets (CSN: 160k test, 80k val)"),
        output: Path | None = typer.Option(None, "--output", "-o", help="Write the result as JSON"),
        batch_size: int = typer.Option(64, min=1),
        workers: int = typer.Option(2, min=0, help="Threads decoding images ahead of the model"),
        device: str = typer.Option("auto"),
        threads: int | None = typer.Option(None, min=1),
        precision: str | None = typer.Option(None, help="float32, bfloat16, or auto: as the service "
                                             "embeds (AGMAN_PRECISION: bfloat16 on CUDA and on CPUs "
                                             "that compute it natively); default float32 on CPU, "
                                             "auto on CUDA"),
        value_weight: float | None = typer.Option(
            None, min=0.0, max=1.0,
            help="With --checkpoint of the product recipe: rank with this blend of the value posterior "
                 "instead of the checkpoint's own (0 = the raw attribute embedding, 1 = the posterior "
                 "alone)"),
    ) -> None:
        """MAP per attribute and overall with 95% bootstrap intervals over queries (or TR accuracy
        for Zappos triplets)."""
        import torch

        from agman_milvus.core.model import load_checkpoint
        from agman_milvus.core.runtime import resolve_device
        from agman_milvus.training.datasets import ImageTable
        from agman_milvus.training.evaluate import computed_precision, evaluate_map, evaluate_triplets
        from agman_milvus.training.floor import PooledImageNetFeatures
        from agman_milvus.training.zappos import read_zappos_filenames, read_zappos_triplets

        if threads:
            torch.set_num_threads(threads)
        _check_precision(precision)
        on = resolve_device(device)
        computed = computed_precision(on, precision)  # what "auto" (or no option) is here
        if sum(x is not None for x in (checkpoint, imagenet_floor, linear_probe)) != 1:
            raise typer.BadParameter("give exactly one of --checkpoint, --imagenet-floor or --linear-probe")
        if value_weight is not None and (checkpoint is None or zappos is not None):
            raise typer.BadParameter("--value-weight is for --checkpoint on a catalog or reference split")
        if fold_valid and linear_probe is None:
            raise typer.BadParameter("--fold-valid is for --linear-probe (a checkpoint was trained "
                                     "already: `agman train --fold-valid`)")
        if zappos is not None:
            if checkpoint is None:
                raise typer.BadParameter("--zappos needs --checkpoint")
            net = load_checkpoint(checkpoint).to(on)
            table = ImageTable(images or zappos, read_zappos_filenames(zappos / "filenames.json"))
            triplets = read_zappos_triplets(zappos / "tripletlists", split if split != "valid" else "val",
                                            zappos_triplets)
            accuracy = evaluate_triplets(net, triplets, table, batch_size=batch_size, precision=computed)
            result_json: dict = {"tr_accuracy": accuracy, "triplets": len(triplets), "precision": computed}
            typer.echo(f"TR accuracy: {accuracy:.2f}% over {len(triplets)} triplets")
        else:
            if fold_valid and split == "valid":
                raise typer.BadParameter("--fold-valid trains on the valid split: evaluate on --split test")
            source = _source(catalog, attributes, min_count, split_seed, refdata, images, dataset, fold_valid)
            if checkpoint is not None:
                net = load_checkpoint(checkpoint)
                name = str(checkpoint)
                if value_weight is not None:
                    if net.value_head is None:
                        raise typer.BadParameter("--value-weight needs a checkpoint with a value head "
                                                 "(the product recipe's)")
                    net.value_head.set_weight(value_weight)
                    name += f" at value weight {value_weight:g}"
            elif linear_probe is not None:
                from agman_milvus.training.probe import train_linear_probe

                net = train_linear_probe(source.schema, source.train, source.train_table,
                                         backbone=linear_probe, image_size=image_size, workers=workers)
                name = f"linear probe on ImageNet {linear_probe}"
            else:
                net = PooledImageNetFeatures(source.schema, imagenet_floor or "", image_size)
                name = f"untrained ImageNet {imagenet_floor}"
            net = net.to(on)
            retrieval, table = source.split(split)
            result = evaluate_map(net, retrieval, table, batch_size=batch_size, workers=workers,
                                  precision=computed)
            intervals = result.intervals()
            _map_table(f"{name} — {split} MAP ({computed})", result, intervals)
            result_json = {"model": name, "split": split, "precision": computed, **result.to_json(),
                           "ci95": intervals}
            if linear_probe is not None:
                result_json["probe_training_labels"] = len(source.train)
            if value_weight is not None:
                result_json["value_weight"] = value_weight
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(result_json, indent=1))
