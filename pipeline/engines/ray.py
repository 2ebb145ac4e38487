"""The Ray engine: the local engine's units of work, mapped over a Ray cluster.

Ray Data reads the job's pending rows (a Parquet file in the store), decodes them in Ray tasks
(`DecodeImages`), encodes them on an actor pool (`EncodeImages`/`EncodeTexts`: one model per
actor; one GPU per actor when the cluster has GPUs, CPU actors otherwise) and writes complete
staged shards from Ray tasks. The driver — this process, holding the store's writer lock — commits
the staged shards in batches. A worker killed mid-batch is retried by Ray (a staged shard's name
derives from its rows, so a retry rewrites its own file); a driver killed mid-run leaves staged
shards that the next writer adopts. Nothing is lost, nothing doubled.

Every node must see the store at the same path (a shared filesystem). The engine checks that with
a probe task on each node before it starts, and refuses with a sentence otherwise.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.encoding.jobs import EncodeJob, JobResult, stage_encoded
from pipeline.encoding.units import DecodeImages, EncodeImages, EncodeSpec, EncodeTexts
from pipeline.errors import PipelineError
from pipeline.reporting import Reporter, Silent
from pipeline.store.atomic import write_text
from pipeline.store.layout import Store
from pipeline.store.writes import Committer
from trainer.fit import FitConfig

INSTALL = "pip install 'clipdetect-pipeline[ray]'"
DEFAULT_EPOCHS = FitConfig().epochs


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local Ray instance; "auto" or HOST:PORT: join a cluster
    actors: int | None = None  # None: one per GPU, or one CPU actor per node
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    num_cpus: int | None = None  # CPUs of a local instance (None: all); tests and benchmarks set it


def import_ray() -> Any:
    """Ray, or a sentence saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise PipelineError(f"--engine ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


def connect(options: RayOptions) -> bool:
    """Join the cluster at `options.address`, or start a local instance; True if this call started Ray
    (then `disconnect(True)` takes it down whole)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if options.address:
        check_address(options.address)
    # Ray's C++ core writes its log lines to this process's stderr: a `core_worker.cc … max_restarts` error
    # for every actor pool of Ray Data (which restarts actors on purpose), and, once the level is set, a
    # line saying so while Ray starts (hence the start with stderr set aside). What goes wrong reaches us
    # as an exception anyway; a user who wants Ray's lines sets RAY_BACKEND_LOG_LEVEL themselves.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR",
                              "configure_logging": True}
    try:
        with _stderr_set_aside():
            if options.address:
                ray.init(address=options.address, **kwargs)
            else:  # "local": a new instance of our own, never a cluster someone started on this machine
                ray.init(address="local", num_cpus=options.num_cpus, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = options.address or "a local instance"
        raise PipelineError(f"Could not connect to the Ray cluster at {where}: {exc}".rstrip(".") + ".") from exc
    return True


def disconnect(started: bool) -> None:
    """Take down the Ray instance this process started (a cluster it joined keeps running): wait for its
    processes, end any worker that outlives its raylet (an actor would otherwise run on for a minute,
    holding its model), and remove the instance's session folder (Ray keeps every session's logs and
    sockets under /tmp/ray otherwise, one folder a run)."""
    if not started:
        return
    ray = import_ray()
    session, processes = _instance()
    ray.shutdown(wait_for_processes=True)
    _end(processes)
    if session is not None:
        _remove_session(session)


@contextlib.contextmanager
def _stderr_set_aside() -> Iterator[None]:
    """Send this process's file descriptor 2 to a throw-away file for the duration (C++ libraries write
    there directly, past Python's sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as aside:
            os.dup2(aside.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + an empty SETTINGS


def check_address(address: str, timeout: float = 5.0) -> None:
    """Refuse within seconds a HOST:PORT where no Ray cluster answers; Ray itself retries for minutes.

    A Ray head's GCS is a gRPC server: it answers the HTTP/2 connection preface with a SETTINGS frame.
    Nothing listening, a host that does not answer, or a server of another kind, is one sentence.
    `auto` (and ray:// client addresses) are left to Ray, which settles those quickly itself."""
    if address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise PipelineError(f"--ray-address {address} must be auto or HOST:PORT (the head node's GCS port, 6379 "
                            "unless `ray start --head --port` said otherwise).")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(_H2_PREFACE)
            frame = conn.recv(9)
    except OSError as exc:
        raise PipelineError(f"No Ray cluster answers at --ray-address {address} ({exc.strerror or exc}): start one "
                            "there (`ray start --head --port PORT`), or leave --ray-address out to start Ray on "
                            "this machine.") from exc
    if len(frame) < 9 or frame[3] != 0x4:  # the frame type of SETTINGS
        raise PipelineError(f"The server at --ray-address {address} is not a Ray cluster's head (it does not speak "
                            "gRPC): give the port of the head's GCS (6379 unless `ray start --head --port` said "
                            "otherwise).")


def _instance() -> tuple[Path | None, list[tuple[int, str]]]:
    """The session folder of the Ray instance this process started, and every process of it (its raylet,
    GCS and agents, and their children: the workers), each as (pid, start time) so a reused pid is never
    taken for one of them. Read from Ray's private node object: where that changed, nothing is cleaned."""
    try:
        from ray._private import worker

        node: Any = worker._global_node
        session = Path(node.get_session_dir_path())
        roots = {info.process.pid for infos in node.all_processes.values() for info in infos}
    except Exception:  # a Ray whose internals moved: leave the cleaning to Ray
        return None, []
    return session, [(pid, started) for pid in _tree(roots) if (started := _start_time(pid))]


def _tree(roots: set[int]) -> set[int]:
    """`roots` and all their descendants, from /proc (Linux; elsewhere just the roots)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def _start_time(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _end(processes: list[tuple[int, str]], grace: float = 5.0) -> None:
    """Kill whichever of `processes` still run (the same process: pid and start time) and wait them out."""
    import signal

    deadline = time.monotonic() + grace
    alive = [(pid, t) for pid, t in processes if _start_time(pid) == t]
    for pid, _ in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    while alive and time.monotonic() < deadline:
        alive = [(pid, t) for pid, t in alive if _start_time(pid) == t and not _zombie(pid)]
        time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _remove_session(session: Path) -> None:
    """Remove this instance's session folder, and Ray's `session_latest` link when it names it."""
    latest = session.parent / "session_latest"
    with contextlib.suppress(OSError):
        if latest.is_symlink() and Path(os.readlink(latest)).name == session.name:
            latest.unlink()
    shutil.rmtree(session, ignore_errors=True)


def check_store_visible(store: Store) -> None:
    """Refuse with a sentence unless every alive node reads the same store at the same path."""
    ray = import_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    probe = write_text(store.work_dir / "probes" / f"{token}.txt", token)
    try:
        read = ray.remote(num_cpus=0)(_read_probe)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = [read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(probe), token) for n in nodes]
        blind = [host for ok, host in ray.get(refs, timeout=120) if not ok]
    finally:
        probe.unlink(missing_ok=True)
        _remove_empty(probe.parent)
    if blind:
        raise PipelineError(
            f"Ray node(s) {', '.join(sorted(blind))} cannot see the store at {store.root.resolve()}: put the "
            "store on a filesystem that every node mounts at the same path."
        )


class RayEngine:
    """Runs an encode job on Ray Data: decode tasks → encode actors → staging tasks → driver commits."""

    def __init__(self, options: RayOptions) -> None:
        self.options = options
        self.started_ray = False
        self.checked = False

    def run(self, job: EncodeJob, reporter: Reporter) -> JobResult:
        ray = import_ray()
        if not ray.is_initialized():
            self.started_ray = connect(self.options)
        if not self.checked:
            check_store_visible(job.store)
            self.checked = True
        try:
            with _quiet("ray.data"):  # its INFO and WARNING lines would interleave with the CLI's progress bars
                return self._run(ray, job, reporter)
        except Exception as exc:  # a sentence raised in a worker comes back wrapped by Ray: unwrap it
            sentence = _pipeline_error(exc)
            if sentence is None:
                raise
            raise PipelineError(str(sentence)) from exc

    def close(self) -> None:
        """Shut down the Ray instance this engine started (a cluster it joined keeps running)."""
        disconnect(self.started_ray)
        self.started_ray = False

    def _run(self, ray: Any, job: EncodeJob, reporter: Reporter) -> JobResult:
        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        gpus = float(ray.cluster_resources().get("GPU", 0))
        per_actor = self.options.gpus_per_actor if self.options.gpus_per_actor is not None else (1.0 if gpus else 0.0)
        actors = self.options.actors or (max(1, int(gpus // per_actor)) if per_actor else _nodes(ray))
        device = job.spec.device if job.spec.device != "auto" else ("cuda" if per_actor else "cpu")
        if device == "cuda" and not gpus:
            raise PipelineError("--device cuda was asked for, but the Ray cluster has no GPUs.")
        if device == "cpu" and job.spec.precision == "fp16":
            raise PipelineError("--precision fp16 needs GPU actors; on CPU actors use bf16 or fp32.")
        cpus_per_actor = 0 if per_actor else _cpus_per_actor(ray, actors)
        root = str(job.store.root.resolve())
        ds = ray.data.read_parquet(str(job.pending.resolve()))  # a block per row group (1024 rows)
        if job.rows < 64 * 1024:  # a small job: split it finer, so that tasks overlap and results stream
            ds = ds.repartition(min(256, max(1, -(-job.rows // job.batch_size))))
        unit: type = EncodeTexts
        if job.modality == "image":
            # decoding in tasks; their CPU request differs from the actors', so Ray does not fuse them
            ds = ds.map_batches(_decode, fn_kwargs={"spec": job.spec}, batch_size=job.batch_size,
                                batch_format="pyarrow", num_cpus=0.5)
            unit = EncodeImages  # looked up at run time, so a test can swap in a failing one
        ds = ds.map_batches(
            unit, fn_constructor_args=(replace(job.spec, device=device),), batch_size=job.batch_size,
            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=per_actor, num_cpus=cpus_per_actor,
        )
        ds = ds.map_batches(_stage, fn_kwargs={"root": root, "spec": job.spec}, batch_size=job.shard_rows,
                            batch_format="pyarrow", num_cpus=0.25)
        result = JobResult(device=f"ray:{actors}x{device}")  # forward passes happen in actors: not counted
        committer = Committer(job.store)
        reporter.start(f"{job.modality}s", job.rows, "img" if job.modality == "image" else "texts")
        started = time.perf_counter()
        for staged in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in staged.to_pylist():
                result.encoded += row["encoded"]
                result.quarantined.update(row["reasons"])
                reporter.advance(f"{job.modality}s", row["rows"])
                committer.add([Path(p) for p in row["paths"]])
        committer.flush()
        result.shards = committer.committed
        result.seconds = time.perf_counter() - started
        return result


class TablePool:
    """Tables mapped over a pool of Ray actors, each of which builds its function once (a model loaded
    once per actor): `with TablePool(build, options, store) as pool: for tag, out in pool.map(items)`.

    `build` is plain data (it pickles) whose call, in the actor, returns the function `table -> result`.
    Items are read from the iterator only as actors free up (two in flight per actor), so memory holds
    a few tables whatever their number; results come back as they finish, with the tag they were given.
    Actors get one GPU each where the cluster has GPUs, else the cluster's CPUs shared between them
    (their torch threads set to their share). The pool connects to `options.address` (or starts a local
    instance) and leaves nothing behind: its actors are killed and a Ray it started is shut down."""

    def __init__(self, build: Callable[[], Callable[[pa.Table], Any]], options: RayOptions,
                 store: Store | None = None) -> None:
        self.build, self.options, self.store = build, options, store
        self.started_ray = False
        self.actors: list[Any] = []
        self.described = "ray"
        self.gpus = 0.0  # GPUs of the cluster (each actor takes one when there are any)

    def __enter__(self) -> TablePool:
        ray = import_ray()
        self.started_ray = connect(self.options)
        try:
            if self.store is not None:
                check_store_visible(self.store)
            gpus = self.gpus = float(ray.cluster_resources().get("GPU", 0))
            cpus = float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
            count = self.options.actors or (int(gpus) if gpus else max(_nodes(ray), int(cpus) // 4))
            share = 0 if gpus else max(1, int(cpus) // count)
            actor = ray.remote(num_cpus=share, num_gpus=1 if gpus else 0)(_TableActor)
            self.actors = [actor.remote(self.build, max(1, share or 1)) for _ in range(count)]
            self.described = f"ray:{count}x{'cuda' if gpus else 'cpu'}"
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def map(self, items: Iterator[tuple[Any, pa.Table]]) -> Iterator[tuple[Any, Any]]:
        ray = import_ray()
        busy: dict[Any, int] = {}  # result ref -> the actor computing it
        load = [0] * len(self.actors)
        todo = iter(items)
        try:
            while True:
                while min(load) < 2:
                    item = next(todo, None)
                    if item is None:
                        break
                    k = load.index(min(load))
                    busy[self.actors[k].run.remote(*item)] = k
                    load[k] += 1
                if not busy:
                    return
                ready, _ = ray.wait(list(busy), num_returns=1)
                load[busy.pop(ready[0])] -= 1
                yield ray.get(ready[0])
        except Exception as exc:  # a sentence raised in an actor comes back wrapped by Ray: unwrap it
            sentence = _pipeline_error(exc)
            if sentence is None:
                raise
            raise PipelineError(str(sentence)) from exc

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            ray = import_ray()
            for actor in self.actors:
                ray.kill(actor)
        self.actors = []
        disconnect(self.started_ray)
        self.started_ray = False


class _TableActor:
    """A Ray actor's body: builds its function once, then maps the tables it is sent."""

    def __init__(self, build: Callable[[], Callable[[pa.Table], Any]], threads: int) -> None:
        import torch

        from trainer.threads import choose_threads

        # at most its share of the node, less the cores other processes keep busy (the local engine's
        # policy, `engines.local.model_threads`): threads contending for a busy core spin at every barrier
        torch.set_num_threads(choose_threads(limit=threads)[0])
        self.function = build()

    def run(self, tag: Any, table: pa.Table) -> tuple[Any, Any]:
        return tag, self.function(table)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Raise a library logger to ERROR for the duration, then restore it (no lasting change)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _pipeline_error(exc: BaseException) -> PipelineError | None:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, PipelineError):
            return e
        marker = "pipeline.errors.PipelineError: "  # an actor that died in its constructor: only text
        if marker in str(e):
            return PipelineError(str(e).split(marker, 1)[1].splitlines()[0].strip())
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


# --- functions that run on Ray workers ---------------------------------------------------------


def _decode(batch: pa.Table, spec: EncodeSpec) -> pa.Table:
    return DecodeImages(spec)(batch)


def _stage(batch: pa.Table, root: str, spec: EncodeSpec) -> pa.Table:
    """Write one staged shard (plus its quarantine rows) from encoded rows; say what it holds."""
    counts = JobResult()
    counts.count(batch)
    paths = stage_encoded(Store(Path(root)), spec, batch)
    reasons = [r for r, n in counts.quarantined.items() for _ in range(n)]
    return pa.table({
        "paths": [[str(p) for p in paths]], "rows": [batch.num_rows], "encoded": [counts.encoded],
        "reasons": [reasons],
    })


def _read_probe(path: str, token: str) -> tuple[bool, str]:
    try:
        ok = Path(path).read_text() == token
    except OSError:
        ok = False
    return ok, socket.gethostname()


def _nodes(ray: Any) -> int:
    return max(1, sum(1 for n in ray.nodes() if n.get("Alive")))


def _cpus_per_actor(ray: Any, actors: int) -> float:
    """CPU actors share each node's cores with the decoding tasks: leave them one core per node."""
    cpus = float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    return max(0.5, (cpus - _nodes(ray)) / actors) if cpus > _nodes(ray) else max(0.5, cpus / (2 * actors))


# --- sweeps: Ray Tune ------------------------------------------------------------------------


@dataclass(frozen=True)
class TuneOptions:
    scheduler: str = "fifo"  # fifo | asha (stops weak trials early on per-epoch val AUC)
    address: str | None = None  # None: start a local Ray instance
    cpus_per_trial: float = 1.0


# A trial: (store root, flat training options, torch threads, reporter) -> plain data with run_id,
# skipped, val_auc, test_auc. The caller (a composition) owns what a trial is; the engine only runs it.
Trial = Callable[[Path, dict[str, Any], int, Reporter], dict[str, Any]]


def tune_sweep(store: Store, configs: list[dict[str, Any]], trial: Trial, options: TuneOptions,
               reporter: Reporter) -> list[dict[str, Any]]:
    """Run `trial` once per config as a Ray Tune trial; return each config's outcome, in order.

    Every trial reports its validation AUC per epoch (through the reporter it is given), so ASHA
    can stop weak ones early; a stopped trial writes no run and comes back with `stopped_after`.
    `configs` need an `epochs` option only where they differ from the default.
    """
    import_ray()
    try:
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    except ImportError:
        raise PipelineError(f"--engine ray needs Ray Tune, which is not installed: {INSTALL}") from None

    started_ray = connect(RayOptions(options.address))
    storage = store.work_dir / "tune" / uuid.uuid4().hex[:8]  # on the shared store, as Tune needs
    try:
        check_store_visible(store)
        epochs = max(int(c.get("epochs", DEFAULT_EPOCHS)) for c in configs)
        scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=epochs + 1, grace_period=1)
                     if options.scheduler == "asha" else FIFOScheduler())
        trainable = tune.with_resources(
            tune.with_parameters(_trial, root=str(store.root.resolve()), configs=configs, trial=trial,
                                 threads=max(1, int(options.cpus_per_trial))),
            {"cpu": options.cpus_per_trial},
        )
        with _progress(reporter) as callback:
            tuner = tune.Tuner(
                trainable,
                param_space={"i": tune.grid_search(list(range(len(configs))))},
                tune_config=tune.TuneConfig(metric="val_auc", mode="max", scheduler=scheduler),
                run_config=tune.RunConfig(storage_path=str(storage), name="sweep", verbose=0, callbacks=[callback]),
            )
            # Tune prints tables and logs; a stage never prints
            with contextlib.redirect_stdout(io.StringIO()), _quiet("ray.tune"):
                results = tuner.fit()
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        _remove_empty(storage.parent, store.work_dir / "probes", store.work_dir)
        disconnect(started_ray)
    outcomes: list[dict[str, Any]] = [{} for _ in configs]
    for k in range(len(results)):
        result = results[k]
        i = (result.config or {})["i"]
        metrics = result.metrics or {}
        if result.error and not metrics.get("run_id"):
            raise PipelineError(f"Sweep trial {i} ({configs[i]}) failed: {result.error}")
        if metrics.get("run_id"):
            outcomes[i] = {key: metrics.get(key) for key in ("run_id", "skipped", "val_auc", "test_auc")}
        else:
            outcomes[i] = {"val_auc": metrics.get("val_auc"), "stopped_after": metrics.get("training_iteration")}
    return outcomes


def _trial(params: dict[str, Any], root: str, configs: list[dict[str, Any]], trial: Trial, threads: int) -> None:
    """One Tune trial: one config trained by `trial` (runs in a Ray worker)."""
    from ray import tune

    outcome = trial(Path(root), configs[params["i"]], threads, _TuneReporter())
    tune.report({"val_auc": _nan(outcome.get("val_auc")), "test_auc": _nan(outcome.get("test_auc")),
                 "run_id": outcome["run_id"], "skipped": bool(outcome.get("skipped"))})


class _TuneReporter(Silent):
    """A stage reporter that hands each epoch's validation AUC to Ray Tune (and nothing else)."""

    def event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "epoch":
            from ray import tune

            tune.report({"val_auc": _nan(data.get("val_auc")), "epoch": data.get("epoch")})


@contextlib.contextmanager
def _progress(reporter: Reporter) -> Iterator[Any]:
    """A Tune callback that counts finished trials into the sweep's progress bar.

    Tune pickles its callbacks with the experiment's state, and a reporter (a terminal, its locks) does
    not pickle: the callback holds only a Ray queue (an actor handle, which pickles), and a thread of
    this process moves what arrives there to the reporter."""
    from ray import tune
    from ray.util.queue import Empty, Queue

    class Progress(tune.Callback):  # type: ignore[misc]
        def __init__(self, finished: Queue) -> None:
            self.finished = finished

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self.finished.put_nowait(1)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self.finished.put_nowait(1)

    finished = Queue(actor_options={"num_cpus": 0})
    done = threading.Event()

    def forward() -> None:
        while not done.is_set():
            with contextlib.suppress(Empty):
                reporter.advance("sweep", finished.get(timeout=0.5))
        for n in finished.get_nowait_batch(finished.qsize()):  # what arrived as the sweep ended
            reporter.advance("sweep", n)

    thread = threading.Thread(target=forward, name="sweep-progress", daemon=True)
    thread.start()
    try:
        yield Progress(finished)
    finally:
        done.set()
        thread.join()
        finished.shutdown()


def _remove_empty(*folders: Path) -> None:
    """Remove each folder if it is empty (scratch folders a run made; a folder in use is left alone)."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)
