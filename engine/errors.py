"""Errors raised by featurestream. Every error derives from :class:`FeaturestreamError`."""

from __future__ import annotations


class FeaturestreamError(Exception):
    """Root of every error featurestream raises on purpose."""


class DefinitionError(FeaturestreamError, ValueError):
    """A feature definition is invalid; the message names the field and the fix."""


class ServiceUnavailable(FeaturestreamError):
    """A backing service (Kafka, Redis, Delta) can neither be reached nor started."""


class StoreError(FeaturestreamError):
    """A read from or write to the online or offline store failed."""
