"""``modret index build / info / verify`` through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli.index import index_app
from tests.factories import face, make_child_run, make_run
from tests.folders import write_shirts
from tests.milvus_server import MilvusServer, drop_collections

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-task run (the messages below count 2 tasks); overrides the session-wide ``run_dir``."""
    return make_run(tmp_path_factory.mktemp("run"), task_names=["Smiling", "Eyeglasses"])


@pytest.mark.parametrize(("kind", "store_images"), [("flat", True), ("hnsw", False)])
def test_build_info_verify(run_dir: Path, tmp_path: Path, kind: str, store_images: bool) -> None:
    out = tmp_path / "index"
    args = [
        "build",
        "--run",
        str(run_dir),
        "--dataset",
        "synthfaces",
        "--num-images",
        "20",
        "--out",
        str(out),
    ]
    if not store_images:
        args.append("--no-store-images")
    result = runner.invoke(index_app, [*args, "--kind", kind, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "20 images (0 duplicates, 0 unreadable) × 2 tasks" in result.output

    result = runner.invoke(index_app, ["info", str(out)])
    assert result.exit_code == 0, result.output
    assert "task Smiling" in result.output and "20 vectors" in result.output and kind in result.output

    result = runner.invoke(index_app, ["verify", str(out), "--run", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "model hash matches the run" in result.output and "20 ids in each of 2 tasks" in result.output
    assert f"{20 if store_images else 0} blobs present" in result.output

    index_file = next((out / "store").glob("gen-*/task-000.faiss"))
    index_file.write_bytes(index_file.read_bytes()[:-4])
    result = runner.invoke(index_app, ["verify", str(out)])
    assert result.exit_code == 1
    assert "no servable generation" in result.output and "truncated" in result.output


def test_usage_errors(run_dir: Path, tmp_path: Path) -> None:
    # Exit 2: the command could not do what was asked (service.cli.common's convention).
    result = runner.invoke(index_app, ["build", "--run", str(run_dir), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "exactly one of --images DIR or --dataset NAME" in result.output
    result = runner.invoke(index_app, ["info", str(tmp_path / "missing")])
    # rich wraps the message at the console width, so where the break falls depends on the path's length
    assert result.exit_code == 2 and "holds no gallery" in " ".join(result.output.split())
    result = runner.invoke(index_app, ["verify", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in " ".join(result.output.split())


def test_build_from_a_labelled_folder(run_dir: Path, tmp_path: Path) -> None:
    write_shirts(tmp_path / "shirts", count=6)
    out = tmp_path / "index"
    build = ["build", "--run", str(run_dir), "--images", str(tmp_path / "shirts"), "--device", "cpu"]
    result = runner.invoke(index_app, [*build, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "labels for 6 of 6 images from" in " ".join(result.output.split())
    (tmp_path / "bad.csv").write_text("filename,colour\nshirt-001.jpg,red,extra\n")
    result = runner.invoke(
        index_app, [*build, "--out", str(tmp_path / "x"), "--labels", str(tmp_path / "bad.csv")]
    )
    assert result.exit_code == 2 and "bad.csv:2: expected 2 fields, found 3" in " ".join(
        result.output.split()
    )
    result = runner.invoke(
        index_app,
        [
            "build",
            "--run",
            str(run_dir),
            "--dataset",
            "synthfaces",
            "--out",
            str(tmp_path / "y"),
            "--labels",
            "x.csv",
        ],
    )
    assert result.exit_code == 2 and "--labels goes with --images" in " ".join(result.output.split())


def test_add_task_and_remove_task(run_dir: Path, tmp_path: Path) -> None:
    child = make_child_run(run_dir, tmp_path / "child", "Bald")
    folder = tmp_path / "faces"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.png").write_bytes(face(i)[0])
    out = tmp_path / "index"
    built = runner.invoke(
        index_app,
        ["build", "--run", str(run_dir), "--images", str(folder), "--out", str(out), "--no-store-images"],
    )
    assert built.exit_code == 0, built.output
    add = ["add-task", "--run", str(child), "--index", str(out), "--task", "bald", "--device", "cpu"]

    result = runner.invoke(index_app, add)  # the images were not kept: it says so, and what to pass
    assert result.exit_code == 2
    assert "6 of 6 gallery images were not stored" in result.output and "--images DIR" in result.output

    result = runner.invoke(index_app, [*add, "--images", str(folder)])
    assert result.exit_code == 0, result.output
    assert (
        "Bald: 6 images embedded and indexed" in result.output
        and "Smiling, Eyeglasses, Bald" in result.output
    )
    assert "POST /admin/reload" in result.output

    result = runner.invoke(index_app, ["verify", str(out), "--run", str(child)])
    assert result.exit_code == 0, result.output
    assert "the run embeds Smiling, Eyeglasses, Bald as indexed" in result.output
    result = runner.invoke(index_app, ["verify", str(out), "--run", str(run_dir)])  # the parent: one missing
    assert result.exit_code == 0 and "Smiling, Eyeglasses as indexed" in result.output

    result = runner.invoke(index_app, [*add, "--images", str(folder)])
    assert result.exit_code == 2 and "already indexes Bald" in result.output

    result = runner.invoke(index_app, ["remove-task", "--index", str(out), "--task", "Eyeglasses"])
    assert result.exit_code == 0, result.output
    assert "tasks now Smiling, Bald" in result.output
    result = runner.invoke(index_app, ["info", str(out)])
    assert "task Bald" in result.output and "task Eyeglasses" not in result.output
    result = runner.invoke(index_app, ["remove-task", "--index", str(out), "--task", "Eyeglasses"])
    assert result.exit_code == 2 and "has no index for Eyeglasses" in result.output
    result = runner.invoke(index_app, ["remove-task", "--index", str(tmp_path / "nowhere"), "--task", "Bald"])
    assert result.exit_code == 2 and "holds no gallery" in result.output


@pytest.mark.cluster
def test_build_into_a_milvus_server(run_dir: Path, tmp_path: Path, milvus_server: MilvusServer) -> None:
    """``--backend milvus --milvus-uri``: the vectors go to the server under a prefix of the build's own
    (recorded in gallery.json with the uri), nothing Milvus-like stays in the directory but generations;
    info and verify read it back from the server."""
    built = []
    for name in ("a", "b"):
        out = tmp_path / name
        args = ["build", "--run", str(run_dir), "--dataset", "synthfaces", "--num-images", "6", "--out"]
        args += [str(out), "--device", "cpu", "--backend", "milvus", "--milvus-uri", milvus_server.uri]
        result = runner.invoke(index_app, args)
        assert result.exit_code == 0, result.output
        built.append(json.loads((out / "gallery.json").read_text())["store_options"])
        assert not list(out.rglob("*.db"))
    assert all(options["uri"] == milvus_server.uri for options in built)
    prefixes = [options["collection_prefix"] for options in built]
    assert prefixes[0] != prefixes[1] and all(p.startswith("modret_") for p in prefixes)
    client = milvus_server.client()
    try:
        names = set(client.list_collections())
    finally:
        client.close()
    assert {f"{prefixes[0]}_000_Smiling", f"{prefixes[1]}_001_Eyeglasses"} <= names
    result = runner.invoke(index_app, ["verify", str(tmp_path / "a"), "--run", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "6 ids in each of 2 tasks" in result.output
    for prefix in prefixes:
        drop_collections(milvus_server, prefix)


def test_milvus_options_need_the_milvus_backend(run_dir: Path, tmp_path: Path) -> None:
    args = ["build", "--run", str(run_dir), "--dataset", "synthfaces", "--num-images", "2"]
    result = runner.invoke(index_app, [*args, "--out", str(tmp_path / "x"), "--milvus-uri", "http://h:19530"])
    assert result.exit_code == 2 and "go with --backend milvus" in result.output
