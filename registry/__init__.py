"""The registry: immutable feature view versions, lineage to models, and drift history.

Every function takes a :class:`Registry` first, so notebooks and CI pipelines use the same API
as the ``featurestream`` CLI::

    reg = featurestream.open_registry()
    registry.plan(reg, views); registry.apply(reg, views); registry.list_versions(reg)
    registry.model_lineage(reg, "fraud", "3")
    key, secret = registry.create_key(reg, "scoring", read=["user_spend"]); registry.access_audit_log(reg)
    registry.measure_drift(reg, store, view, start, end)
"""

from registry.core import Registry, RegistryError
from registry.drift import (
    DriftMeasurement,
    baselines,
    capture_baseline,
    drift_history,
    feature_stats,
    ks,
    measure_drift,
    plot_drift,
    psi,
)
from registry.keys import (
    AccessRecord,
    ApiKey,
    access_audit_log,
    create_key,
    list_keys,
    revoke_key,
)
from registry.lineage import (
    lineage_graph,
    model_lineage,
    models,
    register_model,
    render_lineage,
)
from registry.versions import (
    Change,
    ViewVersion,
    apply,
    deprecate,
    find_version,
    get_version,
    plan,
    retire,
    serving_views,
)
from registry.versions import versions as list_versions  # the submodule keeps the name `versions`

__all__ = [
    "AccessRecord",
    "ApiKey",
    "Change",
    "DriftMeasurement",
    "Registry",
    "RegistryError",
    "ViewVersion",
    "access_audit_log",
    "apply",
    "baselines",
    "capture_baseline",
    "create_key",
    "deprecate",
    "drift_history",
    "feature_stats",
    "find_version",
    "get_version",
    "ks",
    "lineage_graph",
    "list_keys",
    "list_versions",
    "measure_drift",
    "model_lineage",
    "models",
    "plan",
    "plot_drift",
    "psi",
    "register_model",
    "render_lineage",
    "retire",
    "revoke_key",
    "serving_views",
]
