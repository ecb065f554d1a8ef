"""The local runtime: actor, table and learner in one process, one thread, deterministic for a seed
(except with env_backend="pool": its steps return whichever envs finished first).

    actor.reset()
    while not done:
        actor.step()                  # its items go to insert(): if the rate limiter refuses the
                                      # insert, the learner steps until it admits it
        learn while table.can_sample(batch_size)   # a limiter with a ratio (SampleToInsertRatio, Queue)
                                      # sets how much; one with none (MinSize): one learner step
        actor.update_params()         # the policy delayer: every param_sync_steps learner steps

A limiter that refuses both the insert and the sample would block forever in one thread: that is
reported as a UsageError naming the limiter's state.
"""

from __future__ import annotations

import time


from rlflow.actor import Actor
from rlflow.core import Learner, Policy
from rlflow.errors import UsageError, WorkerDied
from rlflow.experiment import (Experiment, RunResult, build, build_table, extras_specs_of, fresh_adder,
                               make_venv, seed_all)
from rlflow.runtime import checkpoint as ckpt
from rlflow.runtime.common import (Evaluator, Figures, LearnerDriver, Limits, check_batch_size, close_or_warn,
                                   HeldStop, make_logger, scalar_metrics, warn_unsaved_learner)
from rlflow.sync import ParamClient, ParamStore
from rlflow.specs import batch_rows


def run_local(experiment: Experiment, max_env_steps=None, max_learner_steps=None, max_seconds=None,
              log_dir=None, progress=True, progress_every=2.0, checkpoint_dir=None, checkpoint_every=None,
              resume=None, max_restarts=None) -> RunResult:
    """`checkpoint_dir` / `checkpoint_every` (learner steps) / `resume`: see rlflow.runtime.checkpoint.
    `max_restarts` is accepted so a call runs unchanged on either backend; one process has no actor
    process to restart."""
    start = time.monotonic()
    checkpoint_every = ckpt.check_options(checkpoint_dir, checkpoint_every, resume)
    # no other run writes checkpoints there while this one does; a Ctrl-C / SIGTERM is held until
    # the run has written its last checkpoint
    with ckpt.claimed(checkpoint_dir), HeldStop(checkpoint_dir) as held:
        return _run(experiment, start, max_env_steps, max_learner_steps, max_seconds, log_dir, progress,
                    progress_every, checkpoint_dir, checkpoint_every, resume, held)


def _run(exp, start, max_env_steps, max_learner_steps, max_seconds, log_dir, progress, progress_every,
         checkpoint_dir, checkpoint_every, resume, held) -> RunResult:
    resumed = ckpt.load_run(resume) if resume is not None else None
    seed_all(exp.seed)
    venv = make_venv(exp)
    evaluator = None
    logger = make_logger(log_dir, progress, progress_every, resumed)
    try:
        spec = venv.spec
        policy = build(exp.policy, Policy, spec)
        learner = build(exp.learner, Learner, spec)
        warn_unsaved_learner(learner, checkpoint_dir)
        adder = fresh_adder(exp)
        store = ParamStore()
        client = ParamClient(store, every_learner_steps=exp.param_sync_steps,
                             every_seconds=exp.param_sync_seconds)
        actor = Actor(policy, venv, adder, sink=None, warmup_steps=exp.warmup_steps,
                      seed=ckpt.env_seed(exp.seed, resumed), param_client=client)
        first = actor.reset()
        table = ckpt.resumed_table(resumed, build_table(exp, spec, lambda: extras_specs_of(policy, spec, first)),
                                   exp.adder)
        check_batch_size(table, exp.batch_size, "local")
        driver = LearnerDriver(learner, table, exp.batch_size, store, exp.param_sync_steps,
                              publish_seconds=exp.param_sync_seconds)
        resumes = ckpt.resume_local(resumed, learner, actor, driver)   # counters go on from the checkpoint
        driver.publish()                      # version 0: the actors start from the learner's params
        actor.update_params()
        if exp.eval_every:
            evaluator = Evaluator(exp, spec, seed=exp.seed + 1_000_003)

        def learn_once():
            driver.step()

        def insert(items, bounded=False):
            """Into the table, learning while the rate limiter refuses it. `bounded`: not past
            max_learner_steps (returns False, the items not inserted, where that would be needed)."""
            n = batch_rows(items)
            while not table.can_insert(n):
                why = table.never_goes_ahead("insert", n)
                if why is not None:             # more items than the table holds: never
                    raise UsageError(f"local run: {why}; the adder handed over {n} items at once")
                if not table.can_sample(exp.batch_size):
                    raise UsageError(f"local run: the table admits neither an insert of {n} "
                                     f"items nor a sample of {exp.batch_size} ({table._why_sample(exp.batch_size)}; "
                                     f"table stats {table.stats()}); this configuration deadlocks "
                                     f"in one thread")
                if bounded and max_learner_steps is not None and driver.steps >= max_learner_steps:
                    return False
                learn_once()
            table.insert(items)
            return True

        actor.sink = insert
        free_running = getattr(table.rate_limiter, "samples_per_insert", None) is None
        limits = Limits(max_env_steps, max_learner_steps, max_seconds)
        history, solved_at, solved_time, eval_return = [], None, None, float("nan")
        next_eval = (actor.env_steps // exp.eval_every + 1) * exp.eval_every if exp.eval_every else 0
        next_ckpt = (driver.steps // checkpoint_every + 1) * checkpoint_every if checkpoint_every else None
        if resumed is not None:
            ckpt.restore_rng(resumed.rng, actor.rng)
        table.warm_up()                       # compiled kernels load now, not on the run's clock
        t0 = time.monotonic()
        figures = Figures(t0, actor.env_steps, driver.steps)   # rates count this run's steps only
        # a resumed run may begin at its limits: then it takes no step, and the loop writes its row
        at_limit = limits.reached(actor.env_steps, driver.steps, 0.0)
        # a process run's checkpoint may hold items its actors had made and the table had not
        # taken: they go in first (kept for the next checkpoint if this run takes no step)
        carried = [] if resumed is None else list(resumed.in_flight)
        lost = 0 if resumed is None else int(resumed.counters.get("items_lost", 0))
        if not at_limit:
            while carried and insert(carried[0], bounded=True):
                carried.pop(0)
            at_limit = limits.reached(actor.env_steps, driver.steps, 0.0)   # the learning they took
        held.arm()                            # a Ctrl-C / SIGTERM from here on: checkpoint, then raise
        while True:
            if not at_limit and held.signum is None:
                try:
                    actor.step()
                except WorkerDied:
                    if not held.came():       # a group SIGTERM ended the env workers: the stop
                        raise
                    continue
                if free_running:
                    if table.can_sample(exp.batch_size):
                        learn_once()
                else:
                    while table.can_sample(exp.batch_size):
                        learn_once()
                        if max_learner_steps is not None and driver.steps >= max_learner_steps:
                            break
                        # many learner steps per vector step (a high samples-per-insert ratio, many
                        # envs): the clock is checked between them too (a 1 s limit ran for 9.8 s)
                        if max_seconds is not None and time.monotonic() - t0 >= max_seconds:
                            break
                actor.update_params()
            elapsed = time.monotonic() - t0
            evaluated = False
            if evaluator is not None and actor.env_steps >= next_eval:
                next_eval += exp.eval_every
                train_time = elapsed - evaluator.seconds       # evaluation time excluded
                before = evaluator.seconds
                eval_return = evaluator(learner.get_params(), actor.env_steps, elapsed)
                figures.exclude(evaluator.seconds - before)    # and out of the progress rates
                evaluated = True
                if exp.target_return is not None and eval_return >= exp.target_return and solved_at is None:
                    solved_at, solved_time = actor.env_steps, train_time
            if next_ckpt is not None and driver.steps >= next_ckpt:
                next_ckpt = (driver.steps // checkpoint_every + 1) * checkpoint_every
                ckpt.save_local(checkpoint_dir, learner, table, actor, driver, store, resumes, in_flight=carried,
                                items_lost=lost)
            stop = (limits.reached(actor.env_steps, driver.steps, elapsed) or solved_at is not None
                    or held.signum is not None)
            row = None
            if evaluated or stop or figures.due(progress_every):
                row = figures.row(actor.env_steps, driver.steps, table, actor.stats.episodes,
                                  actor.stats.mean_return(),
                                  {"eval_return": eval_return,
                                   "param_lag": float(max(0, driver.steps - client.version))},
                                  scalar_metrics(driver.last_metrics))
                history.append(row)
                logger.write(row, force=True)        # due: the progress line too
            if stop:
                break
        if checkpoint_dir is not None:
            ckpt.save_local(checkpoint_dir, learner, table, actor, driver, store, resumes, final=True,
                            in_flight=carried, items_lost=lost)
        held.raise_held()                     # a Ctrl-C / SIGTERM held for the checkpoint stops it now
        final = dict(history[-1]) if history else {}
        final["wall_time"] = history[-1]["wall_time"] if history else time.monotonic() - t0
        final["startup_seconds"] = t0 - start
        final["eval_seconds"] = evaluator.seconds if evaluator else 0.0
        return RunResult(learner=learner, table=table, figures=final, history=history,
                         evals=list(evaluator.results) if evaluator else [], solved_at=solved_at,
                         solved_time=solved_time)
    finally:
        logger.close()
        close_or_warn(venv, "the actor's vector env")
        if evaluator is not None:
            evaluator.close()
