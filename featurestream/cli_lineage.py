"""Lineage commands: training sets, models, lineage graphs."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the ``featurestream`` app."""
