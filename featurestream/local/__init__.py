"""Embedded services for local use and tests: the Tansu broker and redis-server, started,
found again and stopped (:mod:`featurestream.local.services`, :mod:`featurestream.local.processes`)."""
