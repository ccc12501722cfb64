"""training.prepare (issue 30): generated archives of the real shapes -> the configs' layout, with
the real counts, missing and unreadable files reported and left out, and resumable extraction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests._fixtures_prepare import make_archives
from training import prepare
from training.data import load_karpathy, load_tsv, resolve_webdataset, spec_missing_files


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_archives(tmp_path_factory.mktemp("archives"))


def test_coco_from_karpathy_zip_and_image_zip(archives: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "data" / "coco"
    argv = [
        "coco",
        "--karpathy",
        str(archives["karpathy"]),
        "--images",
        str(archives["coco"]),
        "--out",
        str(out),
    ]
    assert prepare.main(argv) == 1  # something was left out
    report = json.loads((out / "prepared.json").read_text())
    assert report["json_images"] == 40 and report["images"] == 38
    assert report["missing"] == 1 and report["missing_examples"] == ["train2014/img0003.jpg"]
    assert report["unreadable"] == 1 and report["unreadable_examples"] == ["train2014/img0005.jpg"]
    assert report["captions"] == 38 * 5 and sum(report["splits"].values()) == 38
    assert any("123,287" in w for w in report["warnings"])  # not Karpathy's full count
    assert len(report["inputs"]["train2014.zip"]) == 64
    # the written json names only images that are there: the loaders read it as is
    corpus = load_karpathy(out / "dataset_coco.json", out, "train")
    assert len(corpus.images) == 24 - 2 and all(p.is_file() for p in corpus.images)
    assert len(load_karpathy(out / "dataset_coco.json", out, "test").images) == 10
    # a second run resumes: nothing extracted again, same counts, no checksum warning
    assert prepare.main(argv) == 1
    again = json.loads((out / "prepared.json").read_text())
    assert again["extracted"] == {"train2014.zip": 0} and again["images"] == 38
    assert not any("sha256" in w for w in again["warnings"])


def test_flickr30k_from_a_tar_gz(archives: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "flickr30k"
    argv = ["flickr30k", "--karpathy", str(archives["karpathy"]), "--images", str(archives["flickr"])]
    assert prepare.main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "prepared.json").read_text())
    assert report["images"] == 40 and report["missing"] == report["unreadable"] == 0
    corpus = load_karpathy(out / "dataset_flickr30k.json", out / "flickr30k-images", "test")
    assert len(corpus.images) == 10 and len(corpus.captions) == 50


def test_cc3m_counts_the_real_samples_and_skips_a_damaged_shard(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "cc3m"
    assert prepare.main(["cc3m", "--shards", str(archives["shards"]), "--out", str(out), "--pairs"]) == 1
    report = json.loads((out / "prepared.json").read_text())
    assert report["shards"] == 3 and report["readable_shards"] == 2 and report["unreadable"] == 1
    assert report["unreadable_examples"][0].startswith("00002.tar")
    spec = resolve_webdataset({"format": "webdataset", "index": str(out / "shards.json")})
    assert spec["num_samples"] == 6 + 7 == report["images"]
    assert [Path(s).name for s in spec["shards"]] == ["00000.tar", "00001.tar"]
    assert spec_missing_files({"format": "webdataset", "index": str(out / "shards.json")}) == []
    assert len((out / "captions.txt").read_text().splitlines()) == 13
    pairs = load_tsv(out / "cc3m_local.tsv")  # the paired stage-1 data (TinyBERT baseline)
    assert len(pairs.images) == 13 and all(p.is_file() for p in pairs.images)
    # captions from CC3M's tsv instead of the shards
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_text("a dog on a beach\thttp://x/1.jpg\nred car\thttp://x/2.jpg\n")
    assert (
        prepare.main(["cc3m", "--shards", str(archives["shards"]), "--out", str(out), "--tsv", str(tsv)]) == 1
    )
    assert (out / "captions.txt").read_text().splitlines() == ["a dog on a beach", "red car"]


def test_unusable_inputs_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert prepare.main(["cc3m", "--shards", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no webdataset shards" in capsys.readouterr().err
    bad = tmp_path / "caption_datasets.zip"
    import zipfile

    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("readme.txt", "x")
    assert (
        prepare.main(["coco", "--karpathy", str(bad), "--images", str(bad), "--out", str(tmp_path / "c")])
        == 2
    )
    assert "has no dataset_coco.json" in capsys.readouterr().err
