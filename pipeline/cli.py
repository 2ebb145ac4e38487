"""The `pipeline` command: each command parses its flags into a config, runs one stage (or one
composition of stages) and hands the result to one `present.terminal` function. Nothing else.

Options that several commands share are declared once below. Choices are the `Literal`s of
`pipeline.choices`, so a wrong value is refused by the parser with the allowed ones listed. Stage
modules are imported inside each command, so `pipeline --help` and a no-op stay cheap. Every failure
the user can fix arrives as a `PipelineError` and is printed as one sentence; `pipeline --debug …`
shows the traceback instead.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline import choices as c
from pipeline.allocator import fix_mmap_threshold
from pipeline.errors import PipelineError
from pipeline.present import terminal as show
from pipeline.sources.reading import DEFAULT_MAX_BYTES  # (standard library only: start-up stays light)
from pipeline.store.layout import DEFAULT_STORE, Store

app = typer.Typer(
    help="Embedding-cache pipeline for detectors of diffusion-generated images: ingest image "
    "collections, encode them once with CLIP into Parquet shards, query everything with SQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
catalog_app = typer.Typer(help="Maintain the DuckDB catalog.", no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")
index_app = typer.Typer(help="FAISS indexes over cached vectors.", no_args_is_help=True)
app.add_typer(index_app, name="index")
conflicts_app = typer.Typer(help="Images brought under two labels, and your decision on each.", no_args_is_help=True)
app.add_typer(conflicts_app, name="conflicts")
runs_app = typer.Typer(help="The runs a store holds: list them, show one, remove some.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")

# --- options shared by several commands, declared once ------------------------------------------

StoreOpt = Annotated[
    Path, typer.Option("--store", help="Store directory (created on first ingest).", envvar="PIPELINE_STORE")
]
WaitOpt = Annotated[bool, typer.Option("--wait/--no-wait", help="When another process is writing to the "
                                       "store: wait for it (saying so), or stop at once.")]
ModelKeyOpt = Annotated[str | None, typer.Option(help="Which cached embeddings (default: the only one).")]
SplitsOpt = Annotated[str, typer.Option(help="train,val,test fractions, e.g. 0.8,0.1,0.1.")]
GeneratorsOpt = Annotated[str | None, typer.Option(
    help="D3's generated images gen_0..gen_3 (webdataset form; h5 image_gen0..3): their generator names, "
    "comma-separated. Default: the order of D3's own model_gen0..3 columns.")]
MaxMemoryOpt = Annotated[str, typer.Option(help="Memory an index may take to build and search, e.g. 4GB.")]
RayAddressOpt = Annotated[str | None, typer.Option(help="Ray cluster to join: auto | HOST:PORT. Default: "
                                                   "start a local Ray instance.")]
ExcludeLeaksOpt = Annotated[bool | None, typer.Option(
    "--exclude-leaks/--keep-leaks", help="Leave val/test samples with a near-duplicate in an earlier split "
    "out of the metrics (needs `pipeline leaks`).")]
MaxBytesOpt = Annotated[int, typer.Option(help="Largest image read (a file, tar member or Parquet cell); a larger "
                                           "one is quarantined as too_large without being read.")]
ConfigOpt = Annotated[Path | None, typer.Option(help="TOML file of training options (flags override it).")]
PairingOpt = Annotated[c.Pairing | None, typer.Option(help="as-ingested | shared (one text per real image and its "
                                                      "generated siblings: removes caption shortcuts)")]
FeaturesOpt = Annotated[c.Features | None, typer.Option(help="What the detector sees (train: image+text; "
                                                        "generalization: image).")]
EpochsOpt = Annotated[int | None, typer.Option(help="Passes over the train split (default 32).")]
BatchOpt = Annotated[int | None, typer.Option(help="Samples per step (default 2048).")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed of weights, dropout and shuffling (default 0).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON document on stdout "
                                       "(progress and warnings stay on stderr).")]
PrecisionOpt = Annotated[c.TrainPrecision | None, typer.Option(
    help="auto (default): bf16 products (bf16 operands, fp32 accumulation) where the CPU or GPU computes bf16 "
    "natively (AVX512-BF16/AMX, CUDA capability 8.0+), fp32 elsewhere; fp32 | bf16 force one.")]
ThreadsOpt = Annotated[int | None, typer.Option(
    help="torch threads (default: the cores this process may use, less those other processes keep busy). "
    "A run's numbers do not depend on it where MKL's strict mode is in effect (and, for bf16, on Intel "
    "CPUs); otherwise the count enters its hash.")]


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print every epoch's line even when the "
                                          "output is not a terminal (a log, a pipe).")] = False,
) -> None:
    show.configure()
    ctx.obj = {"debug": debug, "verbose": verbose}


@contextmanager
def _errors(ctx: typer.Context) -> Iterator[None]:
    debug = bool((ctx.find_root().obj or {}).get("debug"))
    try:
        yield
    except PipelineError as exc:
        if debug:
            raise
        show.error(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        show.err.print("[yellow]interrupted[/]: everything written so far is kept; run again to resume.")
        raise typer.Exit(130) from None
    except Exception as exc:  # a full disk, from Python or from DuckDB's spill: one sentence, not a traceback
        if debug:
            raise
        if _disk_full(exc):
            show.error(f"the disk is full ({exc}). Free some space and run the command again: every file is "
                       "written whole or not at all, so nothing written before this is lost.")
            raise typer.Exit(1) from None
        sentence = _refused_write(exc)
        if sentence is None:
            raise
        show.error(sentence)
        raise typer.Exit(2) from None


@contextmanager
def _running(ctx: typer.Context) -> Iterator[show.RichReporter]:
    """One-sentence errors and progress bars around a stage run."""
    with _errors(ctx), show.RichReporter(bool((ctx.find_root().obj or {}).get("verbose"))) as reporter:
        yield reporter


def _disk_full(exc: BaseException) -> bool:
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in str(exc)


def _refused_write(exc: BaseException) -> str | None:
    """A write the system refused (from Python or from DuckDB, which gives only text), as one sentence:
    a file-size limit (`ulimit -f`), a read-only filesystem, a permission. None for anything else."""
    text = str(exc)
    code = exc.errno if isinstance(exc, OSError) else None
    name = getattr(exc, "filename", None) or "a file"
    kept = "every file is written whole or not at all, so nothing written before this is lost."
    if code == errno.EFBIG or "File too large" in text:
        return (f"{name} reached this process's file-size limit (`ulimit -f` shows it): raise the limit and run the "
                f"command again; {kept}")
    if code == errno.EROFS or "Read-only file system" in text:
        return f"{name} lies on a read-only filesystem: run the command where it can write; {kept}"
    if isinstance(exc, OSError) and code in (errno.EACCES, errno.EPERM):
        return f"{name}: {exc.strerror}. Run the command as a user who may read and write it; {kept}"
    return None


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise PipelineError(f"--splits {text!r} must be three numbers like 0.8,0.1,0.1.")
    return parts[0], parts[1], parts[2]


def _names(text: str | None) -> dict[str, Any]:
    """`generators=` for a config when the flag was given (else the config's default applies)."""
    return {} if text is None else {"generators": tuple(g.strip() for g in text.split(","))}


def _given(**flags: Any) -> dict[str, Any]:
    """The training flags that were given (not None), as flat config keys."""
    return {k: v for k, v in flags.items() if v is not None}


def _options(config: Path | None) -> dict[str, Any]:
    from pipeline.config import read_toml

    return {} if config is None else read_toml(config, "config")


# --- commands ----------------------------------------------------------------------------------


@app.command()
def ingest(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help="The source: a file or directory, per --format.")],
    format: Annotated[c.SourceFormat, typer.Option("--format", "-f", help="What SOURCE is.")],
    store: StoreOpt = DEFAULT_STORE,
    real_images: Annotated[Path | None, typer.Option(
        help="d3: downloaded LAION images (folder or img2dataset output), matched by id or URL.")] = None,
    generator: Annotated[str | None, typer.Option(
        help="webdataset: generator of every image ('real' for photographs).")] = None,
    label_map: Annotated[Path | None, typer.Option(help="webdataset: CSV with key,label,generator per key.")] = None,
    generators: GeneratorsOpt = None,
    group_by: Annotated[c.GroupBy, typer.Option(help="folder: split unit, 'stem' (same file name) or 'image'.")]
    = "stem",
    splits: Annotated[str, typer.Option(help="train,val,test fractions, or 'source' to keep the split the "
                                        "source declares (D3's train/validation/test files or keys, a "
                                        "manifest's split column).")] = "0.8,0.1,0.1",
    split_seed: Annotated[str, typer.Option(help="Salt of the split hash.")] = "0",
    max_bytes: MaxBytesOpt = DEFAULT_MAX_BYTES,
    unlabelled: Annotated[bool, typer.Option(
        "--unlabelled", help="Record the images without a label (split 'unlabelled': never trained on, never in "
        "conflict); folder: any layout, every image under it; webdataset: no --generator needed.")] = False,
    wait: WaitOpt = True,
) -> None:
    """Add the images of SOURCE (with captions, labels, generators) to the store as samples.

    Images are identified by the SHA-256 of their bytes: ingesting the same image twice adds it
    once. Unreadable inputs and D3 rows whose real image is missing are counted, recorded in the
    quarantine table, and reported. Bytes the store holds under another label keep that label: the
    claim is listed by `pipeline conflicts list` until you decide.
    """
    from pipeline.stages import ingest as stage

    with _running(ctx) as reporter:
        from_source = splits.strip() == "source"
        config = stage.IngestConfig(
            source=source, format=format, store=Store(store), real_images=real_images, generator=generator,
            label_map=label_map, group_by=group_by, split_seed=split_seed, max_bytes=max_bytes, wait=wait,
            unlabelled=unlabelled,
            split_fractions=(0.8, 0.1, 0.1) if from_source else _fractions(splits),
            splits_from="source" if from_source else "hash", **_names(generators))
        result = stage.run(config, reporter)
    show.show_ingest(result)


@app.command()
def encode(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(help="open_clip architecture, e.g. ViT-L-14, ViT-B-32, Tiny-ViT-16. "
                                              "Default: the model the store was encoded with (its only one).")]
    = None,
    pretrained: Annotated[str | None, typer.Option(
        help="open_clip tag (openai, laion2b_s34b_b79k, …) or a local checkpoint file. "
        "Omit for random weights (testing only).")] = None,
    store: StoreOpt = DEFAULT_STORE,
    device: Annotated[c.Device, typer.Option(help="Where the model runs.")] = "auto",
    precision: Annotated[c.Precision, typer.Option(help="fp16 on GPU only; bf16 on a CPU without native bf16 "
                                                 "is emulated and slow (a warning says so).")] = "fp32",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    workers: Annotated[int | None, typer.Option(help="Decoding processes (0: decode in this process). "
                                                "Default: 0 on a small CPU box, most cores with a GPU.")] = None,
    dtype: Annotated[c.VectorDtype, typer.Option(help="Stored vector type.")] = "float16",
    shard_rows: Annotated[int, typer.Option(help="Vectors per Parquet shard (the unit of resume).")] = 4096,
    max_pixels: Annotated[int, typer.Option(help="Images with more pixels are quarantined.")] = 64_000_000,
    max_bytes: MaxBytesOpt = DEFAULT_MAX_BYTES,
    seed: Annotated[int, typer.Option(help="Seed of random weights (when --pretrained is omitted).")] = 0,
    retry_quarantined: Annotated[bool, typer.Option(help="Try quarantined images again.")] = False,
    engine: Annotated[c.Engine, typer.Option(help="local: this machine | ray: a Ray cluster (pip install "
                                           "'clipdetect-pipeline[ray]'); every node must see --store at the "
                                           "same path (shared filesystem).")] = "local",
    ray_address: RayAddressOpt = None,
    actors: Annotated[int | None, typer.Option(help="Ray encode actors, one model each. Default: one per "
                                               "GPU, or one per node without GPUs.")] = None,
    gpus_per_actor: Annotated[float | None, typer.Option(help="GPUs per Ray actor (0.5: two models share "
                                                         "a GPU). Default: 1 with GPUs, else 0.")] = None,
    wait: WaitOpt = True,
) -> None:
    """Encode every image and text not yet cached for this model; a second run does no work.

    Vectors are L2-normalised and stored per content hash (with their norm), so an image or a prompt
    shared by many samples is encoded once. Safe to kill at any moment: run it again to resume.
    With --engine ray the store must live on a filesystem that every Ray node mounts at the same path.
    """
    from pipeline.encoding.clip import ModelSpec
    from pipeline.stages import encode as stage

    with _running(ctx) as reporter:
        if model is None and pretrained is not None:
            raise PipelineError("--pretrained needs --model (the architecture its weights belong to).")
        config = stage.EncodeConfig(
            store=Store(store), model=ModelSpec(model, pretrained, seed) if model else None, device=device,
            precision=precision,
            batch_size=batch_size, workers=workers, dtype=dtype, shard_rows=shard_rows, max_pixels=max_pixels,
            max_bytes=max_bytes,
            retry_quarantined=retry_quarantined, engine=engine, ray_address=ray_address, actors=actors,
            gpus_per_actor=gpus_per_actor, wait=wait)
        result = stage.run(config, reporter)
    show.show_encode(result)


@app.command()
def sql(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="One SELECT (or EXPLAIN) over the views above, e.g. "
                                         "SELECT generator, count(*) FROM samples GROUP BY 1.")],
    store: StoreOpt = DEFAULT_STORE,
    format: Annotated[c.SqlFormat, typer.Option("--format", help="table: for the terminal; csv and json go to "
                                              "stdout (or --output); parquet needs --output.")] = "table",
    output: Annotated[Path | None, typer.Option(help="File to write (outside the store).")] = None,
    max_rows: Annotated[int, typer.Option(help="Rows shown in table format.")] = 50,
    allow_files: Annotated[bool, typer.Option("--allow-files", help="Let a plain SELECT read files "
                                              "outside the store too (still nothing can be written).")] = False,
    memory_limit: Annotated[str, typer.Option(help="Memory DuckDB's joins, sorts and aggregates may use before "
                                              "they spill to disk: 4GB, 512MiB, or a share of RAM like 25%.")]
    = "25%",
    timeout: Annotated[float | None, typer.Option(help="Stop the query after this many seconds (Ctrl-C stops "
                                                  "it at any time).")] = None,
) -> None:
    """Run a read-only SQL query over the store's views and print or export the result.

    The views: samples, embeddings, quarantine, runs, scores, metrics, alarms, latest_scores (and the
    macro scores_of(run)), indexes, leaks, conflicts, decisions. Nothing the query says can write a
    file or reach the network. The table shows control characters in the data escaped (\\x1b); csv,
    json and parquet keep the data as it is."""
    import sys

    from pipeline.stages import sql as stage

    with _errors(ctx):
        result = stage.run(stage.SqlConfig(Store(store), query, allow_files, format, output, memory_limit, timeout,
                                           max_rows, sink=sys.stdout.buffer))
    show.show_sql(result)


@app.command()
def status(ctx: typer.Context, store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """Counts by split, label and generator; per model, encoded vs pending."""
    from pipeline.stages import status as stage

    with _errors(ctx):
        result = stage.run(stage.StatusConfig(Store(store)))
    show.show_json(result) if as_json else show.show_status(result)


@app.command("import-features")
def import_features(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help="Folder (or file) of precomputed features.")],
    layout: Annotated[c.FeatureLayout, typer.Option(help="h5: the reference code's NNNN.h5 | clip-retrieval.")],
    model_key: Annotated[str, typer.Option(help="Name of the model that made them, e.g. ViT-L-14__openai.")],
    store: StoreOpt = DEFAULT_STORE,
    generators: GeneratorsOpt = None,
    generator: Annotated[str | None, typer.Option(help="clip-retrieval without a label column: the "
                                                  "generator of every image ('real' for photographs).")] = None,
    splits: SplitsOpt = "0.8,0.1,0.1",
    images: Annotated[list[Path] | None, typer.Option(
        "--images", help="clip-retrieval: a folder that image_path values may point into besides SOURCE "
        "(repeatable); paths leading anywhere else are not read.")] = None,
    max_bytes: MaxBytesOpt = DEFAULT_MAX_BYTES,
    wait: WaitOpt = True,
) -> None:
    """Import CLIP features computed elsewhere, as samples plus embeddings, without re-encoding.

    Vectors that are not finite or have zero length, and contents found under both labels, are
    quarantined with a reason; a features file may name image files only inside its own folder."""
    from pipeline.stages import import_features as stage

    with _running(ctx) as reporter:
        config = stage.ImportConfig(source=source, layout=layout, store=Store(store), model_key=model_key,
                                    generator=generator, split_fractions=_fractions(splits), wait=wait,
                                    image_roots=tuple(images or ()), max_bytes=max_bytes, **_names(generators))
        result = stage.run(config, reporter)
    show.show_import(result)


@app.command("train")
def train_cmd(
    ctx: typer.Context,
    config: ConfigOpt = None,
    store: StoreOpt = DEFAULT_STORE,
    model_key: ModelKeyOpt = None,
    features: FeaturesOpt = None,
    pairing: PairingOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: Annotated[float | None, typer.Option()] = None,
    cvar: Annotated[bool | None, typer.Option("--cvar/--no-cvar", help="CVaR loss (level --cvar-alpha).")] = None,
    cvar_alpha: Annotated[float | None, typer.Option()] = None,
    auc: Annotated[bool | None, typer.Option("--auc/--no-auc", help="AUC loss, weight 1 − --auc-gamma.")] = None,
    auc_gamma: Annotated[float | None, typer.Option()] = None,
    sam: Annotated[bool | None, typer.Option("--sam/--no-sam", help="SAM optimiser (radius --sam-rho).")] = None,
    sam_rho: Annotated[float | None, typer.Option()] = None,
    precision: PrecisionOpt = None,
    threads: ThreadsOpt = None,
    seed: SeedOpt = None,
    detector: Annotated[c.Detector | None, typer.Option(help="mlp (the paper's) | knn (vote of the nearest "
                                                      "training samples, k chosen on val)")] = None,
    exclude_leaks: ExcludeLeaksOpt = None,
    leak_threshold: Annotated[float | None, typer.Option(help="Cosine similarity of a near-duplicate.")] = None,
    input_norm: Annotated[c.InputNorm | None, typer.Option(help="l2 (unit vectors, as stored) | raw (each vector "
                                                         "times its stored norm: the reference code's inputs)")]
    = None,
    steps_per_epoch: Annotated[int | None, typer.Option(help="Stop each epoch after this many batches "
                                                        "(default: the whole train split).")] = None,
    name: Annotated[str | None, typer.Option(help="A label for the run (not part of its hash).")] = None,
    wait: WaitOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """Fit the detector (MLP, CVaR + AUC loss, SAM) on cached embeddings; record a run and its scores.

    Defaults are the paper's: image+text features, CVaR α 0.8, AUC η 0.6 p 2 γ 0.5, SAM ρ 0.05,
    AdamW lr 1e-3, batch 2048, 32 epochs. The best validation epoch is kept.
    """
    from pipeline.runs.config import TrainConfig
    from pipeline.stages import train as stage

    with _running(ctx) as reporter:
        options = {**_options(config), **_given(
            model_key=model_key, features=features, pairing=pairing, epochs=epochs, batch_size=batch_size,
            lr=lr, cvar=cvar, cvar_alpha=cvar_alpha, auc=auc, auc_gamma=auc_gamma, sam=sam, sam_rho=sam_rho,
            precision=precision, threads=threads, seed=seed, detector=detector, exclude_leaks=exclude_leaks,
            leak_threshold=leak_threshold, input_norm=input_norm, steps_per_epoch=steps_per_epoch, name=name)}
        result = stage.run(stage.TrainJob(Store(store), TrainConfig.from_dict(options), wait=wait), reporter)
    show.show_json(result) if as_json else show.show_train(result)


@app.command("sweep")
def sweep_cmd(
    ctx: typer.Context,
    grid: Annotated[Path, typer.Option(help="TOML with \\[base] and \\[grid] (crossed lists) or \\[\\[runs]].")],
    store: StoreOpt = DEFAULT_STORE,
    jobs: Annotated[int, typer.Option(help="Runs in parallel (processes).")] = 1,
    engine: Annotated[c.Engine, typer.Option(help="local: this machine | ray: one Ray Tune trial per config "
                                           "(store on a filesystem every node sees).")] = "local",
    samples: Annotated[int | None, typer.Option(help="Run N configs drawn at random from the grid.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --samples draw.")] = 0,
    scheduler: Annotated[c.Scheduler, typer.Option(help="Ray Tune scheduler: fifo | asha (stops weak trials "
                                                 "early on per-epoch val AUC).")] = "fifo",
    ray_address: RayAddressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train many configs over the same cached features; configs already run are skipped."""
    from pipeline.compositions import sweep

    with _running(ctx) as reporter:
        config = sweep.SweepConfig(Store(store), tuple(sweep.grid_points(grid)), jobs, engine=engine,
                                   samples=samples, seed=seed, scheduler=scheduler, ray_address=ray_address)
        result = sweep.run(config, reporter)
    show.show_json(result) if as_json else show.show_sweep(result)


@app.command("experiment")
def experiment_cmd(
    ctx: typer.Context,
    table: Annotated[c.Experiment, typer.Argument(help="Which experiment.")],
    store: StoreOpt = DEFAULT_STORE,
    model_key: ModelKeyOpt = None,
    config: ConfigOpt = None,
    pairing: PairingOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    exclude_leaks: ExcludeLeaksOpt = None,
    seeds: Annotated[int, typer.Option(help="Runs per row (seeds --seed, +1, …): mean ± sd beside the intervals.")] = 1,
    run_id: Annotated[str | None, typer.Option("--run", help="robustness: the trained run to test.")] = None,
    features: FeaturesOpt = None,
    seed: SeedOpt = None,
    as_json: JsonOpt = False,
    precision: PrecisionOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """The paper's tables and the evaluations the field reports, as runs with 95% intervals.

    table1: baselines vs method + text-only (shortcut alarm) + kNN, and a file-format probe.
    table2: the ablation. generalization: train on one generator (and on all but one), test on each.
    robustness --run RUN: AUC on the test split's perturbed copies (`pipeline perturb`, then `encode`).
    Writes the table as Markdown and as an HTML page with its figure under STORE/reports/.
    """
    from pipeline.compositions import experiment

    with _running(ctx) as reporter:
        base = {**_options(config), **_given(
            model_key=model_key, pairing=pairing, epochs=epochs, batch_size=batch_size, exclude_leaks=exclude_leaks,
            features=features, seed=seed, precision=precision, threads=threads)}
        result = experiment.run(experiment.ExperimentConfig(Store(store), table, base, seeds, run_id), reporter)
    show.show_json(result) if as_json else show.show_experiment(result)


@app.command("perturb")
def perturb_cmd(
    ctx: typer.Context,
    ops: Annotated[list[str] | None, typer.Option(
        "--ops", help="Operations and strengths, e.g. --ops jpeg:90,75,50 --ops resize:0.5,0.25 --ops blur:1,2 "
        "--ops crop:0.8 --ops noise:0.02 (or several in one quoted value).")] = None,
    ops_file: Annotated[Path | None, typer.Option(
        help="TOML file of operations, e.g. jpeg = \\[90, 75] and blur = \\[1, 2].")] = None,
    store: StoreOpt = DEFAULT_STORE,
    splits: Annotated[str, typer.Option(help="Comma-separated splits to derive from; train,val,test applies "
                                        "the operation everywhere (train and test then share one format).")] = "test",
    limit: Annotated[int | None, typer.Option(help="At most this many source samples per split.")] = None,
    wait: WaitOpt = True,
) -> None:
    """Derive perturbed samples (own ids, derived_from, perturbation) for robustness tests; rerun adds nothing."""
    from pipeline.stages import perturb as stage

    with _running(ctx) as reporter:
        specs = tuple(s for value in (ops or []) for s in value.split())
        if ops_file is not None:
            specs += stage.PerturbConfig.ops_from_toml(ops_file)
        chosen = tuple(s.strip() for s in splits.split(",") if s.strip())
        result = stage.run(stage.PerturbConfig(Store(store), specs, chosen, limit, wait), reporter)
    show.show_perturb(result)


@app.command("score")
def score_cmd(
    ctx: typer.Context,
    run: Annotated[str, typer.Option("--run", help="The run whose detector scores the samples.")],
    store: StoreOpt = DEFAULT_STORE,
    wait: WaitOpt = True,
) -> None:
    """Score every encoded sample that this run has not scored yet (e.g. newly ingested ones)."""
    from pipeline.stages import score as stage

    with _running(ctx) as reporter:
        result = stage.run(stage.ScoreConfig(Store(store), run, wait), reporter)
    show.show_score(result)


@conflicts_app.command("list")
def conflicts_list(ctx: typer.Context, store: StoreOpt = DEFAULT_STORE) -> None:
    """Each image brought under two labels: the label training uses, what was stored, what was claimed."""
    from pipeline.stages import conflicts as stage

    with _errors(ctx):
        result = stage.run(stage.ConflictsConfig(Store(store)))
    show.show_conflicts(result)


@conflicts_app.command("resolve")
def conflicts_resolve(
    ctx: typer.Context,
    sample: Annotated[str, typer.Argument(help="The sample id (a unique prefix of 6+ characters).")],
    label: Annotated[c.Decision | None, typer.Option(help="real | generated | none (use it as neither).")] = None,
    generator: Annotated[str | None, typer.Option(help="With --label generated: its generator (default: the "
                                                  "one a source named).")] = None,
    undo: Annotated[bool, typer.Option("--undo", help="Reverse this sample's latest decision.")] = False,
    store: StoreOpt = DEFAULT_STORE,
    wait: WaitOpt = True,
) -> None:
    """Decide a conflicting sample's label (recorded, never rewritten: --undo reverses it)."""
    from pipeline.stages import conflicts as stage

    with _running(ctx) as reporter:
        result = stage.run(stage.ConflictsConfig(Store(store), sample, label, generator, undo, wait), reporter)
    show.show_conflicts(result)


@app.command()
def predict(
    ctx: typer.Context,
    sources: Annotated[list[Path], typer.Argument(help="Images, folders (any layout, searched recursively), "
                                                  "webdataset .tar files, or .csv/.parquet lists with a 'path' "
                                                  "column (and optionally 'caption').")],
    run: Annotated[str | None, typer.Option("--run", help="A run of the store whose detector scores the images.")]
    = None,
    detector: Annotated[Path | None, typer.Option(help="An exported detector folder (`pipeline export`); needs "
                                                  "no store.")] = None,
    store: StoreOpt = DEFAULT_STORE,
    output: Annotated[Path | None, typer.Option(help="Write every row to FILE.csv, .json or .parquet (outside "
                                                "the store), or to a folder DIR/ of Parquet parts that a rerun "
                                                "resumes; without it the terminal shows the first rows.")] = None,
    threshold: Annotated[float | None, typer.Option(help="Call an image generated when its score is above this "
                                                    "(default: the run's threshold, chosen on val).")] = None,
    caption: Annotated[str | None, typer.Option(help="The caption of every image without one of its own "
                                                "(sidecar .txt, list column): image+text detectors need one.")] = None,
    explain: Annotated[bool, typer.Option("--explain", help="Add each image's nearest training images, with "
                                          "their labels and generators (--run only).")] = False,
    neighbours: Annotated[int, typer.Option(help="How many nearest training images --explain shows.")] = 3,
    keep: Annotated[bool, typer.Option("--keep", help="Store the new vectors and the images as unlabelled "
                                       "samples (never trained on), so predicting them again is a lookup.")] = False,
    device: Annotated[c.Device, typer.Option(help="Where CLIP runs (as encode).")] = "auto",
    precision: Annotated[c.Precision, typer.Option(help="As encode: fp16 on GPU only.")] = "fp32",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    workers: Annotated[int | None, typer.Option(help="Decoding processes (0: decode here). Default as encode.")]
    = None,
    max_bytes: MaxBytesOpt = DEFAULT_MAX_BYTES,
    max_pixels: Annotated[int, typer.Option(help="Images with more pixels get a reason, not a score.")]
    = 64_000_000,
    max_rows: Annotated[int, typer.Option(help="Rows shown in the terminal (and in --json's rows).")] = 20,
    engine: Annotated[c.Engine, typer.Option(help="local: this machine | ray: a Ray actor pool, each actor "
                                             "loading the detector and CLIP once (needs --output DIR/).")] = "local",
    ray_address: RayAddressOpt = None,
    actors: Annotated[int | None, typer.Option(help="Ray actors. Default: one per GPU, else one per 4 CPUs.")]
    = None,
    shard_rows: Annotated[int, typer.Option(help="--output DIR/: images per Parquet part (the unit of resume).")]
    = 4096,
    force: Annotated[bool, typer.Option("--force", help="--output DIR/ holding another command's parts: replace "
                                        "them.")] = False,
    wait: WaitOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """Score images with a trained detector: score, decision, calibrated probability, out-of-distribution flag.

    Never changes the store's training data. Images the store already encoded with the run's CLIP model
    are looked up by their SHA-256, the rest are encoded now. An unreadable or hostile file gets a row
    with the reason, never a crash. The paper's detector reads the caption too (image+text): give one
    per image, or use an image-only run.
    """
    from pipeline.stages import predict as stage

    with _running(ctx) as reporter:
        config = stage.PredictConfig(
            tuple(sources), Store(store) if detector is None else None, run, detector, output, threshold, caption,
            neighbours if explain else 0, keep, device, precision, batch_size, workers, max_bytes, max_pixels,
            preview_rows=max_rows, wait=wait, engine=engine, ray_address=ray_address, actors=actors,
            shard_rows=shard_rows, force=force)
        result = stage.run(config, reporter)
    show.show_json(result) if as_json else show.show_predict(result)


@app.command()
def export(
    ctx: typer.Context,
    run: Annotated[str, typer.Option("--run", help="The run to export.")],
    output: Annotated[Path, typer.Option(help="The folder to write (Hugging Face Hub layout); outside the store.")],
    store: StoreOpt = DEFAULT_STORE,
    force: Annotated[bool, typer.Option("--force", help="Replace the files of a detector already there.")] = False,
    wait: WaitOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """Write a run's detector as a folder that travels alone (Hugging Face Hub layout).

    model.safetensors, config.json (CLIP model, features, threshold, calibration, OOD rule),
    ood.safetensors (the OOD sketch) and a model card (README.md); `pipeline predict --detector DIR`
    uses it on any machine, without a store."""
    from pipeline.stages import export as stage

    with _running(ctx) as reporter:
        result = stage.run(stage.ExportConfig(Store(store), run, output, force, wait), reporter)
    show.show_json(result) if as_json else show.show_export(result)


@index_app.command("build")
def index_build(
    ctx: typer.Context,
    store: StoreOpt = DEFAULT_STORE,
    model_key: ModelKeyOpt = None,
    kind: Annotated[c.IndexKind, typer.Option(help="auto: the most exact that fits --max-memory (flat below 100k "
                                            "vectors, then ivf, ivf-sq8, ivf-pq).")] = "auto",
    vectors: Annotated[c.Modality, typer.Option(help="Which vectors.")] = "image",
    nlist: Annotated[int | None, typer.Option(help="IVF lists (default: one per ~1024 vectors, as many as "
                                              "the training sample can place).")] = None,
    max_memory: MaxMemoryOpt = "4GB",
    target_recall: Annotated[float, typer.Option(help="Approximate kinds widen their search to reach this "
                                                 "recall@10 against exact search.")] = 0.95,
    force: Annotated[bool, typer.Option(help="Rebuild even if the embeddings did not change.")] = False,
    wait: WaitOpt = True,
) -> None:
    """Build a FAISS index (cosine similarity) over one model's cached vectors; reused until they change."""
    from pipeline.features.ann.plan import parse_memory
    from pipeline.stages import index as stage

    with _running(ctx) as reporter:
        config = stage.IndexConfig(Store(store), model_key, kind, vectors, nlist, target_recall=target_recall,
                                   force=force, max_memory=parse_memory(max_memory), wait=wait)
        info = stage.run(config, reporter)
    show.show_index(info, target_recall)


@app.command()
def neighbors(
    ctx: typer.Context,
    sample_id: Annotated[str | None, typer.Option(help="A sample in the store (a unique prefix will do).")] = None,
    image: Annotated[Path | None, typer.Option(help="An image file, encoded now with the store's model.")] = None,
    k: Annotated[int, typer.Option("-k", help="How many neighbours.")] = 10,
    store: StoreOpt = DEFAULT_STORE,
    model_key: ModelKeyOpt = None,
    run: Annotated[str | None, typer.Option("--run", help="Show this run's score of each neighbour.")] = None,
    vectors: Annotated[c.Modality, typer.Option(help="Which vectors to compare.")] = "image",
    max_bytes: Annotated[int, typer.Option(help="Largest --image file read.")] = DEFAULT_MAX_BYTES,
) -> None:
    """Top-k nearest samples of a sample or an image file, with similarity, label, generator, split.

    A reader: it never waits for a writer and never builds an index."""
    from pipeline.stages import neighbors as stage

    with _running(ctx) as reporter:
        result = stage.run(stage.NeighborQuery(Store(store), sample_id, image, k, model_key, run, vectors,
                                               max_bytes=max_bytes), reporter)
    show.show_neighbors(result, k, vectors)


@app.command()
def leaks(
    ctx: typer.Context,
    store: StoreOpt = DEFAULT_STORE,
    model_key: ModelKeyOpt = None,
    threshold: Annotated[float, typer.Option(help="Cosine similarity at or above which two images are "
                                             "near-duplicates.")] = 0.95,
    k: Annotated[int, typer.Option("-k", help="Neighbours examined per val/test image.")] = 10,
    exact: Annotated[bool, typer.Option(help="Search exhaustively (flat) whatever the store's size.")] = False,
    max_memory: MaxMemoryOpt = "4GB",
    wait: WaitOpt = True,
) -> None:
    """Find near-duplicate images across splits (and exact ones by hash); write them to the `leaks` view."""
    from pipeline.features.ann.plan import parse_memory
    from pipeline.stages import leaks as stage

    with _running(ctx) as reporter:
        result = stage.run(stage.LeakConfig(Store(store), model_key, threshold, k, exact,
                                            max_memory=parse_memory(max_memory), wait=wait), reporter)
    show.show_leaks(result)


@app.command()
def report(
    ctx: typer.Context,
    run: Annotated[str, typer.Option("--run", help="The run to report.")],
    store: StoreOpt = DEFAULT_STORE,
    output: Annotated[Path | None, typer.Option(help="Directory (default STORE/reports/run-RUN).")] = None,
    split: Annotated[c.Split, typer.Option(help="Which split the figures show.")] = "test",
    threshold: Annotated[float, typer.Option(help="Score threshold of the confusion matrix.")] = 0.5,
    exclude_leaks: Annotated[bool, typer.Option(help="Leave leaking samples out (needs `pipeline leaks`).")] = False,
) -> None:
    """A static HTML page + PNGs of a run: ROC, AUC per generator, score histograms, confusion matrix."""
    from pipeline.stages import report as stage

    with _running(ctx) as reporter:
        result = stage.run(stage.ReportConfig(Store(store), run, output, split, threshold, exclude_leaks), reporter)
    show.show_report(result)


@app.command()
def landscape(
    ctx: typer.Context,
    run: Annotated[list[str], typer.Option("--run", help="A run; give --run twice to compare (e.g. SAM vs not).")],
    store: StoreOpt = DEFAULT_STORE,
    dims: Annotated[c.LandscapeDims, typer.Option(help="1: a curve; 2: a contour plot.")] = 1,
    steps: Annotated[int | None, typer.Option(help="Points per axis (default 41 for 1-D, 17 for 2-D).")] = None,
    span: Annotated[float, typer.Option(help="Coordinates run over [-span, span].")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the random directions.")] = 0,
    output: Annotated[Path | None, typer.Option(help="PNG path (default under STORE/reports/).")] = None,
) -> None:
    """Loss around trained weights along filter-normalised random directions (Li et al. 2018; Figure 3)."""
    from pipeline.stages import landscape as stage

    with _running(ctx) as reporter:
        result = stage.run(stage.LandscapeConfig(Store(store), tuple(run), dims, steps, span, seed, output), reporter)
    show.show_landscape(result)


@app.command()
def models() -> None:
    """List the open_clip architectures and pretrained tags known here (weights need a network)."""
    from pipeline.encoding.clip import known_models

    show.show_models(known_models())


@app.command()
def demo(
    ctx: typer.Context,
    root: Annotated[Path, typer.Option(help="Where the synthetic data and the store go.")] = Path("data/demo"),
    rows: Annotated[int, typer.Option(help="D3 rows to synthesise (each gives 4 generated + 1 real).")] = 100,
    workers: Annotated[int | None, typer.Option(help="Decoding processes (default as in encode).")] = None,
) -> None:
    """Run everything offline: synthesise D3-layout data, ingest, encode twice, train, neighbours, report, SQL.

    The data are synthetic and the CLIP model (Tiny-ViT-16) has random weights: the point is to
    show the pipeline working end to end, not meaningful embeddings.
    """
    from pipeline.compositions import demo as composition

    show.demo_intro()
    with _running(ctx) as reporter:
        result = composition.run(composition.DemoConfig(root=root, rows=rows, workers=workers), reporter)
    show.show_demo(result)


@catalog_app.command("rebuild")
def catalog_rebuild(ctx: typer.Context, store: StoreOpt = DEFAULT_STORE, wait: WaitOpt = True) -> None:
    """Recreate the manifest and catalog.duckdb from the Parquet files (they are the truth)."""
    from pipeline.stages import rebuild as stage

    with _running(ctx) as reporter:
        result = stage.run(stage.RebuildConfig(Store(store), wait), reporter)
    show.show_rebuild(result)


@runs_app.command("list")
def runs_list(ctx: typer.Context, store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """Every run, newest first: id, name, when, detector, features, pairing, val and test AUC, alarms."""
    from pipeline.stages import runs as stage

    with _errors(ctx):
        result = stage.run(stage.ListRuns(Store(store)))
    show.show_json(result) if as_json else show.show_runs(result)


@runs_app.command("show")
def runs_show(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="A run id, or the start of one that names a single run.")],
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """One run: its metrics with 95% intervals per generator, alarms, config, files and report."""
    from pipeline.stages import runs as stage

    with _errors(ctx):
        result = stage.run(stage.ShowRun(Store(store), run))
    show.show_json(result) if as_json else show.show_run(result)


@runs_app.command("rm")
def runs_rm(
    ctx: typer.Context,
    runs: Annotated[list[str], typer.Argument(help="Whole run ids (`pipeline runs list` shows them).")],
    store: StoreOpt = DEFAULT_STORE,
    wait: WaitOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """Remove runs: their folders, reports, and rows in runs, scores and metrics, in one commit.

    A killed rm leaves every run whole or gone, never half: the next writer finishes or undoes it."""
    from pipeline.stages import runs as stage

    with _running(ctx) as reporter:
        result = stage.run(stage.RemoveRuns(Store(store), tuple(runs), wait), reporter)
    show.show_json(result) if as_json else show.show_runs_removed(result)


@app.command()
def clean(
    ctx: typer.Context,
    store: StoreOpt = DEFAULT_STORE,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would go, and remove nothing.")] = False,
    caches: Annotated[bool, typer.Option("--caches", help="Also every derived cache under STORE/cache (rebuilt "
                                         "when next needed: costs time, loses nothing).")] = False,
    reports: Annotated[bool, typer.Option("--reports", help="Also every report under STORE/reports (report and "
                                          "experiment write them again from the stored numbers).")] = False,
    wait: WaitOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """Free space: leftovers of dead processes, files nothing names, stale indexes and caches; says how much.

    By default only what nothing needs. Never removes a file a live process uses: it holds the writer
    lock, empties a cache only when no reader pins it, and removes temp files of dead processes only."""
    from pipeline.stages import clean as stage

    with _running(ctx) as reporter:
        result = stage.run(stage.CleanConfig(Store(store), dry_run, caches, reports, wait), reporter)
    show.show_json(result) if as_json else show.show_clean(result)


@app.command()
def verify(
    ctx: typer.Context,
    store: StoreOpt = DEFAULT_STORE,
    repair: Annotated[bool, typer.Option("--repair", help="Move damaged shards to STORE/damaged/ and make "
                                         "what they held pending again.")] = False,
    wait: WaitOpt = True,
) -> None:
    """Read every shard in full (pages, schema stamp, table, row counts) and list what is damaged."""
    from pipeline.stages import verify as stage

    with _running(ctx) as reporter:
        result = stage.run(stage.VerifyConfig(Store(store), repair, wait), reporter)
    show.show_verify(result, Path(store), repair)
    if not result.healthy and not repair:
        raise typer.Exit(1)


def main() -> None:
    fix_mmap_threshold()  # batch buffers go back to the OS when freed (see pipeline/allocator.py)
    app(prog_name="pipeline")


if __name__ == "__main__":  # pragma: no cover
    main()
