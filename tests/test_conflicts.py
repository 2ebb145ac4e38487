"""Unlabelled samples and label conflicts: training data changes only when a user says so."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.stages.ingest import IngestConfig
from pipeline.stages.ingest import run as ingest
from pipeline.stages.status import StatusConfig
from pipeline.stages.status import run as status
from pipeline.store import catalog
from pipeline.store.layout import Store
from tests.conftest import jpeg

runner = CliRunner()


def _cli(*args: str) -> str:
    result = runner.invoke(app, list(args), env={"COLUMNS": "250"})  # tables unwrapped
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def _labelled_folder(root: Path, n_real: int = 6, n_fake: int = 4) -> Path:
    for i in range(n_real):
        (root / "real").mkdir(parents=True, exist_ok=True)
        (root / "real" / f"{i}.jpg").write_bytes(jpeg((10 + 20 * i, 100, 50)))
    for i in range(n_fake):
        (root / "sdxl").mkdir(parents=True, exist_ok=True)
        (root / "sdxl" / f"{i}.png").write_bytes(jpeg((200, 10 + 20 * i, 90), fmt="PNG"))
    return root


def _counts(store: Store) -> dict[tuple[str, object], int]:
    rows = catalog.query(Store(store.root), "SELECT split, label, count(*) AS n FROM samples GROUP BY ALL").to_pylist()
    return {(r["split"], r["label"]): r["n"] for r in rows}


def test_the_issue_case_three_real_images_again_under_unknown(tmp_path: Path) -> None:
    """Three images already real, ingested again under unknown/: counts unchanged, a loud sentence,
    listed in SQL; resolved only by a command, and the command undone."""
    src = _labelled_folder(tmp_path / "imgs")
    store = Store(tmp_path / "store")
    ingest(IngestConfig(src, "folder", store))
    before = _counts(store)
    real_before = sum(n for (_, label), n in before.items() if label == 0)
    assert real_before == 6
    new = tmp_path / "newimgs" / "unknown"
    new.mkdir(parents=True)
    for i in range(3):
        (new / f"again{i}.jpg").write_bytes((src / "real" / f"{i}.jpg").read_bytes())
    (new / "fresh.jpg").write_bytes(jpeg((1, 2, 3)))
    out = _cli("ingest", str(tmp_path / "newimgs"), "--format", "folder", "--store", str(store.root))
    assert "3 images came labelled generated (unknown), but the store holds them as real and keeps that " \
           "label: training data is unchanged" in out
    after = _counts(store)
    assert sum(n for (_, label), n in after.items() if label == 0) == real_before  # 199 stays 199
    assert sum(after.values()) == sum(before.values()) + 1  # only fresh.jpg was added
    conflicts = catalog.query(Store(store.root), "SELECT * FROM conflicts").to_pylist()
    assert len(conflicts) == 3
    assert {(c["label"], c["stored_label"], c["claimed_label"], c["claimed_generator"], c["status"])
            for c in conflicts} == {(0, 0, 1, "unknown", "open")}
    listed = _cli("conflicts", "list", "--store", str(store.root))
    assert "open" in listed and "unknown" in listed
    # status agrees with the view
    st = status(StatusConfig(Store(store.root)))
    assert st.samples == sum(after.values())

    # a decision, then its undo: the label moves, then comes back
    sample = conflicts[0]["sample_id"]
    out = _cli("conflicts", "resolve", sample[:10], "--label", "generated", "--store", str(store.root))
    assert "is now generated (unknown) (was real (real))" in out and "--undo" in out
    moved = _counts(store)
    assert sum(n for (_, label), n in moved.items() if label == 0) == real_before - 1
    assert catalog.query(Store(store.root), "SELECT label, generator FROM samples WHERE sample_id = ?",
                         [sample]).to_pylist() == [{"label": 1, "generator": "unknown"}]
    out = _cli("conflicts", "resolve", sample[:10], "--label", "none", "--store", str(store.root))
    assert "left out of training" in out
    assert sum(_counts(store).values()) == sum(after.values()) - 1
    _cli("conflicts", "resolve", sample[:10], "--undo", "--store", str(store.root))
    assert catalog.query(Store(store.root), "SELECT label FROM samples WHERE sample_id = ?", [sample]
                         ).column(0).to_pylist() == [1]  # back to the relabel
    _cli("conflicts", "resolve", sample[:10], "--undo", "--store", str(store.root))
    assert _counts(store) == after  # as ingested
    refused = runner.invoke(app, ["conflicts", "resolve", sample[:10], "--undo", "--store", str(store.root)])
    assert refused.exit_code == 2 and "no decision to undo" in refused.output


def test_unlabelled_folder_of_any_layout_is_never_trained_and_never_conflicts(tmp_path: Path) -> None:
    src = _labelled_folder(tmp_path / "imgs")
    store = Store(tmp_path / "store")
    ingest(IngestConfig(src, "folder", store))
    plain = tmp_path / "plain" / "a" / "b"
    plain.mkdir(parents=True)
    (plain / "x.jpg").write_bytes((src / "real" / "0.jpg").read_bytes())  # stored as real: a duplicate
    (plain.parent / "y.jpg").write_bytes(jpeg((7, 7, 7)))
    (plain.parent / "y.txt").write_text("a caption")
    out = _cli("ingest", str(tmp_path / "plain"), "--format", "folder", "--unlabelled", "--store", str(store.root))
    assert "ingested 1 new samples" in out and "1 of them unlabelled" in out and "came labelled" not in out
    rows = catalog.query(Store(store.root), "SELECT label, generator, split, text FROM samples WHERE split = "
                         "'unlabelled'").to_pylist()
    assert rows == [{"label": None, "generator": None, "split": "unlabelled", "text": "a caption"}]
    assert not catalog.query(Store(store.root), "SELECT * FROM conflicts").num_rows
    # the same bytes later brought with a label: a labelled sample, its unlabelled row hidden
    later = tmp_path / "later" / "midjourney"
    later.mkdir(parents=True)
    (later / "y.jpg").write_bytes((plain.parent / "y.jpg").read_bytes())
    result = ingest(IngestConfig(tmp_path / "later", "folder", Store(store.root)))
    assert result.labelled_unlabelled == 1 and result.label_conflicts == 0
    rows = catalog.query(Store(store.root), "SELECT label, generator, split FROM samples WHERE sample_id IN "
                         "(SELECT sample_id FROM samples_all WHERE split = 'unlabelled')").to_pylist()
    assert len(rows) == 1 and rows[0]["label"] == 1 and rows[0]["generator"] == "midjourney"
    assert status(StatusConfig(Store(store.root))).samples == 11
    (plain / "z.jpg").write_bytes(jpeg((3, 5, 7)))  # no caption: no line about training (never trained on)
    out = _cli("ingest", str(tmp_path / "plain"), "--format", "folder", "--unlabelled", "--store", str(store.root))
    assert "ingested 1 new samples" in out and "no caption" not in out, out


def test_within_one_source_the_first_copy_wins_and_the_other_is_a_claim(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _labelled_folder(root, 2, 1)
    (root / "sdxl" / "copy.jpg").write_bytes((root / "real" / "1.jpg").read_bytes())
    store = Store(tmp_path / "store")
    result = ingest(IngestConfig(root, "folder", store))
    assert result.label_conflicts == 1 and result.added == 3
    assert "the first copy read was kept with its own label" in result.conflict_sentences[0]
    (row,) = catalog.query(store, "SELECT * FROM conflicts").to_pylist()
    assert (row["label"], row["claimed_label"], row["status"]) == (0, 1, "open")
