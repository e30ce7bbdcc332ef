"""Debezium change events decoded a batch at a time into columns (pyarrow arrays per field).

The per-message decoder (:class:`engine.cdc_decode.CdcDecoder`) makes a tuple per row image and
runs its checks per message in Python. Here each value and key still takes one typed msgspec
decode, but everything after it is a C loop over the batch (``map`` with ``attrgetter``,
``itertools.compress``, pyarrow conversion): no Python frame, tuple or check per message. The
checks run over whole columns, and only the messages they flag (or that the fast path cannot
decide: wrapped or missing keys, odd ops, missing or out-of-range times, negative LSNs,
non-finite numbers) go through the per-message path, which names what is wrong or accepts what
only looked odd, so both give the same changes, failures and tombstones.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from engine.cdc_decode import _ENVELOPE_HINT, OPS, CdcDecoder, _Failure
from engine.decode import _MAX_DETAIL, _MAX_TS_MS, Reason, entity_id
from engine.decode_errors import MESSAGE as _MESSAGE
from engine.decode_errors import describe_error as _describe

__all__ = ["ChangeColumns", "ColumnDecoder"]

_OPSET = frozenset(OPS)

_PAYLOAD, _OP, _SOURCE, _AFTER, _BEFORE = (
    operator.attrgetter(a) for a in ("payload", "op", "source", "after", "before")
)
_TS_MS, _LSN = operator.attrgetter("ts_ms"), operator.attrgetter("lsn")


@dataclass
class ChangeColumns:
    """Valid changes of one batch in columns (see :meth:`ColumnDecoder.decode_columns`).

    ``after[j]``/``before[j]`` are the source's ``fields[j]`` over the batch's changes (null where
    the value is null or the change has no such image); ``has_after`` marks changes with an
    after image.
    """

    index: np.ndarray
    op: list[str]
    pk: list[str]
    position: np.ndarray
    lsn: list[int | None]
    ts: np.ndarray
    after: list[pa.Array]
    before: list[pa.Array]
    has_after: np.ndarray
    failures: list[tuple[int, str, str]] = field(default_factory=list)
    tombstones: int = 0


class ColumnDecoder(CdcDecoder):
    """:class:`CdcDecoder` with :meth:`decode_columns` (see module docstring)."""

    def __init__(self, source: Any) -> None:
        super().__init__(source)
        self._blank = self._envelope()
        self._getters = [operator.attrgetter(n) for n in self.names]

    def decode_columns(
        self, keys: list[bytes | None], values: list[bytes], offsets: np.ndarray
    ) -> ChangeColumns:
        """As :meth:`decode`, in columns, and without Python work per message beyond one typed
        decode of its value and key and a few list comprehensions: the checks run over the whole
        batch, and only the messages they flag take the per-message path of :meth:`decode`
        (which names what is wrong, or accepts what only looked odd)."""
        failures: list[tuple[int, str, str]] = []
        tombstones = 0
        live: Any = range(len(values))
        if not all(values):
            for i in itertools.compress(live, map(operator.not_, values)):
                if keys[i] or not self.pk:
                    tombstones += 1
                else:
                    why = f"{_MESSAGE}: the message is empty and has no key; {_ENVELOPE_HINT}"
                    failures.append((i, Reason.MALFORMED, why))
            live = list(itertools.compress(live, values))
            keys, values = list(itertools.compress(keys, values)), list(itertools.compress(values, values))
        n = len(values)
        offs = np.asarray(offsets, np.int64)
        offs = offs if isinstance(live, range) else offs[live]
        # map(attrgetter) and no tuple per message: C loops, and nothing for the collector.
        envs = self._envelopes(values)
        if any(map(_PAYLOAD, envs)):
            envs = [e if e.payload is None else e.payload for e in envs]
        ops: list[Any] = list(map(_OP, envs))
        srcs = list(map(_SOURCE, envs))
        sourced = all(srcs)  # structs are true, None is not
        ts: list[Any] = list(map(_TS_MS, srcs)) if sourced else [None] * len(srcs)
        if None in ts:
            ts = [
                e.ts_ms if s is None or s.ts_ms is None else s.ts_ms for e, s in zip(envs, srcs, strict=True)
            ]
        lsn: list[Any] = list(map(_LSN, srcs)) if sourced else [None if s is None else s.lsn for s in srcs]
        after, before = list(map(_AFTER, envs)), list(map(_BEFORE, envs))
        del envs, srcs
        has_after, has_before = _present(after), _present(before)
        pks, odd = self._pks(keys)
        # What the per-message path would refuse (or what the fast path cannot decide) is odd.
        if not _OPSET.issuperset(ops):
            odd.update(i for i, o in enumerate(ops) if o not in _OPSET)
        if None in ts:
            odd.update(i for i, t in enumerate(ts) if t is None)
            ts = [-1 if t is None else t for t in ts]
        ts_arr = np.asarray(ts, np.int64)
        odd.update(np.flatnonzero((ts_arr < 0) | (ts_arr >= _MAX_TS_MS)).tolist())
        lsn_val, lsn_ok = _ints(lsn)
        odd.update(np.flatnonzero(lsn_val < 0).tolist())
        if not has_after.all():  # only a delete may come without its after image
            deletes = np.fromiter(map(operator.eq, ops, itertools.repeat("d")), bool, n)
            odd.update(np.flatnonzero(~has_after & ~deletes).tolist())
        cols_a, cols_b = self._columns(after, has_after), self._columns(before, has_before)
        for j in self._floats:
            for col in (cols_a[j], cols_b[j]):
                x = col.fill_null(0.0).to_numpy()
                if not np.isfinite(x).all():
                    odd.update(np.flatnonzero(~np.isfinite(x)).tolist())
        kept = np.arange(n)
        if odd:
            for i in sorted(odd):
                try:
                    o, pk, _, lsn_i, t, a, b = self._one(keys[i], values[i], int(offs[i]))
                except _Failure as f:
                    failures.append((live[i], f.reason, f.detail[:_MAX_DETAIL]))
                    ops[i] = None
                    continue
                except Exception as exc:  # unforeseen: blame this message only
                    why = f"{_MESSAGE}: could not be decoded ({_describe(exc)}); {_ENVELOPE_HINT}"
                    failures.append((live[i], Reason.UNDECODABLE, why[:_MAX_DETAIL]))
                    ops[i] = None
                    continue
                ops[i], pks[i], lsn[i], ts_arr[i] = o, pk, lsn_i, t
                after[i], before[i] = self._image(self._after_type, a), self._image(self._before_type, b)
            kept = np.asarray([i for i, o in enumerate(ops) if o is not None], np.int64)
            keep = kept.tolist()
            ops, pks, lsn = [ops[i] for i in keep], [pks[i] for i in keep], [lsn[i] for i in keep]
            after, before = [after[i] for i in keep], [before[i] for i in keep]
            has_after, has_before = _present(after), _present(before)
            ts_arr, offs = ts_arr[kept], offs[kept]
            cols_a, cols_b = self._columns(after, has_after), self._columns(before, has_before)
            lsn_val, lsn_ok = _ints(lsn)
        failures.sort()
        position = np.where(lsn_ok, lsn_val, offs)
        return ChangeColumns(
            index=np.asarray(live, np.int64)[kept] if len(kept) else np.zeros(0, np.int64),
            op=ops,
            pk=pks,  # type: ignore[arg-type]
            position=position.astype(np.int64),
            lsn=lsn,
            ts=ts_arr,
            after=cols_a,
            before=cols_b,
            has_after=has_after,
            failures=failures,
            tombstones=tombstones,
        )

    def _envelopes(self, values: list[bytes]) -> list[Any]:
        """Every value decoded, or an empty envelope (which the checks flag) where it fails.

        One call per value, in a C loop: decoding the batch as one JSON array of the values
        joined by commas measured slower (msgspec 0.23), and would need proof that no value
        merges with its neighbours (``{"a": "`` then ``"}`` decode as one element)."""
        dec = self._value.decode
        try:
            return list(map(dec, values))
        except Exception:
            out = []
            for v in values:
                try:
                    out.append(dec(v))
                except Exception:
                    out.append(self._blank)
            return out

    def _pks(self, keys: list[bytes | None]) -> tuple[list[str | None], set[int]]:
        """Primary keys of bare typed keys; the indices of the others (for the per-message path)."""
        dec = self._typed_key.decode
        odd: set[int] = set()
        try:
            typed: list[Any] = list(map(dec, keys))  # type: ignore[arg-type]
        except Exception:
            typed = []
            for i, k in enumerate(keys):
                try:
                    typed.append(dec(k))  # type: ignore[arg-type]
                except Exception:
                    typed.append(None)
                    odd.add(i)
        wrapped = any(map(len, map(_PAYLOAD, typed))) if not odd else any(t and len(t.payload) for t in typed)
        if wrapped:  # keys as {"schema", "payload"}: the per-message path reads them
            odd.update(i for i, t in enumerate(typed) if t is not None and len(t.payload))
        if len(self.pk) == 1:
            get = operator.attrgetter(self.pk[0])
            if not odd:  # entity_id of one part is str(part)
                return list(map(str, map(get, typed))), odd
            return [None if t is None else str(get(t)) for t in typed], odd
        return [None if t is None else entity_id([getattr(t, k) for k in self.pk]) for t in typed], odd

    def _image(self, struct: Any, values: tuple[Any, ...] | None) -> Any:
        return None if values is None else struct(**dict(zip(self.names, values, strict=True)))

    def _columns(self, images: list[Any], present: np.ndarray) -> list[pa.Array]:
        """Per field, its values over ``images`` (row image structs, None where ``present`` is
        False: then every field is null)."""
        pairs = zip(self._getters, self._arrow, strict=True)
        if present.all():
            return [pa.array(list(map(get, images)), t) for get, t in pairs]
        some = list(itertools.compress(images, present.tolist()))
        # Each change's row among the present images, null where it has none: a take fills them.
        at = pa.array(np.cumsum(present) - 1, pa.int64(), mask=~present)
        return [pa.array(list(map(get, some)), t).take(at) for get, t in pairs]


def _ints(values: list[int | None]) -> tuple[np.ndarray, np.ndarray]:
    """``values`` (int64 by the decoder's types) as an array, 0 where None, and where not None."""
    if None not in values:
        return np.fromiter(values, np.int64, len(values)), np.ones(len(values), bool)
    ok = _present(values)
    return np.asarray([0 if v is None else v for v in values], np.int64), ok


def _present(images: list[Any]) -> np.ndarray:
    """Where ``images`` holds an image (not None), in a C loop."""
    return np.fromiter(map(operator.is_not, images, itertools.repeat(None)), bool, len(images))
