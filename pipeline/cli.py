"""The `pipeline` command: parse arguments, build a config, call one library function, render.

Every failure the user can fix arrives as a `PipelineError` and is printed as one sentence;
`pipeline --debug …` shows the traceback instead.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from pipeline.allocator import fix_mmap_threshold
from pipeline.errors import PipelineError
from pipeline.present.terminal import (
    RichReporter,
    cell,
    err,
    out,
    print_encode_result,
    random_banner,
    render_table,
    short_ids,
    show_status,
)
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

StoreOpt = Annotated[
    Path, typer.Option("--store", help="Store directory (created on first ingest).", envvar="PIPELINE_STORE")
]
WaitOpt = Annotated[bool, typer.Option("--wait/--no-wait", help="When another process is writing to the "
                                       "store: wait for it (saying so), or stop at once.")]


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
) -> None:
    ctx.obj = {"debug": debug}


@contextmanager
def _errors(ctx: typer.Context) -> Iterator[None]:
    try:
        yield
    except PipelineError as exc:
        if (ctx.find_root().obj or {}).get("debug"):
            raise
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: everything written so far is kept; run again to resume.")
        raise typer.Exit(130) from None
    except Exception as exc:  # a full disk, from Python or from DuckDB's spill: one sentence, not a traceback
        if not _disk_full(exc) or (ctx.find_root().obj or {}).get("debug"):
            raise
        err.print(f"[bold red]error:[/] the disk is full ({exc}). Free some space and run the command again: "
                  "every file is written whole or not at all, so nothing written before this is lost.",
                  highlight=False)
        raise typer.Exit(1) from None


def _disk_full(exc: BaseException) -> bool:
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in str(exc)


def _parse_splits(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise PipelineError(f"--splits {text!r} must be three numbers like 0.8,0.1,0.1.") from None
    if len(parts) != 3:
        raise PipelineError(f"--splits {text!r} must be three numbers like 0.8,0.1,0.1.")
    return parts  # type: ignore[return-value]


@app.command()
def ingest(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help="The source: a file or directory, per --format.")],
    format: Annotated[str, typer.Option("--format", "-f", help="d3 | folder | webdataset | manifest")],
    store: StoreOpt = DEFAULT_STORE,
    real_images: Annotated[
        Path | None,
        typer.Option(help="d3: downloaded LAION images (folder or img2dataset output), matched by id or URL."),
    ] = None,
    generator: Annotated[
        str | None, typer.Option(help="webdataset: generator of every image ('real' for photographs).")
    ] = None,
    label_map: Annotated[
        Path | None, typer.Option(help="webdataset: CSV with key,label,generator per key.")
    ] = None,
    generators: Annotated[
        str, typer.Option(help="d3 webdataset form: names of gen_0..gen_3, comma-separated.")
    ] = "deepfloyd-if,sd-1.4,sd-2.1,sd-xl",
    group_by: Annotated[str, typer.Option(help="folder: split unit, 'stem' (same file name) or 'image'.")] = "stem",
    splits: Annotated[str, typer.Option(help="train,val,test fractions, or 'source' to keep the split the "
                                        "source declares (D3's train/validation/test files or keys, a "
                                        "manifest's split column).")] = "0.8,0.1,0.1",
    split_seed: Annotated[str, typer.Option(help="Salt of the split hash.")] = "0",
    max_bytes: Annotated[int, typer.Option(help="Largest image file read; larger ones are quarantined as "
                                           "too_large without being read.")] = 64 * 1024 * 1024,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for another process writing to the "
                                       "store, or stop at once.")] = True,
) -> None:
    """Add the images of SOURCE (with captions, labels, generators) to the store as samples.

    Images are identified by the SHA-256 of their bytes: ingesting the same image twice adds it
    once. Unreadable inputs and D3 rows whose real image is missing are counted, recorded in the
    quarantine table, and reported.
    """
    from pipeline.stages.ingest import IngestConfig, run

    with _errors(ctx):
        config = IngestConfig(
            source=source,
            format=format,  # type: ignore[arg-type]  # checked by the config, with a sentence
            store=Store(store),
            real_images=real_images,
            generator=generator,
            label_map=label_map,
            generators=tuple(g.strip() for g in generators.split(",")),
            group_by=group_by,  # type: ignore[arg-type]
            split_fractions=(0.8, 0.1, 0.1) if splits.strip() == "source" else _parse_splits(splits),
            splits_from="source" if splits.strip() == "source" else "hash",
            split_seed=split_seed,
            max_bytes=max_bytes,
            wait=wait,
        )
        with RichReporter() as reporter:
            result = run(config, reporter)
    out.print(
        f"[green]ingested[/] {result.added} new samples "
        f"({', '.join(f'{k} {v}' for k, v in sorted(result.by_split.items())) or 'none'}); "
        f"{result.already_in_store} already in the store, {result.duplicates_in_source} duplicates in the source; "
        f"{result.units_skipped} source files unchanged since the last ingest (not read)"
        + (f"; {result.units_resumed} grown files read from where the last ingest stopped." if result.units_resumed
           else ".")
    )
    if result.missing_captions:
        out.print(f"[yellow]{result.missing_captions} new samples have no caption[/]: image+text training "
                  "leaves them out.")
    for (here, there), count in result.generator_mismatches.most_common(4):
        out.print(f"[yellow]{count} images are already in the store as {there!r}[/], named {here!r} here: "
                  "check --generators (D3's gen_0..gen_3 follow the Parquet model_gen0..3).")
    if result.label_conflicts:
        out.print(f"[yellow]{result.label_conflicts} images appear under two labels[/] and are used as neither "
                  "(quarantined as label_conflict).")
    for reason, count in sorted(result.problems.items()):
        out.print(f"[yellow]quarantined[/] {count} × {reason} (see: pipeline sql \"SELECT * FROM quarantine\")")
    if result.rechecked:
        found = sum(result.resolved.values())
        out.print(f"The real-images folder changed: {result.rechecked} rows whose image was missing looked up again, "
                  f"{found} found and ingested (the source files themselves were not read again).")


@app.command()
def encode(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="open_clip architecture, e.g. ViT-L-14, ViT-B-32, Tiny-ViT-16.")],
    pretrained: Annotated[
        str | None,
        typer.Option(help="open_clip tag (openai, laion2b_s34b_b79k, …) or a local checkpoint file. "
                     "Omit for random weights (testing only)."),
    ] = None,
    store: StoreOpt = DEFAULT_STORE,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32 | bf16 | fp16 (fp16 on GPU only)")] = "fp32",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    workers: Annotated[int | None, typer.Option(help="Decoding processes (0: decode in this process). "
                                                "Default: 0 on a small CPU box, most cores with a GPU.")] = None,
    dtype: Annotated[str, typer.Option(help="Stored vector type: float16 | float32.")] = "float16",
    shard_rows: Annotated[int, typer.Option(help="Vectors per Parquet shard (the unit of resume).")] = 4096,
    max_pixels: Annotated[int, typer.Option(help="Images with more pixels are quarantined.")] = 64_000_000,
    seed: Annotated[int, typer.Option(help="Seed of random weights (when --pretrained is omitted).")] = 0,
    retry_quarantined: Annotated[bool, typer.Option(help="Try quarantined images again.")] = False,
    engine: Annotated[str, typer.Option(help="local: this machine | ray: a Ray cluster (pip install "
                                        "'clipdetect-pipeline[ray]'); every node must see --store at the "
                                        "same path (shared filesystem).")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster to join: auto | HOST:PORT. Default: "
                                                    "start a local Ray instance.")] = None,
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
    from pipeline.stages.encode import EncodeConfig, resolve_device, run

    with _errors(ctx):
        if precision == "bf16":
            _warn_bf16(resolve_device(device))
        config = EncodeConfig(
            store=Store(store),
            model=ModelSpec(model, pretrained, seed),
            device=device,  # type: ignore[arg-type]  # checked by the config, with a sentence
            precision=precision,  # type: ignore[arg-type]
            batch_size=batch_size,
            workers=workers,
            dtype=dtype,  # type: ignore[arg-type]
            shard_rows=shard_rows,
            max_pixels=max_pixels,
            retry_quarantined=retry_quarantined,
            engine=engine,  # type: ignore[arg-type]
            ray_address=ray_address,
            actors=actors,
            gpus_per_actor=gpus_per_actor,
            wait=wait,
        )
        with RichReporter() as reporter:
            result = run(config, reporter)
    print_encode_result(result)


@app.command()
def sql(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="One SELECT over samples, embeddings, quarantine, runs, scores.")],
    store: StoreOpt = DEFAULT_STORE,
    format: Annotated[str, typer.Option("--format", help="table | csv | json | parquet")] = "table",
    output: Annotated[Path | None, typer.Option(help="File to write (parquet needs one; csv and json "
                                                "without one go to stdout).")] = None,
    max_rows: Annotated[int, typer.Option(help="Rows shown in table format.")] = 50,
    allow_files: Annotated[bool, typer.Option("--allow-files", help="Let a plain SELECT read files "
                                              "outside the store too (still nothing can be written).")] = False,
) -> None:
    """Run a read-only SQL query over the store's views (samples, embeddings, quarantine, runs, scores,
    indexes, leaks) and print or export the result. Nothing the query says can write a file or reach
    the network."""
    from pipeline.stages.sql import EXPORT_FORMATS, check_output, export, run_query, to_text

    with _errors(ctx):
        if format != "table" and format not in EXPORT_FORMATS:
            raise PipelineError(f"--format must be table or one of {', '.join(EXPORT_FORMATS)}.")
        if format == "parquet" and output is None:
            raise PipelineError("--format parquet writes a file: give --output FILE.")
        if output is not None:
            check_output(Store(store), output)
        table = run_query(Store(store), query, allow_files)
        if output is not None:
            path = export(table, output, "parquet" if format == "table" else format)
            err.print(f"[green]wrote[/] {table.num_rows} rows to {path}")
            return
        if format != "table":
            typer.echo(to_text(table, format), nl=False)
            return
    render_table(table, max_rows=max_rows)


@app.command()
def status(ctx: typer.Context, store: StoreOpt = DEFAULT_STORE) -> None:
    """Counts by split, label and generator; per model, encoded vs pending."""
    from pipeline.stages.status import StatusConfig, run

    with _errors(ctx):
        result = run(StatusConfig(Store(store)))
    show_status(result)


@app.command("import-features")
def import_features(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help="Folder (or file) of precomputed features.")],
    layout: Annotated[str, typer.Option(help="h5 (reference code's NNNN.h5) | clip-retrieval")],
    model_key: Annotated[str, typer.Option(help="Name of the model that made them, e.g. ViT-L-14__openai.")],
    store: StoreOpt = DEFAULT_STORE,
    generators: Annotated[str, typer.Option(help="h5: names of image_gen0..3, comma-separated.")]
    = "deepfloyd-if,sd-1.4,sd-2.1,sd-xl",
    generator: Annotated[str | None, typer.Option(help="clip-retrieval without a label column: the "
                                                  "generator of every image ('real' for photographs).")] = None,
    splits: Annotated[str, typer.Option(help="train,val,test fractions.")] = "0.8,0.1,0.1",
    wait: WaitOpt = True,
) -> None:
    """Import CLIP features computed elsewhere, as samples plus embeddings, without re-encoding."""
    from pipeline.stages.import_features import ImportConfig, run

    with _errors(ctx):
        config = ImportConfig(
            source=source, layout=layout, store=Store(store), model_key=model_key,  # type: ignore[arg-type]
            generators=tuple(g.strip() for g in generators.split(",")), generator=generator,
            split_fractions=_parse_splits(splits), wait=wait,
        )
        with RichReporter() as reporter:
            result = run(config, reporter)
    out.print(f"[green]imported[/] {result.samples_added} samples and {result.vectors_added} vectors "
              f"as {result.model_key}; {result.already_present} samples were already present"
              + (f"; {result.units_skipped} unchanged files skipped unread." if result.units_skipped else "."))


def _train_overrides(**flags: Any) -> dict[str, Any]:
    """CLI flags that were given (not None), as flat config keys."""
    return {k: v for k, v in flags.items() if v is not None}


def _base_config(config: Path | None) -> dict[str, Any]:
    import tomllib

    if config is None:
        return {}
    try:
        return tomllib.loads(config.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PipelineError(f"Cannot read {config}: {exc}") from exc


def _warn_bf16(device: Any) -> None:
    from pipeline.stages.encode import BF16_EMULATED, cpu_bf16_native

    if device.type == "cpu" and not cpu_bf16_native():
        err.print(f"[bold yellow]warning[/]: {BF16_EMULATED}; consider fp32.")


@app.command("train")
def train_cmd(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(help="TOML file of options (flags below override it).")] = None,
    store: StoreOpt = DEFAULT_STORE,
    model_key: Annotated[str | None, typer.Option(help="Which cached embeddings (default: the only one).")] = None,
    features: Annotated[str | None, typer.Option(help="image | text | image+text")] = None,
    pairing: Annotated[str | None, typer.Option(help="as-ingested | shared (one text per real image and "
                                                "its generated siblings: removes caption shortcuts)")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    cvar: Annotated[bool | None, typer.Option("--cvar/--no-cvar", help="CVaR loss (level --cvar-alpha).")] = None,
    cvar_alpha: Annotated[float | None, typer.Option()] = None,
    auc: Annotated[bool | None, typer.Option("--auc/--no-auc", help="AUC loss, weight 1 − --auc-gamma.")] = None,
    auc_gamma: Annotated[float | None, typer.Option()] = None,
    sam: Annotated[bool | None, typer.Option("--sam/--no-sam", help="SAM optimiser (radius --sam-rho).")] = None,
    sam_rho: Annotated[float | None, typer.Option()] = None,
    bf16: Annotated[bool | None, typer.Option("--bf16/--fp32", help="bf16 autocast for the MLP.")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    detector: Annotated[str | None, typer.Option(help="mlp (the paper's) | knn (vote of the nearest "
                                                 "training samples, k chosen on val)")] = None,
    exclude_leaks: Annotated[bool | None, typer.Option(
        "--exclude-leaks/--keep-leaks", help="Leave val/test samples with a near-duplicate in an earlier split "
        "out of the metrics (needs `pipeline leaks`).")] = None,
    leak_threshold: Annotated[float | None, typer.Option(help="Cosine similarity of a near-duplicate.")] = None,
    input_norm: Annotated[str | None, typer.Option(help="l2 (unit vectors, as stored) | raw (each vector "
                                                   "times its stored norm: the reference code's inputs)")] = None,
    steps_per_epoch: Annotated[int | None, typer.Option(help="Stop each epoch after this many batches "
                                                        "(default: the whole train split).")] = None,
    name: Annotated[str | None, typer.Option(help="A label for the run (not part of its hash).")] = None,
    wait: WaitOpt = True,
) -> None:
    """Fit the detector (MLP, CVaR + AUC loss, SAM) on cached embeddings; record a run and its scores.

    Defaults are the paper's: image+text features, CVaR α 0.8, AUC η 0.6 p 2 γ 0.5, SAM ρ 0.05,
    AdamW lr 1e-3, batch 2048, 32 epochs. The best validation epoch is kept.
    """
    from pipeline.runs import TrainConfig
    from pipeline.stages.train import TrainJob, run

    with _errors(ctx):
        options = {**_base_config(config), **_train_overrides(
            model_key=model_key, features=features, pairing=pairing, epochs=epochs, batch_size=batch_size,
            lr=lr, cvar=cvar, cvar_alpha=cvar_alpha, auc=auc, auc_gamma=auc_gamma, sam=sam, sam_rho=sam_rho,
            bf16=bf16, seed=seed, detector=detector, exclude_leaks=exclude_leaks, leak_threshold=leak_threshold,
            input_norm=input_norm, steps_per_epoch=steps_per_epoch, name=name)}
        train_config = TrainConfig.from_dict(options)
        if train_config.fit.bf16:
            import torch

            _warn_bf16(torch.device("cpu"))
        with RichReporter() as reporter:
            result = run(TrainJob(Store(store), train_config, wait=wait), reporter)
    random_banner(result.random_weights)
    test = result.metrics["test"]
    chosen = (f"k = {result.metrics['k']}" if "k" in result.metrics
              else f"best epoch {result.metrics.get('best_epoch')}")
    out.print(f"[green]run[/] {result.run_id}: {chosen}, "
              f"val AUC {result.metrics['val'].get('auc', float('nan')):.4f}, "
              f"test AUC {test.get('auc', float('nan')):.4f}, AP {test.get('ap', float('nan')):.4f}, "
              f"accuracy {test.get('accuracy', float('nan')):.4f}")
    for gen, value in test.get("auc_by_generator", {}).items():
        out.print(f"  {gen}: test AUC {value:.4f}")
    out.print(f'[dim]scores: pipeline sql "SELECT * FROM scores WHERE run_id = \'{result.run_id}\' LIMIT 10"[/]')
    left = result.metrics.get("left_out") or {}
    if left.get("no_image_vector"):
        out.print(f"[yellow]left out[/] {left['no_image_vector']} samples without an image vector for this "
                  "model (not encoded yet, or quarantined at decode: `pipeline status` shows which).")
    if left.get("no_text_vector"):
        out.print(f"[yellow]left out[/] {left['no_text_vector']} samples without a text vector "
                  f"({train_config.features} features need one): an empty or missing caption, or a caption "
                  "not encoded yet; --features image keeps them.")
    _shortcut_alarm(Store(store), train_config, result.metrics)


def _shortcut_alarm(store: Store, config: Any, metrics: dict[str, Any]) -> None:
    """The text-shortcut sentence when this run, or a text-only run on the same embeddings, shows one."""
    from pipeline import shortcuts

    if config.features == "text":
        alarm = shortcuts.text_alarm(metrics.get("test", {}))
    else:
        found = shortcuts.text_only_summary(store, metrics["model_key"], config.pairing)
        alarm = shortcuts.text_alarm(found[1], metrics.get("test", {})) if found else None
    if alarm:
        err.print(f"[bold white on red] SHORTCUT [/] [bold red]{alarm}[/]")


@app.command("sweep")
def sweep_cmd(
    ctx: typer.Context,
    grid: Annotated[Path, typer.Option(help="TOML with [base] and [grid] (crossed lists) or [[runs]].")],
    store: StoreOpt = DEFAULT_STORE,
    jobs: Annotated[int, typer.Option(help="Runs in parallel (processes).")] = 1,
    engine: Annotated[str, typer.Option(help="local: this machine | ray: one Ray Tune trial per config "
                                        "(store on a filesystem every node sees).")] = "local",
    samples: Annotated[int | None, typer.Option(help="Run N configs drawn at random from the grid.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --samples draw.")] = 0,
    scheduler: Annotated[str, typer.Option(help="Ray Tune scheduler: fifo | asha (stops weak trials "
                                           "early on per-epoch val AUC).")] = "fifo",
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster to join: auto | HOST:PORT. Default: "
                                                    "start a local Ray instance.")] = None,
) -> None:
    """Train many configs over the same cached features; configs already run are skipped."""
    from pipeline.stages.sweep import SweepConfig, grid_configs, run

    with _errors(ctx):
        config = SweepConfig(Store(store), tuple(grid_configs(grid)), jobs, engine=engine,  # type: ignore[arg-type]
                             samples=samples, seed=seed, scheduler=scheduler,  # type: ignore[arg-type]
                             ray_address=ray_address)
        with RichReporter() as reporter:
            result = run(config, reporter)
    view = Table(title="sweep", header_style="bold", title_justify="left")
    for col in ("run_id", "options", "status", "val AUC", "test AUC"):
        view.add_column(col)
    for row in result.rows:
        opts = ", ".join(f"{k}={v}" for k, v in row.overrides.items())
        status = ("skipped (exists)" if row.skipped else "trained" if row.stopped_after is None
                  else f"stopped after {row.stopped_after} reports (asha)")
        view.add_row(row.run_id, opts, status, cell(row.val_auc), cell(row.test_auc))
    out.print(view)
    out.print(f"open_clip imported by this sweep: {'yes' if result.open_clip_imported else 'no'}")


@app.command("experiment")
def experiment_cmd(
    ctx: typer.Context,
    table: Annotated[str, typer.Argument(help="table1 | table2 | generalization | robustness")],
    store: StoreOpt = DEFAULT_STORE,
    model_key: Annotated[str | None, typer.Option(help="Which cached embeddings (default: the only one).")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML of base options for every row.")] = None,
    pairing: Annotated[str | None, typer.Option(help="as-ingested | shared")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    exclude_leaks: Annotated[bool | None, typer.Option(
        "--exclude-leaks/--keep-leaks", help="Leave leaking val/test samples out of every row's metrics.")] = None,
    seeds: Annotated[int, typer.Option(help="Runs per row (seeds --seed, +1, …): mean ± sd beside the intervals.")] = 1,
    run_id: Annotated[str | None, typer.Option("--run", help="robustness: the trained run to test.")] = None,
    features: Annotated[str | None, typer.Option(help="generalization: image (default) | text | image+text")] = None,
    seed: Annotated[int | None, typer.Option(help="The first seed.")] = None,
) -> None:
    """The paper's tables and the evaluations the field reports, as runs with 95% intervals.

    table1: baselines vs method + text-only (shortcut alarm) + kNN, and a file-format probe.
    table2: the ablation. generalization: train on one generator (and on all but one), test on each.
    robustness --run RUN: AUC on the test split's perturbed copies (`pipeline perturb`, then `encode`).
    Writes the table as Markdown and as an HTML page with its figure under STORE/reports/.
    """
    from pipeline.stages.experiment import TABLES, ExperimentConfig, run

    with _errors(ctx):
        if table not in TABLES:
            raise PipelineError(f"Unknown experiment {table!r}: choose one of {', '.join(TABLES)}.")
        base = {**_base_config(config), **_train_overrides(
            model_key=model_key, pairing=pairing, epochs=epochs, batch_size=batch_size, exclude_leaks=exclude_leaks,
            features=features, seed=seed)}
        with RichReporter() as reporter:
            result = run(ExperimentConfig(Store(store), table, base, seeds, run_id), reporter)  # type: ignore[arg-type]
    from rich.markdown import Markdown

    out.print(Markdown(result.markdown))
    for alarm in result.alarms:
        label = "SHORTCUT" if alarm.startswith("Shortcut") else "WARNING"
        err.print(f"[bold white on red] {label} [/] [bold red]{alarm}[/]")
    out.print(f"[green]wrote[/] {result.path} and {result.page} ({result.seconds:.1f} s)")


@app.command("perturb")
def perturb_cmd(
    ctx: typer.Context,
    ops: Annotated[list[str] | None, typer.Option(
        "--ops", help="Operations and strengths, e.g. --ops jpeg:90,75,50 --ops resize:0.5,0.25 --ops blur:1,2 "
        "--ops crop:0.8 --ops noise:0.02 (or several in one quoted value).")] = None,
    ops_file: Annotated[Path | None, typer.Option(
        help="TOML file of operations, e.g. jpeg = [90, 75] and blur = [1, 2].")] = None,
    store: StoreOpt = DEFAULT_STORE,
    splits: Annotated[str, typer.Option(help="Comma-separated splits to derive from; train,val,test applies "
                                        "the operation everywhere (train and test then share one format).")] = "test",
    limit: Annotated[int | None, typer.Option(help="At most this many source samples per split.")] = None,
) -> None:
    """Derive perturbed samples (own ids, derived_from, perturbation) for robustness tests; rerun adds nothing."""
    from pipeline.stages.perturb import PerturbConfig, run

    with _errors(ctx):
        specs = tuple(s for value in (ops or []) for s in value.split())
        if ops_file is not None:
            specs += PerturbConfig.ops_from_toml(ops_file)
        config = PerturbConfig(Store(store), specs, tuple(s.strip() for s in splits.split(",") if s.strip()), limit)
        with RichReporter() as reporter:
            result = run(config, reporter)
    for op, n in result.by_op.items():
        out.print(f"  {op}: {n} new samples")
    out.print(f"[green]derived[/] {result.derived} samples ({result.existing} already derived, "
              f"{result.undecodable} sources undecodable) in {result.seconds:.1f} s; "
              "next: `pipeline encode` (encodes only the new images), then `pipeline experiment robustness --run RUN`.")


@app.command("score")
def score_cmd(
    ctx: typer.Context,
    run: Annotated[str, typer.Option("--run", help="The run whose detector scores the samples.")],
    store: StoreOpt = DEFAULT_STORE,
    wait: WaitOpt = True,
) -> None:
    """Score every encoded sample that this run has not scored yet (e.g. newly ingested ones)."""
    from pipeline.stages.score import ScoreConfig
    from pipeline.stages.score import run as score

    with _errors(ctx):
        with RichReporter() as reporter:
            result = score(ScoreConfig(Store(store), run, wait), reporter)
    out.print(f"[green]scored[/] {result.scored} samples with run {result.run_id} "
              f"({result.already_scored} already had a score).")


@index_app.command("build")
def index_build(
    ctx: typer.Context,
    store: StoreOpt = DEFAULT_STORE,
    model_key: Annotated[str | None, typer.Option(help="Which cached embeddings (default: the only one).")] = None,
    kind: Annotated[str, typer.Option(help="auto (the most exact that fits --max-memory: flat below 100k "
                                      "vectors, then ivf, ivf-sq8, ivf-pq) | flat | ivf | ivf-sq8 | ivf-pq | hnsw")
                    ] = "auto",
    vectors: Annotated[str, typer.Option(help="image | text")] = "image",
    nlist: Annotated[int | None, typer.Option(help="IVF lists (default: one per ~1024 vectors, as many as "
                                              "the training sample can place).")] = None,
    max_memory: Annotated[str, typer.Option(help="Memory the index may take to build and search, e.g. 4GB.")
                          ] = "4GB",
    target_recall: Annotated[float, typer.Option(help="Approximate kinds widen their search to reach this "
                                                 "recall@10 against exact search.")] = 0.95,
    force: Annotated[bool, typer.Option(help="Rebuild even if the embeddings did not change.")] = False,
    wait: WaitOpt = True,
) -> None:
    """Build a FAISS index (cosine similarity) over one model's cached vectors; reused until they change."""
    from pipeline.features.index import parse_memory
    from pipeline.stages.index import IndexConfig, run

    with _errors(ctx):
        if not 0 < target_recall <= 1:
            raise PipelineError("--target-recall must lie in (0, 1].")
        with RichReporter() as reporter:
            info = run(IndexConfig(Store(store), model_key, kind, vectors, nlist,  # type: ignore[arg-type]
                                   target_recall=target_recall, force=force,
                                   max_memory=parse_memory(max_memory), wait=wait), reporter)
    verb = "built" if info.built else "up to date (embeddings unchanged), reused"
    out.print(f"[green]{verb}[/] {info.kind} index {info.index_id}: {info.vectors:,} × {info.dim} "
              f"{info.modality} vectors of {info.model_key}, params {info.params}, {info.build_seconds:.2f} s")
    if info.kind != "flat":
        tried = ", ".join(f"{b}: {r:.3f}" for b, r in info.recall_by_breadth.items())
        by = f" (by search breadth {tried})" if tried else ""
        depths = info.params.get("recall_by_rerank") or {}
        if depths:
            by += f"; re-ranking {info.params['rerank']} candidates exactly (by depth " + \
                ", ".join(f"{d}: {r:.3f}" for d, r in depths.items()) + ")"
        out.print(f"recall@10 against exact search: {info.recall_at_10:.4f}{by}")
        if info.built and info.recall_at_10 is not None and info.recall_at_10 < target_recall:
            out.print(f"[yellow]below the target {target_recall}:[/] no wider search or deeper re-ranking reached "
                      "it (these vectors' neighbours are hard to tell apart); --kind flat searches exactly, and a "
                      "larger --max-memory lets auto keep more of each vector.")


@app.command()
def neighbors(
    ctx: typer.Context,
    sample_id: Annotated[str | None, typer.Option(help="A sample in the store (a unique prefix will do).")] = None,
    image: Annotated[Path | None, typer.Option(help="An image file, encoded now with the store's model.")] = None,
    k: Annotated[int, typer.Option("-k", help="How many neighbours.")] = 10,
    store: StoreOpt = DEFAULT_STORE,
    model_key: Annotated[str | None, typer.Option(help="Which cached embeddings (default: the only one).")] = None,
    run: Annotated[str | None, typer.Option("--run", help="Show this run's score of each neighbour.")] = None,
    vectors: Annotated[str, typer.Option(help="image | text")] = "image",
    wait: WaitOpt = True,
) -> None:
    """Top-k nearest samples of a sample or an image file, with similarity, label, generator, split."""
    from pipeline.stages.neighbors import NeighborQuery
    from pipeline.stages.neighbors import run as find

    with _errors(ctx):
        query = NeighborQuery(Store(store), sample_id, image, k, model_key, run, vectors,  # type: ignore[arg-type]
                              wait=wait)
        with RichReporter() as reporter:
            result = find(query, reporter)
    random_banner(result.random_weights)
    render_table(short_ids(result.rows), title=f"{k} nearest {vectors} neighbours of {result.query} "
                                    f"({result.index_kind} index, {result.model_key})")


@app.command()
def leaks(
    ctx: typer.Context,
    store: StoreOpt = DEFAULT_STORE,
    model_key: Annotated[str | None, typer.Option(help="Which cached embeddings (default: the only one).")] = None,
    threshold: Annotated[float, typer.Option(help="Cosine similarity at or above which two images are "
                                             "near-duplicates.")] = 0.95,
    k: Annotated[int, typer.Option("-k", help="Neighbours examined per val/test image.")] = 10,
    exact: Annotated[bool, typer.Option(help="Search exhaustively (flat) whatever the store's size.")] = False,
    max_memory: Annotated[str, typer.Option(help="Memory an index built for the scan may take, e.g. 4GB.")
                          ] = "4GB",
    wait: WaitOpt = True,
) -> None:
    """Find near-duplicate images across splits (and exact ones by hash); write them to the `leaks` view."""
    from pipeline.features.index import parse_memory
    from pipeline.stages.leaks import LeakConfig, run

    with _errors(ctx):
        with RichReporter() as reporter:
            result = run(LeakConfig(Store(store), model_key, threshold, k, exact,
                                    max_memory=parse_memory(max_memory), wait=wait), reporter)
    random_banner(Store(store).model_info(result.model_key).get("random_weights"))
    approx = "" if result.index_kind == "flat" else f" (approximate {result.index_kind} index, recall@10 " \
        f"{result.recall_at_10:.3f}; --exact searches exhaustively)"
    out.print(f"searched {result.queries:,} val/test images at similarity ≥ {threshold}{approx}: "
              f"{result.pair_count:,} cross-split pairs")
    if result.by_split_pair.num_rows:
        render_table(result.by_split_pair, title="pairs per split pair")
    out.print(f'[dim]pipeline sql "SELECT * FROM leaks WHERE threshold = {threshold} ORDER BY similarity DESC"; '
              "train/experiment/report take --exclude-leaks[/]")


@app.command()
def report(
    ctx: typer.Context,
    run: Annotated[str, typer.Option("--run", help="The run to report.")],
    store: StoreOpt = DEFAULT_STORE,
    output: Annotated[Path | None, typer.Option(help="Directory (default STORE/reports/run-RUN).")] = None,
    split: Annotated[str, typer.Option(help="Which split the figures show.")] = "test",
    threshold: Annotated[float, typer.Option(help="Score threshold of the confusion matrix.")] = 0.5,
    exclude_leaks: Annotated[bool, typer.Option(help="Leave leaking samples out (needs `pipeline leaks`).")] = False,
) -> None:
    """A static HTML page + PNGs of a run: ROC, AUC per generator, score histograms, confusion matrix."""
    from pipeline.stages.report import ReportConfig
    from pipeline.stages.report import run as write_report

    with _errors(ctx):
        config = ReportConfig(Store(store), run, output, split, threshold, exclude_leaks)  # type: ignore[arg-type]
        result = write_report(config)
    if result.alarm:
        err.print(f"[bold white on red] SHORTCUT [/] [bold red]{result.alarm}[/]")
    out.print(f"[green]wrote[/] {result.page} with {', '.join(f.name for f in result.files)}")


@app.command()
def landscape(
    ctx: typer.Context,
    run: Annotated[list[str], typer.Option("--run", help="A run; give --run twice to compare (e.g. SAM vs not).")],
    store: StoreOpt = DEFAULT_STORE,
    dims: Annotated[int, typer.Option(help="1: a curve; 2: a contour plot.")] = 1,
    steps: Annotated[int | None, typer.Option(help="Points per axis (default 41 for 1-D, 17 for 2-D).")] = None,
    span: Annotated[float, typer.Option(help="Coordinates run over [-span, span].")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the random directions.")] = 0,
    output: Annotated[Path | None, typer.Option(help="PNG path (default under STORE/reports/).")] = None,
) -> None:
    """Loss around trained weights along filter-normalised random directions (Li et al. 2018; Figure 3)."""
    from pipeline.stages.landscape import LandscapeConfig
    from pipeline.stages.landscape import run as draw

    with _errors(ctx):
        with RichReporter() as reporter:
            config = LandscapeConfig(Store(store), tuple(run), dims, steps, span, seed, output)  # type: ignore[arg-type]
            result = draw(config, reporter)
    for s in result.surfaces:
        rec = "–" if s.recorded_eval_loss is None else f"{s.recorded_eval_loss:.6f}"
        out.print(f"{s.label}: loss at the trained weights {s.centre_loss:.6f} (run recorded {rec}); "
                  f"range {s.losses.min():.4f} … {s.losses.max():.4f}")
    out.print(f"[green]wrote[/] {result.png} and {result.data}")


@app.command()
def models() -> None:
    """List the open_clip architectures and pretrained tags known here (weights need a network)."""
    import open_clip

    from pipeline.encoding.clip import register_configs

    register_configs()
    tags: dict[str, list[str]] = {}
    for name, tag in open_clip.list_pretrained():
        tags.setdefault(name, []).append(tag)
    view = Table(header_style="bold")
    view.add_column("architecture")
    view.add_column("pretrained tags")
    for name in open_clip.list_models():
        view.add_row(name, ", ".join(tags.get(name, [])) or "[dim](random weights / local checkpoint)[/]")
    out.print(view)


DEMO_QUERIES = (
    ("samples per generator and split",
     "SELECT generator, split, count(*) AS n FROM samples GROUP BY ALL ORDER BY generator, split"),
    ("why inputs were quarantined",
     "SELECT stage, reason, count(*) AS n, any_value(detail) AS example FROM quarantine GROUP BY ALL"),
    ("each sample with its image and text vectors (first rows)",
     "SELECT s.generator, s.label, left(s.text, 40) AS text, len(i.vector) AS image_dim, "
     "len(t.vector) AS text_dim FROM samples s "
     "JOIN embeddings i ON i.modality = 'image' AND i.content_hash = s.sample_id "
     "JOIN embeddings t ON t.modality = 'text' AND t.content_hash = s.text_hash LIMIT 5"),
    ("the detector's test scores by generator",
     "SELECT generator, count(*) AS n, round(avg(score), 3) AS mean_score, "
     "round(avg(((score > 0.5)::INT = label)::INT), 3) AS accuracy "
     "FROM scores WHERE split = 'test' GROUP BY 1 ORDER BY 1"),
)


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
    from pipeline.stages.demo import DemoConfig
    from pipeline.stages.demo import run as run_demo
    from pipeline.stages.sql import run_query
    from pipeline.stages.status import StatusConfig
    from pipeline.stages.status import run as store_status

    out.rule("[bold]pipeline demo")
    out.print("[bold yellow]Synthetic data, random weights.[/] The images are drawn by numpy and the "
              "CLIP model is a tiny open_clip config with random weights; nothing here is a real result.")
    with _errors(ctx):
        with RichReporter() as reporter:
            result = run_demo(DemoConfig(root=root, rows=rows, workers=workers), reporter)
    ing = result.ingested
    out.print(f"[green]ingest[/]: {ing.added} samples from {result.data.rows} D3 rows; "
              f"quarantined {dict(ing.problems)} (a D3 row without its LAION image is reported, not dropped).")
    out.print("[green]encode, first run[/]:", end=" ")
    print_encode_result(result.encoded)
    out.print("[green]encode, second run[/]:", end=" ")
    print_encode_result(result.encoded_again)
    run = result.trained
    out.print(f"[green]train[/] (CVaR + AUC + SAM on image+text, from the cache, no CLIP call): run {run.run_id}, "
              f"test AUC {run.metrics['test'].get('auc', float('nan')):.3f} "
              "[yellow](random-weight CLIP on synthetic images: a pipeline check, not a result)[/]")
    with _errors(ctx):
        show_status(store_status(StatusConfig(result.store)))
        for title, query in DEMO_QUERIES:
            out.print(f"[dim]$ pipeline sql --store {result.store.root} \"{query}\"[/]")
            render_table(run_query(result.store, query), title)
    nb = result.neighbours
    out.print(f"[dim]$ pipeline neighbors --store {result.store.root} --sample-id {nb.query[:12]} -k 3 "
              f"--run {run.run_id}[/]")
    render_table(short_ids(nb.rows), f"nearest images of a test sample ({nb.index_kind} FAISS index)")
    out.print(f"[green]report[/]: {result.report.page} (ROC, AUC per generator, score histograms, confusion)")
    example = "SELECT * FROM samples LIMIT 5"
    out.print(f"Store: {result.store.root}  (try: pipeline sql --store {result.store.root} \"{example}\")")


@catalog_app.command("rebuild")
def catalog_rebuild(
    ctx: typer.Context,
    store: StoreOpt = DEFAULT_STORE,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for another writer, or stop at once.")] = True,
) -> None:
    """Recreate the manifest and catalog.duckdb from the Parquet files (they are the truth)."""
    from pipeline.stages.catalog import RebuildConfig, run

    with _errors(ctx):
        with RichReporter() as reporter:
            result = run(RebuildConfig(Store(store), wait), reporter)
    out.print(f"[green]rebuilt[/] the catalog from {result.added} shards.")
    for rel in result.ignored:
        out.print(f"[yellow]left out[/] {rel}: it is not a readable shard of this pipeline; "
                  "`pipeline verify` says why and `pipeline verify --repair` moves it aside.")


@app.command()
def verify(
    ctx: typer.Context,
    store: StoreOpt = DEFAULT_STORE,
    repair: Annotated[bool, typer.Option("--repair", help="Move damaged shards to STORE/damaged/ and make "
                                         "what they held pending again.")] = False,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="With --repair: wait for another writer, "
                                       "or stop at once.")] = True,
) -> None:
    """Read every shard in full (pages, schema stamp, table, row counts) and list what is damaged."""
    from pipeline.stages.verify import VerifyConfig, run

    with _errors(ctx):
        with RichReporter() as reporter:
            result = run(VerifyConfig(Store(store), repair, wait), reporter)
    out.print(f"checked {result.shards_checked} shards, {result.rows_checked} rows.")
    if result.healthy:
        out.print("[green]no damage found[/]")
        return
    import pyarrow as pa

    render_table(pa.table({
        "shard": [d.path for d in result.damaged],
        "in views": ["yes" if d.committed else "no" for d in result.damaged],
        "problem": [d.problem for d in result.damaged],
        "rows": [d.rows for d in result.damaged],
        "then": [d.remedy for d in result.damaged],
    }), title="damaged shards")
    if repair:
        out.print(f"[green]moved[/] {len(result.repaired)} files to {Path(store) / 'damaged'}; rerun the stages "
                  "named above to restore what they held.")
    else:
        out.print("run `pipeline verify --repair` to move them aside.")
        raise typer.Exit(1)


def main() -> None:
    fix_mmap_threshold()  # batch buffers go back to the OS when freed (see pipeline/allocator.py)
    app(prog_name="pipeline")


if __name__ == "__main__":  # pragma: no cover
    main()
