"""The ``featurestream`` command: one module per area (core commands, registry, lineage, drift,
produce, serve, keys, cdc, doctor), registered on one typer app."""

from featurestream.cli.core import app

__all__ = ["app"]
