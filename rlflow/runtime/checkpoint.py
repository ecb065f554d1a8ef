"""Whole-run checkpoints: write the state of a run, and resume it where it stopped.

    rf.run(experiment, max_env_steps=50_000, checkpoint_dir="ckpt", checkpoint_every=1_000)
    rf.run(experiment, max_env_steps=100_000, resume="ckpt")        # carries on from the last one

`checkpoint_every` counts LEARNER STEPS (an int): learner steps are where the learner's state
changes, and counting them makes checkpoints land at the same points on every run of the local
runtime. A checkpoint is also written when the run ends normally (limit or target reached); a run
stopped by Ctrl-C, SIGTERM or an error keeps its last checkpoint and writes none mid-step.

A checkpoint directory holds numbered checkpoints and a pointer to the newest complete one:

    ckpt/LATEST                 "ckpt-000003"  (replaced atomically, after the checkpoint is complete)
    ckpt/ckpt-000003/run.pkl    counters, RNG states (pickle)
                    /run.json   the same counters, readable
                    /learner.pkl   learner.state_dict() (pickle; torch tensors are fine)
                    /table/        Table.save (the replay format: data, keys, priorities, selectors)

Each checkpoint is written into a temporary directory, fsynced, renamed into place (`os.replace`),
and only then named in LATEST (itself written to a temporary file and `os.replace`d). A crash at any
point leaves LATEST naming a complete checkpoint; the two newest are kept. `resume=` takes the
checkpoint directory (LATEST is followed) or one `ckpt-*` directory.

What is saved and restored:
  counters      env steps (total and per actor), learner steps, episodes, parameter version,
                how many times the run was resumed
  RNG states    Python's `random`, numpy's global RNG, torch's (only if torch is imported:
                found through sys.modules, rlflow never imports it), and the local runtime's actor
                warm-up RNG. Actor processes seed their warm-up RNG from (seed, actor, resume) instead.
  learner       `learner.state_dict()`, restored with `load_state_dict`
  table         its contents, keys, priorities, selector and rate limiter state (byte for byte)
  in flight     the process runtime's items that actors had published into their rings and the
                table had not taken yet (up to a ring per actor when the rate limiter holds inserts
                back): a resumed run inserts them first, as its rate limiter admits, on either
                backend. The ring slots are read under the same gate as the table, so no item is
                saved twice or left out.
Not saved: environments' internal state (an env is not generally serializable): a resumed run
starts fresh episodes, with seeds that differ from the first run's; adders' partial windows (an
n-step window, a sequence, a rollout fragment: the steps of an episode the stop cut); the rows of
the one step an actor could not publish when the run stopped (`items_in_flight` in the final
figures counts them with the rings' items; they are not in the checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from rlflow.errors import UsageError, is_int, mismatch
from rlflow.logging import usable_dir
from rlflow.replay.checkpoint import damaged, pid_alive
from rlflow.specs import batch_rows

LATEST = "LATEST"
FORMAT = 1
KEEP = 2


@dataclass
class RunState:
    """A loaded checkpoint."""

    path: str
    counters: dict
    rng: dict
    learner_state: Any
    table: Any
    adder: Optional[str] = None       # adder_config of the run's adder (None: a checkpoint that has none)
    in_flight: list = field(default_factory=list)   # items made and not yet in the table (dicts field -> array)


def check_options(checkpoint_dir, checkpoint_every, resume) -> Optional[int]:
    """Validate the run's checkpoint options up front; returns checkpoint_every (int or None)."""
    if checkpoint_every is not None:
        if checkpoint_dir is None:
            raise UsageError(mismatch("run", "checkpoint_every", "given together with checkpoint_dir",
                                      f"{checkpoint_every!r} without a checkpoint_dir"))
        if not is_int(checkpoint_every) \
                or checkpoint_every < 1:
            raise UsageError(mismatch("run", "checkpoint_every", "an int >= 1 (learner steps)",
                                      repr(checkpoint_every)))
        checkpoint_every = int(checkpoint_every)
    if checkpoint_dir is not None:
        d = usable_dir("checkpoint_dir", checkpoint_dir)
        if os.path.exists(os.path.join(d, "run.pkl")):
            # one checkpoint (ckpt-*), not a directory of them: new checkpoints would go inside it,
            # and a later resume= of it would find its own run.pkl first and load the old state
            raise UsageError(mismatch("run", "checkpoint_dir", "a directory of checkpoints (where LATEST and "
                                      "ckpt-* are written; resume= takes it too)",
                                      f"{os.fspath(checkpoint_dir)!r}, which is one checkpoint (it holds "
                                      f"run.pkl): give its parent {os.path.dirname(os.path.abspath(d))!r}"))
    if resume is not None:
        try:
            os.fspath(resume)
        except TypeError:
            raise UsageError(mismatch("run", "resume", "a checkpoint directory (str or os.PathLike)",
                                      repr(resume))) from None
        find(resume)           # raises if there is nothing to resume from
    return checkpoint_every


def find(directory) -> str:
    """The complete checkpoint that `directory` names (a checkpoint dir, or one with LATEST)."""
    d = os.path.abspath(os.fsdecode(os.fspath(directory)))
    if os.path.exists(os.path.join(d, "run.pkl")):
        return d
    latest = os.path.join(d, LATEST)
    if os.path.exists(latest):
        name = _read_latest(latest)
        path = os.path.join(d, name) if name else None
        if path is not None and os.path.exists(os.path.join(path, "run.pkl")):
            return path
        what = ("which is not a checkpoint name" if path is None or os.path.dirname(name) else
                "which is incomplete (no run.pkl)" if os.path.isdir(path) else "which is missing")
        raise UsageError(mismatch("resume", directory, "a checkpoint directory whose LATEST names a "
                                  "complete checkpoint", f"LATEST -> {name!r}, {what}"))
    raise UsageError(mismatch("run", "resume", "a checkpoint directory (with LATEST or run.pkl)",
                              f"{directory!r}, which holds no checkpoint"))


# ---- RNG states ------------------------------------------------------------------------------
def capture_rng(actor_rng: Optional[np.random.Generator] = None) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state()}
    torch = sys.modules.get("torch")
    if torch is not None:
        state["torch"] = torch.get_rng_state()
    if actor_rng is not None:
        state["actor"] = actor_rng.bit_generator.state
    return state


def restore_rng(state: dict, actor_rng: Optional[np.random.Generator] = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch = sys.modules.get("torch")
    if torch is not None and "torch" in state:
        torch.set_rng_state(state["torch"])
    if actor_rng is not None and "actor" in state:
        actor_rng.bit_generator.state = state["actor"]


# ---- writing -----------------------------------------------------------------------------------
def _fsync_tree(d):
    for root, _, files in os.walk(d):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _read_latest(path) -> Optional[str]:
    """LATEST's checkpoint name, or None where the file is not one line of text."""
    try:
        with open(path, encoding="utf-8") as f:
            name = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if name and "\n" not in name and "\x00" not in name else None


def _number(name) -> int:
    try:
        return int(str(name).rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return 0


def _sequence(directory) -> int:
    """The newest checkpoint number: LATEST's, or a higher one on disk (a save that LATEST never
    named, or a LATEST that is not text), so that a new save never takes an existing name."""
    latest = os.path.join(directory, LATEST)
    seq = _number(_read_latest(latest)) if os.path.exists(latest) else 0
    on_disk = [_number(n) for n in os.listdir(directory) if n.startswith("ckpt-")]
    return max([seq] + on_disk)


def adder_config(adder) -> str:
    """What a checkpoint records of the run's adder, to refuse a resume with another: its repr
    (rlflow's adders show their arguments: 'NStepTransition(n=3, discount=0.99)'), or its class
    where the repr is object's (an address)."""
    if type(adder).__repr__ is object.__repr__:
        return f"{type(adder).__module__}.{type(adder).__qualname__}"
    return repr(adder)


def check_resumed_adder(state: Optional[RunState], adder) -> None:
    """The table's items were made by the checkpoint's adder: another (another n, discount, length,
    or class) would mix items of two meanings in one table, so it is a UsageError naming both."""
    if state is None or state.adder is None:
        return
    want = adder_config(adder)
    if want != state.adder:
        raise UsageError(mismatch("resume", "adder", f"{state.adder} as in the checkpoint (its table holds "
                                  "that adder's items)", f"{want} in the experiment"))


def save_run(directory, *, learner, table, counters: dict, rng: dict, keep: int = KEEP,
             supersede: bool = False, adder=None, in_flight=()) -> str:
    """Write one checkpoint into `directory` atomically; returns its path. `in_flight`: items the
    actors made that are not in the table yet (dicts field -> array, in insertion order): a resume
    inserts them before any new item, so no item is lost or doubled. `supersede` (a run's
    final checkpoint): the newest one before it goes once this one is in place if it was taken at
    the same learner step (a periodic checkpoint the run ended on), so the `keep` kept are
    distinct steps."""
    directory = os.path.abspath(os.fsdecode(os.fspath(directory)))
    os.makedirs(directory, exist_ok=True)
    previous = None
    if supersede:
        try:
            previous = find(directory)
            with open(os.path.join(previous, "run.json")) as f:
                if json.load(f)["counters"]["learner_steps"] != counters["learner_steps"]:
                    previous = None
        except (UsageError, OSError, KeyError, ValueError):
            previous = None
    seq = _sequence(directory) + 1
    name = f"ckpt-{seq:06d}"
    tmp = os.path.join(directory, f".tmp-{name}-{uuid.uuid4().hex}")
    learner_state = learner.state_dict()   # the user's errors stay theirs (outside the write's handling)
    try:
        os.mkdir(tmp)
        with open(os.path.join(tmp, "learner.pkl"), "wb") as f:
            pickle.dump(learner_state, f, protocol=pickle.HIGHEST_PROTOCOL)
        table.save(os.path.join(tmp, "table"))
        in_flight = [dict(items) for items in in_flight]
        counters = dict(counters, items_in_flight=sum(batch_rows(i) for i in in_flight if i))
        meta = {"format": FORMAT, "counters": counters, "rng": rng, "in_flight": in_flight}
        if adder is not None:
            meta["adder"] = adder_config(adder)
        with open(os.path.join(tmp, "run.pkl"), "wb") as f:
            pickle.dump(meta, f, protocol=pickle.HIGHEST_PROTOCOL)
        with open(os.path.join(tmp, "run.json"), "w") as f:
            json.dump({"format": FORMAT, "counters": _jsonable(counters)}, f, indent=1, sort_keys=True)
        _fsync_tree(tmp)
        final = os.path.join(directory, name)
        if os.path.exists(final):            # a leftover of a crash before LATEST moved on
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:                  # a full disk, a quota: say what was being written
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            free = f"{shutil.disk_usage(directory).free / 2**20:,.1f} MiB free there"
        except OSError:
            free = "free space unknown"
        kept = _read_latest(os.path.join(directory, LATEST))
        e.add_note(f"(writing checkpoint {name} into {directory} failed, {free}; " +
                   (f"the last complete checkpoint, {kept}, is kept)" if kept else "no earlier checkpoint there)"))
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = os.path.join(directory, f".{LATEST}.{uuid.uuid4().hex}")
    with open(pointer, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, os.path.join(directory, LATEST))
    if previous is not None and os.path.abspath(previous) != final:
        _remove(previous)
    _prune(directory, keep, name)
    return final


def _prune(directory, keep, newest):
    """Keep the `keep` newest checkpoints up to `newest`; also remove what saves killed before
    their rename left (".tmp-ckpt-*", ".LATEST.*"): a good save is in place, they are garbage."""
    names = sorted(n for n in os.listdir(directory) if n.startswith("ckpt-") and n <= newest)
    for n in names[:-keep] if keep > 0 else []:
        _remove(os.path.join(directory, n))
    for n in os.listdir(directory):
        if n.startswith(".tmp-ckpt-"):
            shutil.rmtree(os.path.join(directory, n), ignore_errors=True)
        elif n.startswith(f".{LATEST}."):
            try:
                os.remove(os.path.join(directory, n))
            except OSError:
                pass


def _remove(path):
    """Delete a checkpoint: renamed to a '.tmp-' name first (one atomic step), so that a Ctrl-C
    during the deletion leaves garbage the next save clears, never a half-deleted 'ckpt-*'."""
    doomed = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}-{uuid.uuid4().hex}")
    try:
        os.replace(path, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


LOCK_NAME = ".rlflow-run.lock"


@contextlib.contextmanager
def claimed(checkpoint_dir):
    """Hold `checkpoint_dir` for one run (an exclusive flock on a lock file in it, removed at the
    end): a second run given the same directory is a UsageError naming the process that writes
    there. (Two runs in one directory each pruned the other's checkpoints, and failed with errors
    that spoke of damaged files or a full disk.) Where flock is not supported it goes on unheld."""
    if checkpoint_dir is None:
        yield
        return
    import fcntl

    path = os.path.join(os.path.abspath(os.fsdecode(os.fspath(checkpoint_dir))), LOCK_NAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            if other.isdigit() and not pid_alive(int(other)):
                # held by a forked child (an env worker) of a run that died: it follows its parent
                # within moments; the run that wrote there is gone, so go on unheld
                fd = None
                break
            raise UsageError(mismatch("run", "checkpoint_dir", "a directory no other running run writes its "
                                      "checkpoints into", f"{os.path.dirname(path)!r}, where process {other} "
                                      "does (resume= may read it once that run has stopped)")) from None
        except OSError:               # no flock on this filesystem: unheld, as before
            os.close(fd)
            fd = None
            break
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:    # not a file the last holder removed
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    if fd is None:
        yield
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        try:
            os.unlink(path)           # while held: whoever opens it next opens a new file
        except OSError:
            pass
        os.close(fd)


# ---- reading -----------------------------------------------------------------------------------
def load_run(directory) -> RunState:
    from rlflow.replay import Table

    path = find(directory)
    reading = "run.pkl"
    try:
        with open(os.path.join(path, "run.pkl"), "rb") as f:
            meta = pickle.load(f)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            fmt = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise UsageError(mismatch("checkpoint", path, f"format {FORMAT}", f"format {fmt!r}"))
        counters, rng = meta["counters"], meta["rng"]
        reading = "learner.pkl"
        with open(os.path.join(path, "learner.pkl"), "rb") as f:
            learner_state = pickle.load(f)
    except UsageError:
        raise
    except Exception as e:         # truncated, corrupt or missing: name the file
        _check_not_pruned(path, directory)
        raise damaged(os.path.join(path, reading), e) from e
    try:
        table = Table.load(os.path.join(path, "table"))     # names a damaged file of its own
    except Exception:
        _check_not_pruned(path, directory)
        raise
    return RunState(path=path, counters=counters, rng=rng, learner_state=learner_state, table=table,
                    adder=meta.get("adder"), in_flight=list(meta.get("in_flight") or []))


def _check_not_pruned(path, directory) -> None:
    """A checkpoint that went away while it was read was pruned by a run writing into its
    directory (not damaged): a UsageError that says so."""
    if not os.path.isdir(path):
        raise UsageError(mismatch("run", "resume", "a checkpoint directory no running run prunes",
                                  f"{os.fspath(directory)!r}, whose {os.path.basename(path)} was removed while "
                                  "it was read (a run writing checkpoints there keeps the newest two; "
                                  "resume from it once that run has stopped)")) from None


def resumed_table(state: Optional[RunState], built, adder):
    """The table a run goes on with: the one it built (`built`, from the experiment), or when it
    resumes, the checkpoint's, once `check_resumed_adder` found the experiment's `adder` the one
    that made its items and `check_resumed_table` the two tables configured alike."""
    if state is None:
        return built
    check_resumed_adder(state, adder)
    check_resumed_table(state.table, built)
    return state.table


def check_resumed_table(saved, wanted) -> None:
    """A resumed run carries on with the checkpoint's table; the experiment's table (`wanted`, built
    as a fresh run would build it) must be configured the same: capacity, max_times_sampled, item
    specs, and sampler / remover / rate limiter classes and constructor arguments (seeds aside: the
    checkpoint's random state goes on). A difference is a UsageError naming it, never a run that
    silently keeps the old table."""
    def parts(t):
        out = {"capacity": t.capacity, "max_times_sampled": t.max_times_sampled}
        for name in ("sampler", "remover", "rate_limiter"):
            obj = getattr(t, name)
            config = obj.config() if hasattr(obj, "config") else {}
            config = {k: v for k, v in _jsonable(config).items() if k != "seed"}
            out[name] = f"{type(obj).__name__}({', '.join(f'{k}={v!r}' for k, v in sorted(config.items()))})"
        out["specs"] = t.specs
        return out

    have, want = parts(saved), parts(wanted)
    for k in have:
        if want[k] is not None and have[k] is not None and have[k] != want[k]:
            raise UsageError(mismatch("resume", f"table {k}", f"{have[k]} as in the checkpoint (a resumed run "
                                      "carries on with its table)", f"{want[k]} in the experiment"))


def actor_bases(state: Optional[RunState], num_actors: int) -> list[dict]:
    """Where each actor's counters start: zero, or the checkpoint's per-actor counters (when the
    checkpoint had as many actors; else actor 0 carries the totals)."""
    zero = {"env_steps": 0, "episodes": 0, "items": 0, "rng_state": None}
    out = [dict(zero) for _ in range(num_actors)]
    if state is None:
        return out
    c = state.counters
    per = c.get("actors") or []
    if len(per) == num_actors:
        return [dict(zero, **{k: v for k, v in p.items() if k in zero}) for p in per]
    out[0].update(env_steps=int(c["env_steps"]), episodes=int(c["episodes"]),
                  items=sum(int(p.get("items", 0)) for p in per))
    return out


# ---- the local runtime's side (kept here so local.py stays short) --------------------------------
def env_seed(seed: int, state: Optional[RunState]) -> int:
    """The seed of the envs' first reset: the experiment's, or a different one per resume."""
    return int(seed) if state is None else int(seed) + 1_000_000_007 * (int(state.counters["resumes"]) + 1)


def resume_local(state: Optional[RunState], learner, actor, driver) -> int:
    """Restore the learner and the counters of a one-actor run; returns the resume count."""
    if state is None:
        return 0
    learner.load_state_dict(state.learner_state)
    c = state.counters
    driver.steps = int(c["learner_steps"])
    base = actor_bases(state, 1)[0]
    actor.env_steps = int(base["env_steps"])
    actor.items_added = int(base["items"])
    actor.stats.episodes = int(base["episodes"])
    return int(c["resumes"]) + 1


def save_local(directory, learner, table, actor, driver, store, resumes: int, final: bool = False,
               in_flight=(), items_lost: int = 0) -> str:
    """`items_lost`: what a process run's checkpoint counted lost before this run resumed it (carried
    on, so that items = inserts + in flight + lost holds along a chain of resumes)."""
    counters = {"items_lost": int(items_lost), "env_steps": int(actor.env_steps), "learner_steps": int(driver.steps),
                "episodes": int(actor.stats.episodes), "param_version": int(store.latest_version()),
                "resumes": int(resumes),
                "actors": [{"env_steps": int(actor.env_steps), "episodes": int(actor.stats.episodes),
                            "items": int(actor.items_added), "rng_state": None}]}
    return save_run(directory, learner=learner, table=table, counters=counters, rng=capture_rng(actor.rng),
                    supersede=final, adder=actor.adder, in_flight=in_flight)
