"""``python -m featurestream.cli``: the same as the ``featurestream`` command."""

from featurestream.cli import app

app()
