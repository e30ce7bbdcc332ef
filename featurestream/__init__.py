"""featurestream: Kafka event streams to fresh, point-in-time correct ML features.

Define features with :class:`FeatureView`; run them with ``featurestream run``; read them with
:class:`FeatureStore` (online from Redis, training sets from Delta Lake); publish validated events
with :class:`Producer`.
"""

from engine.definitions import (
    Aggregation,
    Derived,
    DriftThresholds,
    Entity,
    EventSource,
    FeatureView,
    Field,
    Window,
)
from engine.errors import DefinitionError, FeaturestreamError, ServiceUnavailable, StoreError
from engine.table_definitions import CdcSource, TableFeature, TableView
from featurestream.client import FeatureStore, OnlineFeatures, connect, training_set_id
from featurestream.config import Settings
from featurestream.producer import InvalidEvent, Producer


def open_registry(settings: Settings | None = None):
    """The registry these settings name: ``FEATURESTREAM_REGISTRY_URL``, else a SQLite file."""
    from featurestream.registered import open_registry as _open

    return _open(settings)


__all__ = [
    "Aggregation",
    "CdcSource",
    "DefinitionError",
    "Derived",
    "DriftThresholds",
    "Entity",
    "EventSource",
    "FeatureStore",
    "FeatureView",
    "FeaturestreamError",
    "Field",
    "InvalidEvent",
    "OnlineFeatures",
    "Producer",
    "ServiceUnavailable",
    "Settings",
    "StoreError",
    "TableFeature",
    "TableView",
    "Window",
    "connect",
    "open_registry",
    "training_set_id",
]
