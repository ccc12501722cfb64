"""The corpus-embedding job end to end on generated data: Karpathy json (with unreadable and
missing images), a folder and webdataset tars (with a truncated, an empty and a non-tar shard, a
non-UTF-8 caption, a sample without an image), a training checkpoint as the model; streamed
embedding files, index shards built from them, per-shard resumption, and one-line argument
errors."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._fixtures_training import jpeg_bytes, make_karpathy, require_engine, write_shard

leanclip = require_engine()

from leanclip.shards import ShardedIndex  # noqa: E402
from training import embed  # noqa: E402
from training.data import image_to_tensor, load_image, load_karpathy, prepare_pixels  # noqa: E402
from training.models import build_teacher, save_checkpoint, tokenize  # noqa: E402
from training.train_utils import seed_everything  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("embed")
    json_path, image_root = make_karpathy(root, n_train=4, n_val=2, n_test=10, broken=0)
    (image_root / "train2014" / "img0007.jpg").write_bytes(b"broken test image")
    (image_root / "train2014" / "img0009.jpg").unlink()  # listed in the json, missing on disk
    seed_everything(0)
    save_checkpoint(root / "model.pt", build_teacher(pretrained=None, tiny=True), {"stage": 2})
    return {"root": root, "json": json_path, "images": image_root, "model": root / "model.pt"}


def _argv(setup: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--model", str(setup["model"]), "--out", str(out), "--device", "cpu", *extra]


def test_karpathy_split_streamed_indexed_and_resumed(setup: dict[str, Path]) -> None:
    out = setup["root"] / "emb_coco"
    source = ["--karpathy", str(setup["json"]), "--image-root", str(setup["images"]), "--split", "test"]
    args = _argv(setup, out, *source, "--shard-size", "4", "--batch-size", "3", "--index", "exact")
    assert embed.main(args) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.npy", "00001.npy", "00002.npy"]
    corpus = load_karpathy(setup["json"], setup["images"], "test", check_images=False)
    emb = np.concatenate([np.load(out / "images" / f"{s:05d}.npy") for s in range(3)])
    metas = [np.load(out / "shards" / f"{s:05d}.npz") for s in range(3)]
    valid = np.concatenate([m["valid"] for m in metas])
    bad = [i for i, p in enumerate(corpus.images) if p.name in ("img0007.jpg", "img0009.jpg")]
    assert len(bad) == 2 and valid.sum() == 8 and not valid[bad].any() and not emb[bad].any()
    # the same embeddings as the model gives directly
    from training.models import load_model

    model = load_model(setup["model"])
    good = [i for i in range(len(corpus)) if valid[i]]
    with torch.no_grad():
        direct = model.encode_image(
            prepare_pixels(
                model,
                torch.stack([image_to_tensor(load_image(corpus.images[i]), model.image_size) for i in good]),
            )
        )
        direct_txt = model.encode_text(tokenize(corpus.captions))
    np.testing.assert_allclose(emb[good], torch.nn.functional.normalize(direct, dim=-1).numpy(), atol=1e-5)
    texts = np.concatenate([np.load(out / "texts" / f"{s:05d}.npy") for s in range(3)])
    np.testing.assert_allclose(texts, torch.nn.functional.normalize(direct_txt, dim=-1).numpy(), atol=1e-5)
    # captions of unreadable or missing images are kept in the files, marked, and still indexed
    caption_valid = np.concatenate([m["caption_valid"] for m in metas])
    caption_of = np.asarray([i for i in range(len(corpus)) for _ in corpus.image_captions[i]])
    assert np.array_equal(caption_valid, valid[caption_of])
    # the index shards: every readable image under its row number, searched as one
    index = ShardedIndex.load(out / "images.index", mmap=True)
    assert len(index) == 8 and all(g in index for g in good) and not any(b in index for b in bad)
    keys, _ = index.search(emb[good[3]], k=1)
    assert int(keys[0]) == good[3]
    text_index = ShardedIndex.load(out / "texts.index")
    assert int(caption_valid.sum()) < len(corpus.captions) == len(text_index)
    orphan = int(np.flatnonzero(~caption_valid)[0])
    keys, _ = text_index.search(texts[orphan], k=1)
    assert int(keys[0]) == orphan
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"] == {"rows": 10, "valid": 8}
    assert sorted(p.split(": ")[0] for p in manifest["problems"]) == sorted(
        str(corpus.images[i].relative_to(setup["images"])) for i in bad
    )
    assert [s["row"] for s in manifest["shards"]] == [0, 4, 8]
    # resumable per shard: a lost shard is encoded again, the others are kept
    (out / "shards" / "00001.npz").unlink()
    before = (out / "images" / "00000.npy").stat().st_mtime_ns
    summary = embed.run(embed.parser().parse_args(args))
    assert summary["encoded"] == 1 and summary["reused"] == 2
    assert (out / "images" / "00000.npy").stat().st_mtime_ns == before
    assert np.array_equal(np.load(out / "images" / "00001.npy"), emb[4:8])


def _bad_tars(folder: Path) -> None:
    folder.mkdir()
    write_shard(folder / "000.tar", [(f"k{i}", jpeg_bytes(i), f"caption {i}") for i in range(3)])
    write_shard(folder / "001.tar", [("k3", b"broken", "caption 3"), ("k4", jpeg_bytes(4), "")])
    with tarfile.open(folder / "002.tar", "w") as tar:  # a caption in Latin-1, a sample without image
        import io

        for name, payload in (
            ("k5.jpg", jpeg_bytes(5)),
            ("k5.txt", "caf\xe9 au lait".encode("latin-1")),
            ("k6.txt", b"no image"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    write_shard(folder / "003.tar", [(f"t{i}", jpeg_bytes(i), f"kept {i}") for i in range(4)])
    whole = (folder / "003.tar").read_bytes()
    (folder / "003.tar").write_bytes(
        whole[: 3 * 2560 + 700]
    )  # cut inside the 4th image (2560 bytes a sample)
    (folder / "004.tar").write_bytes(b"")  # empty
    (folder / "005.tar").write_bytes(b"this is not a tar file at all" * 40)  # not a tar


def test_webdataset_bad_inputs_are_recorded_skipped_and_reported(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    tars = setup["root"] / "tars"
    _bad_tars(tars)
    out = setup["root"] / "emb_wds"
    argv = _argv(
        setup,
        out,
        "--shards",
        str(tars / "{000..005}.tar"),
        "--batch-size",
        "2",
        "--index",
        "ivf",
        "--nlist",
        "2",
    )
    assert embed.main(argv) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    manifest = json.loads((out / "manifest.json").read_text())
    problems = "\n".join(manifest["problems"])
    assert summary["problems"] == len(manifest["problems"]) == 6, problems
    assert (
        "k3: unreadable image" in problems
        and "k6: unreadable image" in problems
        and "no image in the sample" in problems
    )
    assert "002.tar:k5: caption skipped, not UTF-8" in problems
    assert "003.tar: damaged shard, 3 samples before the damage kept" in problems
    assert "004.tar: damaged shard, 0 samples" in problems and "005.tar: damaged shard, 0 samples" in problems
    assert "6 inputs skipped" in captured.err
    rows = [s["images"] for s in manifest["shards"]]
    assert rows == [3, 2, 2, 3, 0, 0]  # the truncated tar: the samples before the damage
    names = np.load(out / "shards" / "00002.npz")["names"].tolist()
    assert names == ["k5", "k6"]
    assert manifest["images"]["valid"] == manifest["images"]["rows"] - 2
    assert manifest["texts"]["rows"] == 3 + 1 + 1 + 3  # k4's caption is empty, k5's not UTF-8
    assert (
        manifest["texts"]["with_valid_image"] == manifest["texts"]["rows"] - 2
    )  # k3's and k6's images are not there
    index = ShardedIndex.load(out / "images.index", mmap=True)
    assert len(index) == manifest["images"]["valid"] and 3 not in index
    index.nprobe = 2
    emb = np.load(out / "images" / "00000.npy")
    assert index.search(emb[1], 1)[0].tolist() == [1]


def test_folder_source(setup: dict[str, Path]) -> None:
    out = setup["root"] / "emb_folder"
    assert embed.main(_argv(setup, out, "--folder", str(setup["images"]), "--shard-size", "7")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"] == {"rows": 15, "valid": 14} and manifest["texts"]["rows"] == 0
    assert [s["images"] for s in manifest["shards"]] == [7, 7, 1] and not (out / "images.index").exists()
    # images decoded on several threads or on one: the same rows, problems and order
    for threads in ("1", "3"):
        again = setup["root"] / f"emb_folder_{threads}"
        argv = _argv(
            setup, again, "--folder", str(setup["images"]), "--shard-size", "7", "--decode-threads", threads
        )
        assert embed.main(argv) == 0
        assert json.loads((again / "manifest.json").read_text())["problems"] == manifest["problems"]
        for s in range(3):
            np.testing.assert_array_equal(
                np.load(again / "images" / f"{s:05d}.npy"), np.load(out / "images" / f"{s:05d}.npy")
            )


def test_folder_names_keep_list_images_order(tmp_path: Path) -> None:
    """The folder source keeps names, not Paths, in ``list_images``' order (part by part: "a/"
    before "a-b/" although "-" sorts before "/")."""
    from training.data import list_images

    for name in ["a/y.jpg", "a-b/x.JPG", "a.jpg", "a/b/z.png", "ab.jpg", "a/notes.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    want = [str(p.relative_to(tmp_path)) for p in list_images(tmp_path)]
    assert embed.image_names(tmp_path) == want and "a/notes.txt" not in want
    assert want.index("a/y.jpg") < want.index("a-b/x.JPG")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--folder", "{images}", "--shard-size", "0"], "--shard-size and --batch-size must be >= 1"),
        (["--karpathy", "{json}"], "--karpathy needs --image-root"),
        (["--folder", "{images}", "--decode-threads", "-1"], "--decode-threads must be >= 0"),
        (["--shards", "{root}/none-{{0..1}}.tar"], "webdataset shard not found"),
        (["--folder", "{root}/no-such-folder"], "image folder not found"),
    ],
)
def test_argument_errors_are_one_line(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    extra = [e.format(images=setup["images"], json=setup["json"], root=setup["root"]) for e in extra]
    assert embed.main(_argv(setup, setup["root"] / "emb_err", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    argv = [
        "--model",
        str(setup["root"] / "nope.pt"),
        "--folder",
        str(setup["images"]),
        "--out",
        str(setup["root"] / "x"),
    ]
    assert embed.main(argv) == 2
    assert "neither a bundle directory nor a checkpoint" in capsys.readouterr().err
