"""The ``featurestream`` command: one module per area (core commands, registry, lineage, drift,
produce, serve, keys, cdc, doctor, backfill, verify, training), registered on one typer app."""

import importlib

from featurestream.cli.core import app

for _area in ("backfill", "verify", "training"):
    importlib.import_module(f"featurestream.cli.{_area}").register(app)

__all__ = ["app"]
