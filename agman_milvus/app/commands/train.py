"""``agman train`` and ``agman eval``: train any registered model the same way, and measure it."""

from __future__ import annotations

import json
from pathlib import Path

import typer

_DATA = "Data"
_RECIPE = "Recipe"


def _source(catalog: Path | None, attributes: str, min_count: int, split_seed: int,
            refdata: Path | None, images: Path | None, dataset: str | None):
    from agman_milvus.training.sources import catalog_source, reference_source

    if (catalog is None) == (refdata is None):
        raise typer.BadParameter("give exactly one of --catalog or --refdata")
    if catalog is not None:
        names = [a.strip() for a in attributes.split(",") if a.strip()]
        if not names:
            raise typer.BadParameter("--attributes needs at least one column name")
        return catalog_source(catalog, names, min_count=min_count, seed=split_seed,
                              image_root=images)
    if images is None:
        raise typer.BadParameter("--refdata needs --images (the dataset's image root)")
    return reference_source(refdata, images, dataset=dataset)


def _map_table(title: str, result) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("attribute")
    table.add_column("queries", justify="right")
    table.add_column("MAP", justify="right")
    for name, entry in result.to_json()["per_attribute"].items():
        table.add_row(name, str(entry["queries"]), f"{entry['map']:.2f}")
    table.add_row("[b]overall[/b]", str(sum(result.queries.values())), f"[b]{result.overall:.2f}[/b]")
    Console().print(table)


def register(app: typer.Typer) -> None:
    from agman_milvus.core.model import list_models

    models = list_models()

    @app.command("train")
    def train(
        model: str = typer.Argument(..., help=f"Model to train: {', '.join(models)}"),
        output: Path = typer.Option(..., "--output", "-o", help="Run directory (checkpoints, metrics.jsonl)"),
        catalog: Path | None = typer.Option(None, help="Catalog CSV (file,id,<attribute columns>)", rich_help_panel=_DATA),
        attributes: str = typer.Option("articleType,baseColour,gender,usage,season,subCategory",
                                       help="Catalog attribute columns, comma separated", rich_help_panel=_DATA),
        min_count: int = typer.Option(10, help="Drop catalog values with fewer images", rich_help_panel=_DATA),
        split_seed: int = typer.Option(0, help="Seed of the catalog split rule", rich_help_panel=_DATA),
        refdata: Path | None = typer.Option(None, help="Reference dataset dir (ASEN layout)", rich_help_panel=_DATA),
        images: Path | None = typer.Option(None, help="Image root (default: the catalog's folder)", rich_help_panel=_DATA),
        dataset: str | None = typer.Option(None, help="meta.json section (default: refdata dir name)", rich_help_panel=_DATA),
        backbone: str = typer.Option("resnet50", help="resnet50 or mobilenet_v2"),
        pretrained: bool = typer.Option(True, "--pretrained/--random-init", help="ImageNet weights for the backbone"),
        image_size: int = typer.Option(224, min=32, help="Square input size"),
        epochs: int = typer.Option(150, min=0, rich_help_panel=_RECIPE),
        triplets_per_epoch: int = typer.Option(100_000, min=1, help="Triplets re-sampled each epoch", rich_help_panel=_RECIPE),
        batch_size: int = typer.Option(16, min=1, help="Triplets per step", rich_help_panel=_RECIPE),
        lr: float = typer.Option(1e-4, rich_help_panel=_RECIPE),
        step_size: int = typer.Option(3, min=1, help="StepLR epochs", rich_help_panel=_RECIPE),
        gamma: float = typer.Option(0.9, help="StepLR factor", rich_help_panel=_RECIPE),
        margin: float = typer.Option(0.2, rich_help_panel=_RECIPE),
        no_cls_loss: bool = typer.Option(False, "--no-cls-loss", help="Ranking loss only (Zappos setting)", rich_help_panel=_RECIPE),
        freeze_backbone: bool = typer.Option(False, "--freeze-backbone", help="Train the heads only", rich_help_panel=_RECIPE),
        cache_features: bool = typer.Option(False, "--cache-features",
                                            help="With --freeze-backbone: compute trunk maps once (exact, faster)",
                                            rich_help_panel=_RECIPE),
        cache_path: Path | None = typer.Option(None, help="Reuse/save the feature cache here", rich_help_panel=_RECIPE),
        seed: int = typer.Option(1, rich_help_panel=_RECIPE),
        device: str = typer.Option("auto", help="auto, cpu or cuda"),
        workers: int = typer.Option(2, min=0, help="Decode workers: DataLoader processes for "
                                    "training batches, threads for evaluation and the feature cache"),
        threads: int | None = typer.Option(None, min=1, help="torch CPU threads"),
        resume: bool = typer.Option(False, "--resume", help="Continue from OUTPUT/last.safetensors"),
    ) -> None:
        """Train MODEL with the paper's triplet recipe (same options for every model)."""
        import torch
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from agman_milvus.core.model import build_model
        from agman_milvus.training.sampler import TripletSampler
        from agman_milvus.training.trainer import Callbacks, TrainConfig, Trainer

        if model not in models:
            raise typer.BadParameter(f"unknown model {model!r}; choose from {', '.join(models)}")
        source = _source(catalog, attributes, min_count, split_seed, refdata, images, dataset)
        if not source.train:
            raise typer.BadParameter("the data source has no training labels")
        torch.manual_seed(seed)  # the heads' random init is part of the seeded run
        net = build_model(model, schema=source.schema, backbone=backbone,
                          pretrained="imagenet" if pretrained else None, image_size=image_size)
        config = TrainConfig(
            output_dir=output, epochs=epochs, triplets_per_epoch=triplets_per_epoch,
            batch_size=batch_size, lr=lr, step_size=step_size, gamma=gamma, margin=margin,
            cls_loss=not no_cls_loss, freeze_backbone=freeze_backbone, cache_features=cache_features,
            cache_path=cache_path, seed=seed, device=device,
            workers=workers, threads=threads,
        )
        trainer = Trainer(net, config, TripletSampler(source.train, len(source.schema)),
                          source.train_table, valid=source.valid, valid_table=source.valid_table)
        if resume:
            trainer.resume()
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text(json.dumps(
            {"model": model, "backbone": backbone, "pretrained": pretrained, "image_size": image_size,
             **config.to_json()}, indent=1))
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), TextColumn("{task.fields[info]}")) as progress:
            task = progress.add_task("", total=1, info="")

            def epoch_start(epoch: int, steps: int) -> None:
                progress.reset(task, total=steps, description=f"epoch {epoch}/{epochs}", info="")

            def step(info) -> None:
                progress.update(task, completed=info.step, info=f"loss {info.loss:.4f}")

            def epoch_end(record: dict) -> None:
                score = record.get("score")
                progress.console.print(
                    f"epoch {record['epoch']}: loss {record['loss']:.4f}"
                    + (f", valid {score:.2f} (best {record['best']:.2f})" if score is not None else ""))

            trainer.fit(Callbacks(on_step=step, on_epoch_start=epoch_start, on_epoch_end=epoch_end))
        typer.echo(f"best checkpoint: {trainer.best_path} (valid score {trainer.best})")

    @app.command("eval")
    def evaluate(
        checkpoint: Path | None = typer.Option(None, help="Checkpoint (.safetensors) to evaluate"),
        imagenet_floor: str | None = typer.Option(None, help="Instead: untrained ImageNet BACKBONE, pooled"),
        image_size: int = typer.Option(224, min=32, help="Input size for --imagenet-floor"),
        catalog: Path | None = typer.Option(None, rich_help_panel=_DATA),
        attributes: str = typer.Option("articleType,baseColour,gender,usage,season,subCategory", rich_help_panel=_DATA),
        min_count: int = typer.Option(10, rich_help_panel=_DATA),
        split_seed: int = typer.Option(0, rich_help_panel=_DATA),
        refdata: Path | None = typer.Option(None, rich_help_panel=_DATA),
        images: Path | None = typer.Option(None, rich_help_panel=_DATA),
        dataset: str | None = typer.Option(None, rich_help_panel=_DATA),
        split: str = typer.Option("test", help="valid or test"),
        zappos: Path | None = typer.Option(None, help="CSN Zappos dir: TR accuracy on its triplet lists"),
        zappos_triplets: int = typer.Option(160_000, help="Zappos triplets (CSN: 160k test, 80k val)"),
        output: Path | None = typer.Option(None, "--output", "-o", help="Write the result as JSON"),
        batch_size: int = typer.Option(64, min=1),
        workers: int = typer.Option(2, min=0, help="Threads decoding images ahead of the model"),
        device: str = typer.Option("auto"),
        threads: int | None = typer.Option(None, min=1),
    ) -> None:
        """MAP per attribute and overall (or TR accuracy for Zappos triplets)."""
        import torch

        from agman_milvus.core.model import load_checkpoint
        from agman_milvus.training.datasets import ImageTable
        from agman_milvus.training.evaluate import evaluate_map, evaluate_triplets
        from agman_milvus.training.floor import PooledImageNetFeatures
        from agman_milvus.training.trainer import resolve_device
        from agman_milvus.training.zappos import read_zappos_filenames, read_zappos_triplets

        if threads:
            torch.set_num_threads(threads)
        if (checkpoint is None) == (imagenet_floor is None):
            raise typer.BadParameter("give exactly one of --checkpoint or --imagenet-floor")
        if zappos is not None:
            if checkpoint is None:
                raise typer.BadParameter("--zappos needs --checkpoint")
            net = load_checkpoint(checkpoint).to(resolve_device(device))
            table = ImageTable(images or zappos, read_zappos_filenames(zappos / "filenames.json"))
            triplets = read_zappos_triplets(zappos / "tripletlists", split if split != "valid" else "val",
                                            zappos_triplets)
            accuracy = evaluate_triplets(net, triplets, table, batch_size=batch_size)
            result_json: dict = {"tr_accuracy": accuracy, "triplets": len(triplets)}
            typer.echo(f"TR accuracy: {accuracy:.2f}% over {len(triplets)} triplets")
        else:
            source = _source(catalog, attributes, min_count, split_seed, refdata, images, dataset)
            if checkpoint is not None:
                net = load_checkpoint(checkpoint)
                name = str(checkpoint)
            else:
                net = PooledImageNetFeatures(source.schema, imagenet_floor or "", image_size)
                name = f"untrained ImageNet {imagenet_floor}"
            net = net.to(resolve_device(device))
            retrieval, table = source.split(split)
            result = evaluate_map(net, retrieval, table, batch_size=batch_size, workers=workers)
            _map_table(f"{name} — {split} MAP", result)
            result_json = {"model": name, "split": split, **result.to_json()}
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(result_json, indent=1))
