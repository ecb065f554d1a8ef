"""Table checkpoints: a directory of .npy files and one JSON file, written atomically.

    <dir>/table.json        format, capacity, max_times_sampled, specs, counters, next key, ring
                            (whether the table was in ring mode, see Table), and for
                            the sampler, remover and rate limiter: class, constructor config, state
                            (scalars, including numpy Generator states)
    <dir>/slot_keys.npy     key of each slot (-1: free)           [capacity] int64
    <dir>/times.npy         times each slot's item was sampled    [capacity] int64
    <dir>/priorities.npy    priority of each slot's item          [capacity] float64
    <dir>/free.npy          the free-slot stack (bottom first)    [n_free] int64
    <dir>/field_<i>.npy     field i of the live slots, in slot order
    <dir>/<part>.<name>.npy array entries of a selector's state_dict

The files are written into a temporary directory beside <dir>, then renamed into place
(`os.replace`), so a crash leaves either the old checkpoint or the new one, never half of one.
The same table state always gives the same bytes (sorted JSON keys, np.save), so
save -> load -> save gives identical files.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import json
import os
import pickle
import shutil
import uuid

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

import numpy as np

from rlflow.errors import UsageError, mismatch
from rlflow.specs import ArraySpec

FORMAT = 1


def _class_path(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def _import(path: str):
    module, _, qualname = path.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _jsonable(v):
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _part(name, obj, tmp) -> dict:
    """Describe a selector / rate limiter; its array state goes to <name>.<key>.npy files."""
    entry = {"class": _class_path(obj)}
    if hasattr(obj, "config"):
        entry["config"] = _jsonable(obj.config())
    else:  # a user's class without config(): pickle the object itself
        with open(os.path.join(tmp, f"{name}.pkl"), "wb") as f:
            pickle.dump(obj, f, protocol=4)
    state, arrays = {}, []
    for k, v in obj.state_dict().items():
        if isinstance(v, np.ndarray):
            np.save(os.path.join(tmp, f"{name}.{k}.npy"), v, allow_pickle=False)
            arrays.append(k)
        else:
            state[k] = _jsonable(v)
            try:
                json.dumps(state[k])
            except (TypeError, ValueError) as exc:
                raise UsageError(mismatch("checkpoint", f"{name} {type(obj).__name__}.state_dict()[{k!r}]",
                                          "a numpy array or a JSON value (numbers, strings, lists, dicts)",
                                          f"{type(v).__name__}: {exc}")) from None
    entry["state"] = state
    entry["arrays"] = sorted(arrays)
    return entry


def _restore_part(name, entry, directory, load_npy=np.load):
    try:
        if "config" in entry:
            obj = _import(entry["class"])(**entry["config"])
        else:
            with open(os.path.join(directory, f"{name}.pkl"), "rb") as f:
                obj = pickle.load(f)
    except (ImportError, AttributeError) as exc:     # the file is fine: the class is not here
        raise UsageError(mismatch("checkpoint", f"{name} class", f"{entry['class']} importable in this "
                                  "program (define it in a module, not in the script that saved the table)",
                                  f"{type(exc).__name__}: {exc}")) from None
    state = dict(entry["state"])
    for k in entry["arrays"]:
        state[k] = load_npy(os.path.join(directory, f"{name}.{k}.npy"), allow_pickle=False)
    return obj, state


def _path(directory, what: str) -> str:
    try:
        d = os.fspath(directory)
    except TypeError:
        raise UsageError(mismatch(what, "directory", "a path (str or os.PathLike)", repr(directory))) from None
    if isinstance(d, bytes):
        d = os.fsdecode(d)
    if not d.strip():
        raise UsageError(mismatch(what, "directory", "a path", repr(directory)))
    return os.path.abspath(d)


def _check_target(target, directory) -> None:
    if os.path.lexists(target) and not (os.path.isdir(target) and not os.path.islink(target)
                                        and (os.path.exists(os.path.join(target, "table.json"))
                                             or not os.listdir(target))):
        # a save replaces an older table checkpoint (or an empty directory), never anything else:
        # what it replaces is deleted
        kind = ("a file" if os.path.isfile(target) else "a link" if os.path.islink(target)
                else "a directory holding other files and no table checkpoint (no table.json)")
        raise UsageError(mismatch("Table.save", "directory", "a new or empty directory, or a table "
                                  "checkpoint to replace", f"{directory!r}, {kind}"))


@contextlib.contextmanager
def _dir_lock(parent: str, exclusive: bool):
    """An flock on the directory that holds a checkpoint: saves (exclusive) swap their renames one
    at a time and a load (shared) never reads a checkpoint mid-swap, across threads and processes.
    (Concurrent saves to one path failed with raw FileNotFoundError / ENOTEMPTY from each other's
    renames.) Locks nothing where flock is missing (not POSIX) or refused (a parent that does not
    exist yet or cannot be read, a file system without flock)."""
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(parent, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError:
            # a parent this user may write but not read (mode 0733), a file system without flock
            # (some NFS: ENOLCK, EOPNOTSUPP): saves and loads go on unlocked, as they did before
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)              # releases the lock


def save(table, directory) -> None:
    target = _path(directory, "Table.save")
    parent, base = os.path.split(target)
    with _dir_lock(parent, exclusive=False):         # not mid-way through another save's renames
        _check_target(target, directory)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex}")
    os.mkdir(tmp)
    try:
        with table._lock:
            _write(table, tmp)
        _fsync_dir_files(tmp)
        with _dir_lock(parent, exclusive=True):     # another save's renames are not interleaved
            _check_target(target, directory)        # (what is there may have changed meanwhile)
            old = None
            if os.path.exists(target):
                old = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex}")
                os.replace(target, old)
            os.replace(tmp, target)
            if old is not None:        # by name: a parent this user cannot list hides it from glob
                shutil.rmtree(old, ignore_errors=True)
            # the new checkpoint is in place: the one it replaced goes, and so does any left by a
            # save that died between its two renames (`load` falls back to those only while no
            # target exists)
            for stale in glob.glob(os.path.join(parent, f".{base}.old-*")):
                shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # and the half-written copies of saves whose process died (killed mid-save: its `except`
    # never ran); a save still running in a live process keeps its own
    for partial in glob.glob(os.path.join(parent, f".{base}.tmp-*")):
        if not _writer_alive(partial[len(os.path.join(parent, f".{base}.tmp-")):]):
            shutil.rmtree(partial, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                      # alive, another user's
        return True
    return True


def _writer_alive(tail: str) -> bool:
    """Whether the process that named a '.tmp-<pid>-<hex>' folder may still be writing it."""
    pid = tail.split("-", 1)[0]
    if not pid.isdigit():
        return False                     # not a name `save` gives
    pid = int(pid)
    if pid == os.getpid():
        return True                      # another thread's save may be running
    return pid_alive(pid)


def _fsync_dir_files(d):
    for name in sorted(os.listdir(d)):
        fd = os.open(os.path.join(d, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write(table, tmp):
    if table._ring_mode:  # the general structures, from the ring (the table stays in ring mode)
        table._materialize()
    if table._specs is None:
        specs, fields = None, []
    else:
        fields = list(table._specs)
        specs = {k: {"shape": list(s.shape), "dtype": s.dtype.str} for k, s in table._specs.items()}
    live = np.flatnonzero(table._slot_key >= 0)
    np.save(os.path.join(tmp, "slot_keys.npy"), table._slot_key, allow_pickle=False)
    np.save(os.path.join(tmp, "times.npy"), table._times, allow_pickle=False)
    np.save(os.path.join(tmp, "priorities.npy"), table._prio, allow_pickle=False)
    np.save(os.path.join(tmp, "free.npy"), table._free[:table._nfree], allow_pickle=False)
    for i, name in enumerate(fields):
        np.save(os.path.join(tmp, f"field_{i}.npy"), table._storage[name][live], allow_pickle=False)
    meta = {
        "format": FORMAT,
        "capacity": table.capacity,
        "max_times_sampled": table.max_times_sampled,
        "fields": fields,
        "specs": specs,
        "next_key": table._next_key,
        "ring": bool(table._ring_mode),
        "budget": table._budget,
        "stats": _jsonable(table._stats),
        "sampler": _part("sampler", table.sampler, tmp),
        "remover": _part("remover", table.remover, tmp),
        "rate_limiter": _part("rate_limiter", table.rate_limiter, tmp),
    }
    with open(os.path.join(tmp, "table.json"), "w") as f:
        json.dump(meta, f, sort_keys=True, indent=1)
        f.write("\n")


def load(cls, directory):
    """The table saved in `directory`; a file that is missing, truncated or corrupt is a UsageError
    naming it."""
    directory = _path(directory, "Table.load")
    reading = [os.path.join(directory, "table.json")]
    parent = os.path.dirname(directory)
    try:
        with _dir_lock(parent, exclusive=False):
            return _load(cls, directory, reading)
    except UsageError:
        raise
    except Exception as e:
        raise damaged(reading[0], e, "table checkpoint file") from e


def damaged(path: str, e: BaseException, what: str = "checkpoint") -> UsageError:
    """The error for a checkpoint file that cannot be read (truncated, corrupt or missing)."""
    return UsageError(mismatch(what, path, "a complete, readable file", f"{type(e).__name__}: {e}"))


def _load(cls, directory, reading):
    """`load`; `reading[0]` is the path of the file being read, for the error."""
    def load_npy(path, **kw):
        reading[0] = path
        return np.load(path, **kw)

    if not os.path.exists(os.path.join(directory, "table.json")):
        parent, base = os.path.split(directory)
        # a save died between its renames: the checkpoint it moved aside is the newest good one
        olds = [d for d in glob.glob(os.path.join(parent, f".{base}.old-*"))
                if os.path.exists(os.path.join(d, "table.json"))]
        if not olds:
            raise UsageError(f"no table checkpoint in {directory!r} (table.json is missing)")
        directory = max(olds, key=lambda d: os.path.getmtime(os.path.join(d, "table.json")))
    reading[0] = os.path.join(directory, "table.json")
    with open(os.path.join(directory, "table.json")) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise UsageError(f"table checkpoint format {meta.get('format')!r} in {directory!r}, expected {FORMAT}")
    sampler, s_state = _restore_part("sampler", meta["sampler"], directory, load_npy)
    remover, r_state = _restore_part("remover", meta["remover"], directory, load_npy)
    limiter, l_state = _restore_part("rate_limiter", meta["rate_limiter"], directory, load_npy)
    specs = None
    if meta["specs"] is not None:
        specs = {k: ArraySpec(meta["specs"][k]["shape"], np.dtype(meta["specs"][k]["dtype"])) for k in meta["fields"]}
    from rlflow.replay.table import _RESTORING

    _RESTORING.on = True      # a pickled user selector / limiter comes with the saved table's mark
    try:
        table = cls(meta["capacity"], sampler, remover, limiter, meta["max_times_sampled"], specs=specs)
    finally:
        _RESTORING.on = False
    sampler.load_state_dict(s_state)
    remover.load_state_dict(r_state)
    limiter.load_state_dict(l_state)
    slot_key = load_npy(os.path.join(directory, "slot_keys.npy"))
    table._slot_key[:] = slot_key
    table._times[:] = load_npy(os.path.join(directory, "times.npy"))
    table._prio[:] = load_npy(os.path.join(directory, "priorities.npy"))
    free = load_npy(os.path.join(directory, "free.npy"))
    table._free[:len(free)] = free
    table._nfree = len(free)
    table._free_sorted = bool(len(free) < 2 or (np.diff(free) < 0).all())
    live = np.flatnonzero(slot_key >= 0)
    for i, name in enumerate(meta["fields"]):
        table._storage[name][live] = load_npy(os.path.join(directory, f"field_{i}.npy"))
    table._next_key = int(meta["next_key"])
    table._reindex()
    table._budget = int(meta["budget"])
    table._stats = {k: int(v) for k, v in meta["stats"].items()}
    # the general structures now hold the state; ring mode again if the saved table was in it
    table._ring_mode = table._fast = False
    if meta.get("ring") and table._ring_consistent():
        table._ring_mode = True
        table._fast = table._fast_insert is not None
        table._ring_prio = bool((table._prio != 1.0).any())
    return table
