"""What every rlflow adder shares: the row rule of `rf.Step`, input validation, spec bookkeeping.

A subclass sees the stream of one vector env as three vectorized events, each on a set of rows
(int64 arrays of row ids, indices into per-row state arrays of size `num_rows`):

    _open(rows, action, extras)   rows that acted in the previous step: a transition opens with the
                                  observation the row last started from (`_start`), this action and
                                  these extras (flat dicts field -> [k, ...])
    _close(rows, reward, terminated, truncated, final_obs)
                                  rows whose open transition ends now (alive or done); returns items
    _start(rows, obs, new_episode) rows alive now: their stream continues from `obs`
    _before_open(rows, extras)    every row of the previous step (alive or not) with its extras, once
                                  per `add` before `_open` (Rollout takes its bootstrap values here)

`add` runs _before_open -> _open -> _close -> _start, in that order, and concatenates the items of
_before_open and _close. Rows that are present but neither alive nor done are idle: no event.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from rlflow.core import Adder, Step
from rlflow.errors import SpecError, UsageError, is_real, mismatch
from rlflow.specs import ArraySpec, EnvSpec, check_values_fit, flatten

_EMPTY: dict = {}
_BOOL = np.dtype(np.bool_)
_F32 = np.dtype(np.float32)


def unit_float(owner: str, name: str, value) -> float:
    """`value` as a float in [0, 1] (a discount, a GAE lambda), else a UsageError naming it."""
    if not is_real(value) or not 0.0 <= float(value) <= 1.0:
        raise UsageError(mismatch(owner, name, "a float in [0, 1]", repr(value)))
    return float(value)


def _check_dtype(a: np.ndarray, dtype: np.dtype, field: str, what: str) -> None:
    """For an array whose dtype differs from its spec's: SpecError unless it is of the same kind
    and its values survive the cast (int64 300 into int8 would wrap, 1e39 into float32 be inf)."""
    if a.dtype.kind != dtype.kind:
        raise SpecError(mismatch(what, field, f"dtype {dtype}", f"dtype {a.dtype}"))
    check_values_fit(a, dtype, field, what)


def _flat(tree, prefix: str) -> dict:
    """`specs.flatten`, with a shortcut for the common case of a plain array."""
    if type(tree) is np.ndarray:
        return {prefix: tree}
    return flatten(tree, prefix)


def _flat_extras(extras) -> dict:
    """Flat extras; a dict of plain arrays (the common case) is returned as it is."""
    if not extras:
        return _EMPTY
    if type(extras) is dict:
        for v in extras.values():
            if type(v) is not np.ndarray:
                return flatten(extras, "")
        return extras
    return flatten(extras, "")


def _flat_specs(spec, prefix: str) -> dict[str, ArraySpec]:
    return {k: v for k, v in flatten(spec, prefix).items()}


def _concat(parts: list[dict[str, np.ndarray]], specs: dict[str, ArraySpec]) -> dict[str, np.ndarray]:
    """One item batch from several (same fields); zero rows when there are none."""
    parts = [p for p in parts if p]
    if not parts:
        return {k: s.zeros((0,)) for k, s in specs.items()}
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class RowAdder(Adder):
    """Base class: validation, per-row bookkeeping and the row rule; subclasses hold the items.

    Subclasses implement `_allocate()` (called once the data's specs are known), `_item_fields()`
    (field -> spec of the emitted items, from `self.obs_specs`, `self.action_specs`,
    `self.extras_specs`), `_open`, `_close`, `_start` and optionally `_before_open`, `_reset_rows`.
    """

    #: extras fields that the adder itself needs (Rollout: "value", "final_value").
    required_extras: tuple = ()
    required_extras_help: str = ""        # what the required extras are, for the error that misses one

    def __init__(self):
        self._declared_obs: Optional[dict[str, ArraySpec]] = None
        self._declared_action: Optional[dict[str, ArraySpec]] = None
        self._declared_extras: Optional[dict[str, ArraySpec]] = None
        self._clear()

    # ---------------------------------------------------------------- specs
    def item_specs(self, env_spec: EnvSpec, extras_specs: Mapping[str, Any] | None = None
                   ) -> dict[str, ArraySpec]:
        """The specs of the items this adder emits (flat field names), known before any data.

        Also records them: the data fed later must match them (else SpecError naming the field).
        """
        if not isinstance(env_spec, EnvSpec):
            raise UsageError(mismatch(f"{type(self).__name__}.item_specs", "env_spec", "an rf.specs.EnvSpec "
                                      "(a vector env's `spec`)", type(env_spec).__name__))
        obs = _flat_specs(env_spec.observation, "obs")
        act = _flat_specs(env_spec.action, "action")
        ext = _flat_specs(dict(extras_specs or {}), "")
        for name, s in list(obs.items()) + list(act.items()) + list(ext.items()):
            if not isinstance(s, ArraySpec):
                raise SpecError(mismatch("spec", name, "an ArraySpec", repr(s)))
        self._check_extras_names(ext)
        self._declared_obs, self._declared_action, self._declared_extras = obs, act, ext
        return self._item_fields_for(obs, act, ext)

    def _item_fields_for(self, obs, act, ext) -> dict[str, ArraySpec]:
        saved = self.obs_specs, self.action_specs, self.extras_specs
        self.obs_specs, self.action_specs, self.extras_specs = obs, act, ext
        try:
            return self._item_fields()
        finally:
            self.obs_specs, self.action_specs, self.extras_specs = saved

    def _check_extras_names(self, ext: Mapping[str, Any]):
        missing = [k for k in self.required_extras if k not in ext]
        if missing:
            raise SpecError(mismatch("extras field", missing[0], f"extras holding {list(self.required_extras)}"
                                     f"{self.required_extras_help}", f"extras {sorted(ext)}"))
        reserved = self._reserved_names()
        for k in ext:
            if k in reserved or k.split("/")[0] in ("obs", "next_obs", "action"):
                raise SpecError(mismatch("extras field", k, f"a name other than the item fields {sorted(reserved)}",
                                         f"'{k}'"))

    def _reserved_names(self) -> set:
        return {"obs", "next_obs", "action", "reward", "discount", "mask", "is_first", "terminated",
                "truncated", "advantage", "return", "next_value"}

    # ---------------------------------------------------------------- state
    def _clear(self):
        self.num_rows = 0
        self.obs_specs: Optional[dict[str, ArraySpec]] = None
        self.action_specs: Optional[dict[str, ArraySpec]] = None
        self.extras_specs: Optional[dict[str, ArraySpec]] = None
        self._plain_action: Optional[ArraySpec] = None   # set when actions are one array, no extras
        self._specs: Optional[dict[str, ArraySpec]] = None
        self._started = False
        self._prev_ids: Optional[np.ndarray] = None
        self._prev_alive: Optional[np.ndarray] = None   # None: every previous row alive
        self._open_rows: Optional[np.ndarray] = None     # bool [num_rows]: has an open transition
        self._prev_full = False       # the previous step had every row, all alive
        self._fast = None             # (ids, ...): `add`'s short path for steps whose env_ids is ids
        self._full_call = False       # this add call: every row opens, closes and starts, in order

    def reset(self) -> None:
        """Forget all partial streams (the next call must be `add_first`)."""
        self._started = False
        self._prev_ids = None
        self._prev_alive = None

    # ---------------------------------------------------------------- validation
    def _flat_obs(self, obs, prefix: str, n: int, field_what: str) -> dict[str, np.ndarray]:
        specs = self.obs_specs
        leaf = specs.get("obs") if len(specs) == 1 else None
        if leaf is not None and type(obs) is np.ndarray:          # the common case: one array
            if obs.shape != (n,) + leaf.shape:
                raise SpecError(mismatch(field_what, "obs", f"shape {(n,) + leaf.shape}", f"shape {obs.shape}"))
            if obs.dtype != leaf.dtype:
                _check_dtype(obs, leaf.dtype, "obs", field_what)
            return {"obs": obs}
        flat = _flat(obs, prefix)
        if len(flat) != len(specs) or any(k not in specs for k in flat):
            raise SpecError(mismatch(field_what, prefix, f"fields {sorted(specs)}", f"fields {sorted(flat)}"))
        out = {}
        for k, s in specs.items():
            a = flat[k]
            if not isinstance(a, np.ndarray):
                a = np.asarray(a)
            if a.shape != (n,) + s.shape:
                raise SpecError(mismatch(field_what, k, f"shape {(n,) + s.shape}", f"shape {a.shape}"))
            if a.dtype != s.dtype:
                _check_dtype(a, s.dtype, k, field_what)
            out[k] = a
        return out

    def _validate_step(self, step: Step, first: bool) -> tuple:
        if not isinstance(step, Step):
            raise UsageError(mismatch(type(self).__name__ + (".add_first" if first else ".add"), "step",
                                      "an rf.Step (what a vector env's reset / step returns)",
                                      type(step).__name__))
        ids = np.asarray(step.env_ids)
        n = len(ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise SpecError(mismatch("step", "env_ids", "an int array [B]", f"{ids.dtype} shape {ids.shape}"))
        if first:
            if n == 0:
                raise UsageError(mismatch("step", "env_ids", "at least one row in the first step", "0 rows"))
            if not np.array_equal(ids, np.arange(n)):
                raise UsageError(mismatch("step", "env_ids", f"arange({n}) in the first (reset) step",
                                          f"{ids.tolist()}"))
            full = True
        else:
            full = n == self.num_rows and (ids.tobytes() == self._all_bytes if ids.dtype == np.int64
                                           else bool((ids == self._all_rows).all()))
            if not full and n and (ids.min() < 0 or ids.max() >= self.num_rows):
                raise SpecError(mismatch("step", "env_ids", f"ids in [0, {self.num_rows})",
                                         f"min {ids.min()}, max {ids.max()}"))
            if not full and n > 1:
                counts = np.bincount(ids, minlength=self.num_rows)
                if counts.max() > 1:
                    raise SpecError(mismatch("step", "env_ids", "distinct ids (one row per env)",
                                             f"{ids.tolist()} (repeated: {np.flatnonzero(counts > 1).tolist()})"))
        shape = (n,)
        for name in ("reward", "terminated", "truncated"):
            a = getattr(step, name)
            if getattr(a, "shape", None) != shape:
                raise SpecError(mismatch("step", name, f"an array of shape ({n},)", f"{type(a).__name__} "
                                         f"of shape {np.shape(a)}"))
            if name != "reward" and a.dtype != np.bool_:
                raise SpecError(mismatch("step", name, "dtype bool", f"dtype {a.dtype}"))
            if name == "reward" and a.dtype != np.float32:     # items store rewards as float32
                if a.dtype.kind not in "biuf":
                    raise SpecError(mismatch("step", "reward", "real numbers (float32)", f"dtype {a.dtype}"))
                check_values_fit(a, np.dtype(np.float32), "reward", "step")
        alive = step.alive
        if alive is not None:
            alive = np.asarray(alive)
            if alive.shape != (n,) or alive.dtype != np.bool_:
                raise SpecError(mismatch("step", "alive", f"bool shape ({n},)", f"{alive.dtype} shape {alive.shape}"))
            if np.count_nonzero(alive) == n:
                alive = None
        return ids, n, full, alive

    def _validate_action_extras(self, actions, extras, n: int):
        plain = self._plain_action          # the common case: one array of the exact spec, no extras
        if (plain is not None and not extras and type(actions) is np.ndarray and actions.dtype == plain.dtype
                and actions.shape[1:] == plain.shape and actions.shape[:1] == (n,)):
            return {"action": actions}, _EMPTY
        act = _flat(actions, "action")
        if self.action_specs is None:   # first add: take the specs from the data (or the declaration)
            specs = self._declared_action
            if specs is None:
                specs = _specs_of_batch(act, "action", n)
            self.action_specs = specs
        out_a = {}
        if len(act) != len(self.action_specs) or any(k not in self.action_specs for k in act):
            raise SpecError(mismatch("action", "action", f"fields {sorted(self.action_specs)}",
                                     f"fields {sorted(act)}"))
        for k, s in self.action_specs.items():
            a = act[k]
            if not isinstance(a, np.ndarray):
                a = np.asarray(a)
            if a.shape[:1] != (n,) or a.shape[1:] != s.shape:
                raise SpecError(mismatch("action", k, f"shape {(n,) + s.shape} (one row per row of the previous step)",
                                         f"shape {a.shape}"))
            if a.dtype != s.dtype and (a.dtype.kind != s.dtype.kind and not (
                    a.dtype.kind in "iu" and s.dtype.kind in "iu")):
                raise SpecError(mismatch("action", k, f"dtype {s.dtype}", f"dtype {a.dtype}"))
            if a.dtype != s.dtype and s.dtype.kind in "iu":      # int64 300 into int8 would wrap
                check_values_fit(a, s.dtype, k, "action")
            out_a[k] = a
        ext = _flat_extras(extras)
        if self.extras_specs is None:
            specs = self._declared_extras
            if specs is None:
                specs = _specs_of_batch(ext, "extras field", n)
                self._check_extras_names(specs)
            self.extras_specs = specs
        specs = self.extras_specs
        if len(ext) != len(specs) or any(k not in specs for k in ext):
            extra = sorted(set(ext) - set(specs))
            missing = sorted(set(specs) - set(ext))
            raise SpecError(mismatch("extras field", (extra or missing)[0],
                                     f"the same extras fields in every call: {sorted(specs)}",
                                     f"{sorted(ext)} (new {extra}, missing {missing})"))
        out_e = {}
        for k, s in specs.items():
            a = ext[k]
            if not isinstance(a, np.ndarray):
                a = np.asarray(a)
            if a.shape[:1] != (n,) or a.shape[1:] != s.shape:
                raise SpecError(mismatch("extras field", k, f"shape {(n,) + s.shape}", f"shape {a.shape}"))
            if a.dtype != s.dtype:
                _check_dtype(a, s.dtype, k, "extras field")
            out_e[k] = a
        if self._plain_action is None and not specs and list(self.action_specs) == ["action"]:
            self._plain_action = self.action_specs["action"]
        return out_a, out_e

    # ---------------------------------------------------------------- the contract
    def add_first(self, step: Step) -> None:
        """Start (or restart) every row's stream from a `reset` step. Open transitions are dropped."""
        first_time = self.obs_specs is None
        ids, n, _, alive = self._validate_step(step, first=True)
        if first_time:
            flat = flatten(step.obs, "obs")
            specs = {}
            for k, a in flat.items():
                a = np.asarray(a)
                if a.ndim < 1 or a.shape[0] != n:
                    raise SpecError(mismatch("observation", k, f"an array with a batch axis of {n}",
                                             f"shape {a.shape}"))
                specs[k] = ArraySpec(a.shape[1:], a.dtype)
            if self._declared_obs is not None:
                for k, s in self._declared_obs.items():
                    if k not in specs:
                        raise SpecError(mismatch("observation", k, f"fields {sorted(self._declared_obs)}",
                                                 f"fields {sorted(specs)}"))
                    if specs[k].shape != s.shape:
                        raise SpecError(mismatch("observation", k, f"shape {(n,) + s.shape}",
                                                 f"shape {(n,) + specs[k].shape}"))
                if len(specs) != len(self._declared_obs):
                    raise SpecError(mismatch("observation", "obs", f"fields {sorted(self._declared_obs)}",
                                             f"fields {sorted(specs)}"))
                specs = dict(self._declared_obs)
            self.obs_specs = specs
            self.num_rows = n
            self._all_rows = np.arange(n, dtype=np.int64)
            self._all_bytes = self._all_rows.tobytes()
        elif n != self.num_rows:
            raise UsageError(mismatch("add_first", "env_ids", f"{self.num_rows} rows (as in the first reset)",
                                      f"{n} rows"))
        obs = self._flat_obs(step.obs, "obs", n, "observation")
        self._open_rows = np.zeros(self.num_rows, bool)
        self._allocated = False          # fresh per-row state at the next add (specs complete then)
        rows = self._all_rows if alive is None else self._all_rows[alive]
        # copied: the env may write its next step into the same buffers before our first add
        self._pending_first = (rows, {k: v.copy() if alive is None else v[alive] for k, v in obs.items()})
        self._prev_ids = self._all_rows
        self._prev_alive = alive
        self._prev_full = alive is None
        self._started = True

    def add(self, actions, step: Step, extras: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        """Feed one vector step; return the items that are ready (field -> [k, ...], k >= 0)."""
        fast = self._fast
        if fast is not None and step.__class__ is Step and step.env_ids is fast[0] and self._prev_full \
                and self._started and self._allocated:
            items = self._fast_add(fast, actions, step, extras)
            if items is not None:
                return items
        if not self._started:
            raise UsageError(mismatch("adder", "add", "add_first(step) after a reset before add",
                                      "add without add_first" if self._prev_ids is None else "add after reset()"))
        prev_ids, prev_alive = self._prev_ids, self._prev_alive
        act, ext = self._validate_action_extras(actions, extras, len(prev_ids))
        ids, n, full, alive = self._validate_step(step, first=False)
        obs = self._flat_obs(step.obs, "obs", n, "observation")
        final = self._flat_obs(step.final_obs, "obs", n, "final observation")
        if not self._allocated:
            self._specs = self._item_fields()
            self._allocate()
            self._allocated = True
            rows, o = self._pending_first
            self._full_call = len(rows) == self.num_rows
            self._start(rows, o, None)
        term = step.terminated                # bool [n]: checked by _validate_step
        reward = step.reward
        # the common case: every row of the full batch is alive now and acted in the previous step
        self._full_call = full_call = full and alive is None and self._prev_full
        if full_call and self._fast_full:
            items = self._full_add(act, ext, reward, term, obs, final)
            if items is not None:
                self._prev_ids = ids
                self._prev_alive = alive
                self._prev_full = True
                if ((self._fast is None or self._fast[0] is not ids) and not ids.flags.writeable and ids.base is None
                        and len(self.obs_specs) == 1 and "obs" in self.obs_specs and self._plain_action is not None):
                    # this step's ids array (a vector env's own, read-only: rlflow's reuse one) marks
                    # the full, in-order steps to come; see _fast_add
                    leaf = self.obs_specs["obs"]
                    self._fast = (ids, (len(ids),), (len(ids),) + leaf.shape, leaf.dtype,
                                  self._plain_action.dtype, (len(ids),) + self._plain_action.shape)
                return items
        trunc = step.truncated
        done = term | trunc
        out = []
        if full_call:
            before = self._before_open(ids, ext)
            if before:
                out.append(before)
            self._open(ids, act, ext)
            items = self._close(ids, reward, term, trunc, done, final)
            if items:
                out.append(items)
            self._start(ids, obs, done)
        else:
            self._partial_add(prev_ids, prev_alive, act, ext, ids, alive, obs, final, reward, term, trunc,
                              done, out)
        self._prev_ids = ids
        self._prev_alive = alive
        self._prev_full = full and alive is None
        return _concat(out, self._specs)

    def _fast_add(self, fast, actions, step: Step, extras):
        """`add` of the usual step, checked in few operations: every row in order (the step's
        env_ids is the read-only ids array a validated full step had), all alive, one plain
        observation array and one action array of the exact specs, no extras. The same checks
        as the general path (shapes and dtypes of the flags, the observations and the actions),
        only fewer calls; returns None where any differs, and `add` takes the general path."""
        if not self._fast_ok(fast, actions, step, extras):
            return None
        self._full_call = True
        items = self._full_add({"action": actions}, _EMPTY, step.reward, step.terminated, {"obs": step.obs},
                               {"obs": step.final_obs})
        if items is not None:
            self._prev_ids = fast[0]
            self._prev_alive = None
        return items

    def _fast_ok(self, fast, actions, step: Step, extras) -> bool:
        """Whether `step` is the usual one `_fast_add` (and `add_into`) take (see `_fast_add`).
        Identity before equality: a dtype compares with itself far faster than with another."""
        if extras or step.alive is not None or not self._fast_full:
            return False
        ids, rows, obs_shape, obs_dtype, act_dtype, act_shape = fast
        obs, final, reward, term, trunc = step.obs, step.final_obs, step.reward, step.terminated, step.truncated
        nd = np.ndarray
        if not (type(actions) is nd and type(obs) is nd and type(final) is nd and type(term) is nd
                and type(trunc) is nd and type(reward) is nd and reward.shape == rows and actions.shape == act_shape
                and obs.shape == obs_shape and final.shape == obs_shape and term.shape == rows
                and trunc.shape == rows):
            return False
        # exact dtypes: another of the same kind (float64 obs or rewards for float32 items) goes to
        # the general path, which refuses the values its cast would change (1e39 -> inf)
        b, f32 = _BOOL, _F32
        return ((actions.dtype is act_dtype or actions.dtype == act_dtype)
                and (obs.dtype is obs_dtype or obs.dtype == obs_dtype)
                and (final.dtype is obs_dtype or final.dtype == obs_dtype)
                and (reward.dtype is f32 or reward.dtype == f32)
                and (term.dtype is b or term.dtype == b) and (trunc.dtype is b or trunc.dtype == b))

    def add_into(self, actions, step: Step, extras, sink) -> Optional[int]:
        """`add`, with the items written straight into the buffers `sink.reserve(n)` lends (field ->
        array [n, ...] in the item specs) and handed over by `sink.commit(n)`: no item arrays are
        made. Returns the rows written, or None where this step is not one the adder writes so
        (then call `add` and hand its items to the sink; nothing was consumed). rlflow's process
        runtime writes its actors' items into their shared-memory rings this way."""
        fast = self._fast
        if not (fast is not None and step.__class__ is Step and step.env_ids is fast[0] and self._prev_full
                and self._started and self._allocated and self._writes_into()
                and self._fast_ok(fast, actions, step, extras)):
            return None
        return self._full_add_into(fast[0], actions, step, sink)

    def _writes_into(self) -> bool:
        """Whether `add_into` may write this adder's items (the adders that can override it)."""
        return False

    def _full_add_into(self, ids, actions, step: Step, sink) -> Optional[int]:
        return None

    def _partial_add(self, prev_ids, prev_alive, act, ext, ids, alive, obs, final, reward, term, trunc, done, out):
        """The row rule of rf.Step for any subset of rows and any alive mask (see the module doc)."""
        open_rows = self._open_rows
        if self._prev_full:     # every row was alive: all closed (open_rows is not kept on the fast path)
            open_rows[:] = False
        before = self._before_open(prev_ids, ext)
        if before:
            out.append(before)
        # 1. the rows of the previous step that were alive acted: open their transitions
        if prev_alive is None:
            self._open(prev_ids, act, ext)
            open_rows[prev_ids] = True
        elif np.count_nonzero(prev_alive):
            r = prev_ids[prev_alive]
            self._open(r, {k: v[prev_alive] for k, v in act.items()}, {k: v[prev_alive] for k, v in ext.items()})
            open_rows[r] = True
        # 2. close the open transitions of rows that are alive or done
        closing = open_rows[ids]
        if alive is not None:
            closing &= alive | done
        rows = ids[closing]
        if len(rows):
            items = self._close(rows, reward[closing], term[closing], trunc[closing], done[closing],
                                {k: v[closing] for k, v in final.items()})
            open_rows[rows] = False
            if items:
                out.append(items)
        # 3. rows alive now continue from obs
        if alive is None:
            self._start(ids, obs, done)
        elif np.count_nonzero(alive):
            self._start(ids[alive], {k: v[alive] for k, v in obs.items()}, done[alive])

    # ---------------------------------------------------------------- hooks
    _fast_full = False      # a subclass with a one-shot path for full calls sets this and `_full_add`

    def _full_add(self, act, ext, reward, terminated, obs, final) -> Optional[dict]:
        """Every row of the batch acted last step and is alive now: the whole event at once, or
        None to take the general path (open, close, start)."""
        return None

    def _item_fields(self) -> dict[str, ArraySpec]:
        raise NotImplementedError

    def _allocate(self) -> None:
        raise NotImplementedError

    def _before_open(self, rows: np.ndarray, extras: dict) -> Optional[dict]:
        return None

    def _open(self, rows: np.ndarray, action: dict, extras: dict) -> None:
        raise NotImplementedError

    def _close(self, rows, reward, terminated, truncated, done, final_obs) -> Optional[dict]:
        raise NotImplementedError

    def _start(self, rows: np.ndarray, obs: dict, new_episode: Optional[np.ndarray]) -> None:
        raise NotImplementedError


class TrajectoryAdder(RowAdder):
    """Base of the adders whose items are runs of consecutive steps of one row (Sequence, Episode,
    Rollout): every row keeps its last `capacity` steps in ring buffers [num_rows, capacity, ...].

    Step k of a row's current segment (k counts from 0 at the segment's start: the episode for
    Sequence(pad/truncate) and Episode, the whole stream for Sequence(continue) and Rollout) lives in
    slot k % capacity. `_start` writes its observation, `_open` its action, extras and is_first,
    `_close` its reward, flags and next observation, then advances the row's count.
    `_gather(rows, starts, valid, length)` copies windows out: [W, length, ...], zero past `valid`.
    """

    store_next_obs = True

    def _ring_capacity(self) -> int:
        raise NotImplementedError

    def _stacked_fields(self, length: int, flags=()) -> dict[str, ArraySpec]:
        """Item fields stacked over `length` steps: observations, actions, reward, discount, mask,
        the bool `flags`, next observations, extras (in that order)."""
        L = (length,)
        f = {k: ArraySpec(L + s.shape, s.dtype) for k, s in self.obs_specs.items()}
        f.update({k: ArraySpec(L + s.shape, s.dtype) for k, s in self.action_specs.items()})
        f["reward"] = ArraySpec(L, np.float32)
        f["discount"] = ArraySpec(L, np.float32)
        for name in ("mask",) + tuple(flags):
            f[name] = ArraySpec(L, bool)
        f.update({"next_" + k: ArraySpec(L + s.shape, s.dtype) for k, s in self.obs_specs.items()})
        f.update({k: ArraySpec(L + s.shape, s.dtype) for k, s in self.extras_specs.items()})
        return f

    def _allocate(self) -> None:
        R, C = self.num_rows, self._ring_capacity()
        self._cap = C
        self._obs = {k: s.zeros((R, C)) for k, s in self.obs_specs.items()}
        self._act = {k: s.zeros((R, C)) for k, s in self.action_specs.items()}
        self._ext = {k: s.zeros((R, C)) for k, s in self.extras_specs.items()}
        self._nobs = ({"next_" + k: s.zeros((R, C)) for k, s in self.obs_specs.items()}
                      if self.store_next_obs else {})
        self._rew = np.zeros((R, C), np.float32)
        self._term = np.zeros((R, C), bool)
        self._trunc = np.zeros((R, C), bool)
        self._first = np.zeros((R, C), bool)
        self._count = np.zeros(R, np.int64)          # steps in the row's current segment
        self._new_episode = np.ones(R, bool)         # the next step opened starts an episode
        self._arange_cap = np.arange(C, dtype=np.int64)

    def _start(self, rows, obs, new_episode) -> None:
        slot = self._count[rows] % self._cap
        for k, a in obs.items():
            self._obs[k][rows, slot] = a

    def _open(self, rows, action, extras) -> None:
        slot = self._count[rows] % self._cap
        for k, a in action.items():
            self._act[k][rows, slot] = a
        for k, a in extras.items():
            self._ext[k][rows, slot] = a
        self._first[rows, slot] = self._new_episode[rows]
        self._new_episode[rows] = False

    def _record_close(self, rows, reward, terminated, truncated, done, final_obs) -> np.ndarray:
        """Write the closing step's outcome; returns the slots written. Advances the counts."""
        count = self._count[rows]
        slot = count % self._cap
        self._rew[rows, slot] = reward
        self._term[rows, slot] = terminated
        self._trunc[rows, slot] = truncated
        for k, a in final_obs.items():
            if self.store_next_obs:
                self._nobs["next_" + k][rows, slot] = a
        self._count[rows] = count + 1
        if np.count_nonzero(done):
            self._new_episode[rows[done]] = True
        return slot

    def _gather(self, rows, starts, valid, length: int, bufs: dict) -> tuple[dict, np.ndarray]:
        """Windows of `length` steps of rows `rows` from segment step `starts` on; steps at or past
        `valid` are zero. Returns (field -> [W, length, ...], mask [W, length]). Only the first
        max(valid) steps are copied from the ring (episodes are often much shorter than the pad)."""
        W = len(rows)
        vmax = int(valid.max()) if W else 0
        offs = self._arange_cap[:vmax] if vmax <= self._cap else np.arange(vmax)
        idx = starts[:, None] + offs
        idx %= self._cap                                                # [W, vmax]
        r = rows[:, None]
        mask = self._arange_cap[:length][None, :] < valid[:, None] if length <= self._cap else \
            np.arange(length)[None, :] < valid[:, None]
        short = mask[:, :vmax]
        some_pad = np.count_nonzero(short) != short.size
        out = {}
        for k, b in bufs.items():
            g = b[r, idx]
            if some_pad:
                g[~short] = 0
            if vmax < length:
                full = np.zeros((W, length) + b.shape[2:], b.dtype)
                full[:, :vmax] = g
                g = full
            out[k] = g
        return out, mask


def _specs_of_batch(arrays, what: str, n: int) -> dict:
    """Per-row specs of a flat batch (field -> array with a leading batch axis of n)."""
    specs = {}
    for k, a in arrays.items():
        a = np.asarray(a)
        if a.ndim < 1:
            raise SpecError(mismatch(what, k, f"an array with a batch axis of {n}", f"shape {a.shape}"))
        specs[k] = ArraySpec(a.shape[1:], a.dtype)
    return specs
