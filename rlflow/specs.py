"""Array specs: the shape and dtype of one item of a field, without the batch axis.

Specs come from Gymnasium spaces (`from_space`) and from a policy's extras (`from_extras`). Nested
spaces (Dict, Tuple) become named fields: a nested spec is a dict of specs, and `flatten` turns it
into flat field names joined with "/" (`obs/position`, `obs/0`), which is what tables store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Union

import numpy as np
from gymnasium import spaces

from rlflow.errors import SpecError, mismatch


@dataclass(frozen=True)
class ArraySpec:
    """The shape and dtype of one item of a field (no batch axis)."""

    shape: tuple
    dtype: np.dtype

    def __init__(self, shape=(), dtype=np.float32):
        try:
            dims = tuple(shape)
        except TypeError:
            raise SpecError(mismatch("ArraySpec", "shape", "a tuple of ints >= 0", repr(shape))) from None
        if not all(isinstance(d, (int, np.integer)) and not isinstance(d, (bool, np.bool_)) and d >= 0
                   for d in dims):
            raise SpecError(mismatch("ArraySpec", "shape", "a tuple of ints >= 0", repr(shape)))
        object.__setattr__(self, "shape", tuple(int(d) for d in dims))
        object.__setattr__(self, "dtype", np.dtype(dtype))

    def zeros(self, batch_shape=()) -> np.ndarray:
        """A zero array of this spec with `batch_shape` in front."""
        return np.zeros(tuple(batch_shape) + self.shape, dtype=self.dtype)

    def validate(self, array, field: str, batch_ndim: int = 1, what: str = "field") -> np.ndarray:
        """Return `array` if it has `batch_ndim` leading axes then this spec's shape and dtype.

        Raises SpecError naming the field, the expected and the actual shape or dtype. Python
        scalars and lists are accepted when they convert to the exact dtype without loss of kind;
        an array of another dtype of the same kind (int64 for int32, float64 for float32; signed
        and unsigned ints mix) when its values fit: one that would wrap or overflow to inf raises
        SpecError.
        """
        if isinstance(array, Mapping):            # a nested dict for a flat field (np.asarray: shape ())
            expected = ("B",) * batch_ndim + self.shape
            raise SpecError(mismatch(what, field, f"an array of shape {_fmt_shape(expected)}",
                                     f"a dict with keys {sorted(map(str, array))} (nested data: flatten it "
                                     f"with rf.specs.flatten, fields '{field}/<key>')"))
        a = np.asarray(array)
        if a.shape[batch_ndim:] != self.shape or a.ndim != batch_ndim + len(self.shape):
            expected = ("B",) * batch_ndim + self.shape
            raise SpecError(mismatch(what, field, f"shape {_fmt_shape(expected)}", f"shape {a.shape}"))
        if a.dtype != self.dtype:
            ints = a.dtype.kind in "iu" and self.dtype.kind in "iu"     # signed and unsigned mix when values fit
            if not ints and (not np.can_cast(a.dtype, self.dtype, casting="same_kind")
                             or a.dtype.kind != self.dtype.kind):
                raise SpecError(mismatch(what, field, f"dtype {self.dtype}", f"dtype {a.dtype}"))
            check_values_fit(a, self.dtype, field, what)
        return a

    def __repr__(self):
        return f"ArraySpec(shape={self.shape}, dtype={self.dtype.name})"


Spec = Union[ArraySpec, Mapping[str, "Spec"]]


def check_values_fit(a: np.ndarray, dtype: np.dtype, field: str, what: str = "field") -> None:
    """SpecError naming the field unless `a`'s values survive a cast to `dtype` where that dtype
    cannot hold all of `a.dtype`'s (int64 to int32, int to uint8, float64 to float32): an int out
    of `dtype`'s range would wrap, a finite float beyond it would become inf. Nothing is read
    where the cast is safe (the usual case) or `a` is empty."""
    if not a.size or np.can_cast(a.dtype, dtype, casting="safe"):
        return
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = a.min(), a.max()
        if lo < info.min or hi > info.max:
            raise SpecError(mismatch(what, field, f"dtype {dtype} (values in [{info.min}, {info.max}])",
                                     f"dtype {a.dtype} with values in [{lo}, {hi}]"))
    elif dtype.kind == "f":
        big = np.abs(a[np.isfinite(a)])
        limit = np.finfo(dtype).max
        if big.size and big.max() > limit:
            raise SpecError(mismatch(what, field, f"dtype {dtype} (finite values up to {limit:.4g})",
                                     f"dtype {a.dtype} with a finite value of {big.max():.4g}"))


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def from_space(space: spaces.Space, _at: str = "") -> Spec:
    """The spec of one element of a Gymnasium space.

    Box -> its shape and dtype; Discrete -> () of the space's dtype (int64 by default);
    MultiDiscrete -> nvec's shape, its dtype (int64 by default); MultiBinary -> its shape, int8;
    Dict -> {key: spec}; Tuple -> {"0": spec, "1": spec, ...}. Any other space (Text, Graph,
    Sequence, OneOf) has no fixed-size array and raises SpecError, naming where it sits in a Dict
    or Tuple ("inner/caption").
    """
    if isinstance(space, spaces.Box):
        return ArraySpec(space.shape, space.dtype)
    if isinstance(space, spaces.Discrete):
        return ArraySpec((), space.dtype or np.int64)
    if isinstance(space, spaces.MultiDiscrete):
        return ArraySpec(space.nvec.shape, space.dtype or np.int64)
    if isinstance(space, spaces.MultiBinary):
        return ArraySpec(space.shape, space.dtype or np.int8)
    if isinstance(space, spaces.Dict):
        return {str(k): from_space(s, f"{_at}/{k}" if _at else str(k)) for k, s in space.spaces.items()}
    if isinstance(space, spaces.Tuple):
        return {str(i): from_space(s, f"{_at}/{i}" if _at else str(i)) for i, s in enumerate(space.spaces)}
    where = f" at {_at!r}" if _at else ""
    raise SpecError(
        mismatch("space", type(space).__name__,
                 "Box, Discrete, MultiDiscrete, MultiBinary, Dict or Tuple (fixed-size arrays)",
                 f"{space!r}{where}, which has no array spec")
    )


def from_extras(extras: Mapping[str, Any] | None, batch_ndim: int = 1) -> dict[str, ArraySpec]:
    """Specs of a policy's extras, from one batched example (field -> array with a batch axis).

    Nested dicts are flattened into "a/b" names, like observations.
    """
    if not extras:
        return {}
    out = {}
    for name, value in flatten(extras).items():
        a = np.asarray(value)
        if a.ndim < batch_ndim:
            raise SpecError(mismatch("extras field", name, f"an array with {batch_ndim} batch axis",
                                     f"shape {a.shape}"))
        out[name] = ArraySpec(a.shape[batch_ndim:], a.dtype)
    return out


def flatten(tree, prefix: str = "") -> dict:
    """Flatten nested dicts / tuples / lists of arrays (or specs) into {"prefix/key": leaf}.

    A leaf at the top level is returned as {prefix: leaf}.
    """
    out: dict = {}
    _flatten_into(tree, prefix, out)
    return out


def _flatten_into(tree, prefix, out):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            _flatten_into(v, f"{prefix}/{k}" if prefix else str(k), out)
    elif (isinstance(tree, (tuple, list)) and not isinstance(tree, ArraySpec)
          and not (tree and all(isinstance(v, (int, float, bool, np.generic)) for v in tree))):
        # a list (or tuple) of numbers is one batched leaf, not fields "0", "1", ...
        for i, v in enumerate(tree):
            _flatten_into(v, f"{prefix}/{i}" if prefix else str(i), out)
    else:
        out[prefix] = tree


def unflatten(flat: Mapping[str, Any], prefix: str):
    """Inverse of `flatten` for one prefix: `unflatten(batch, "obs")` gives the nested observation.

    Returns the leaf itself when `prefix` names a leaf. Tuple spaces come back as dicts keyed "0", "1"...
    """
    if prefix in flat:
        return flat[prefix]
    head = prefix + "/"
    out: dict = {}
    for name, value in flat.items():
        if not name.startswith(head):
            continue
        parts = name[len(head):].split("/")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    if not out:
        raise SpecError(mismatch("field", prefix, f"one of {sorted(flat)}", "no such field"))
    return out


def batch_rows(items: Mapping[str, Any]) -> int:
    """The rows of a batch of items (dict field -> array with a leading batch axis)."""
    return len(next(iter(items.values())))


def zeros(spec: Spec, batch_shape=()):
    """Zero arrays shaped like `spec` (nested like it) with `batch_shape` in front."""
    if isinstance(spec, ArraySpec):
        return spec.zeros(batch_shape)
    return {k: zeros(s, batch_shape) for k, s in spec.items()}


def validate_batch(data: Mapping[str, Any], specs: Mapping[str, ArraySpec], what: str = "field",
                   batch_ndim: int = 1) -> dict[str, np.ndarray]:
    """Check a flat batch (field -> array) against flat specs: same fields, shapes, dtypes and one
    common batch size. Returns the arrays; raises SpecError naming the first difference."""
    missing = [k for k in specs if k not in data]
    extra = [k for k in data if k not in specs]
    if missing or extra:
        field = (missing or extra)[0]
        raise SpecError(mismatch(what, field, f"fields {sorted(specs)}",
                                 f"fields {sorted(data)} (missing {missing}, unknown {extra})"))
    out = {}
    batch = None
    for name, spec in specs.items():
        a = spec.validate(data[name], name, batch_ndim=batch_ndim, what=what)
        if batch is None:
            batch = a.shape[:batch_ndim]
        elif a.shape[:batch_ndim] != batch:
            raise SpecError(mismatch(what, name, f"batch size {batch} like the other fields",
                                     f"batch size {a.shape[:batch_ndim]}"))
        out[name] = a
    return out


@dataclass(frozen=True)
class EnvSpec:
    """What a policy, an adder or a table needs to know of a vector env, before any data exists.

    `observation` / `action` are the specs of ONE env's observation and action (nested for Dict and
    Tuple spaces); `num_envs` is the number of rows a full step has (agents x envs for multi-agent).
    """

    observation: Spec
    action: Spec
    num_envs: int
    observation_space: Any = None
    action_space: Any = None
    agents: tuple = ()

    @classmethod
    def from_spaces(cls, observation_space, action_space, num_envs: int, agents=()) -> "EnvSpec":
        return cls(from_space(observation_space), from_space(action_space), int(num_envs),
                   observation_space, action_space, tuple(agents))
