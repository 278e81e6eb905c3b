"""``agman models``: list the registered models and run each once on a generated image."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models(
        backbone: str = typer.Option("mobilenet_v2", help="resnet50, mobilenet_v2 or efficientnet_lite0/1/2"),
        pretrained: bool = typer.Option(False, help="Use torchvision's ImageNet weights (local cache)"),
    ) -> None:
        """Build every model for a demo schema and embed one image with each."""
        import time

        import torch
        from PIL import Image
        from rich.console import Console
        from rich.table import Table

        from agman_milvus.core.model import build_model, list_models
        from agman_milvus.core.schema import AttributeSchema

        schema = AttributeSchema.from_dict({"colour": ["red", "green"], "shape": ["round", "square"]})
        image = Image.new("RGB", (256, 256), (200, 30, 30))
        table = Table("model", "backbone", "parameters", "embedding", "descriptor", "ms / image")
        for name in list_models():
            model = build_model(name, schema=schema, backbone=backbone,
                                pretrained="imagenet" if pretrained else None)
            batch = model.preprocess(image).unsqueeze(0)
            start = time.perf_counter()
            with torch.inference_mode():
                embeddings, descriptor = model.encode(batch)
            elapsed = (time.perf_counter() - start) * 1000
            table.add_row(
                name,
                backbone,
                f"{sum(p.numel() for p in model.parameters()):,}",
                "x".join(map(str, embeddings.shape[1:])),
                str(descriptor.shape[1]),
                f"{elapsed:.0f}",
            )
        Console().print(table)
