#!/bin/sh
# Container entrypoint: initialise bytewax recovery partitions once, then run the command.
#
# bytewax.run reads BYTEWAX_RECOVERY_DIRECTORY / BYTEWAX_SNAPSHOT_INTERVAL from the environment.
# The partitions must exist before the first run and must not be re-created afterwards (that
# fails), so they are created only while the directory holds none.
set -eu

if [ -n "${BYTEWAX_RECOVERY_DIRECTORY:-}" ]; then
    mkdir -p "$BYTEWAX_RECOVERY_DIRECTORY"
    if ! ls "$BYTEWAX_RECOVERY_DIRECTORY"/part-*.sqlite3 >/dev/null 2>&1; then
        parts="${FEATURESTREAM_RECOVERY_PARTITIONS:-1}"
        echo "entrypoint: creating $parts bytewax recovery partition(s) in $BYTEWAX_RECOVERY_DIRECTORY"
        python -m bytewax.recovery "$BYTEWAX_RECOVERY_DIRECTORY" "$parts"
    fi
fi

exec "$@"
