"""Multi-process training on CPU with gloo: W processes equal one process at the same global
batch, ranks agree on every step's shape when images are unreadable, corpus encoding and
hard-negative mining sharded across ranks equal one process exactly, and a killed 2-process run
resumes to the weights of an uninterrupted one. Tiny random models, a few steps each; the ranks
of one world run all their tasks in one launch to keep process start-ups few."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests._fixtures_training import (
    encode_and_mine,
    launch_world,
    make_karpathy,
    require_engine,
    tiny_stage1_config,
    tiny_stage2_config,
)

require_engine()

from training import stage1, stage2  # noqa: E402
from training.data import epoch_pairs, epoch_permutation, load_karpathy  # noqa: E402
from training.distributed import BatchLayout, DistInfo, gather_rows, shard_for_rank  # noqa: E402
from training.models import build_teacher, save_checkpoint  # noqa: E402
from training.train_utils import seed_everything  # noqa: E402

# W processes against one process after a few AdamW steps: the same examples and the same
# contrastive batches, only float summation order differs. Losses and gradient norms (which
# would show a gradient-scale error that AdamW's normalised steps hide) to 1e-4 relative;
# weights to 1e-4 absolute, a tenth of one step's learning rate (1e-3). Attention key biases are
# left out of the weight check: their true gradient is exactly zero (softmax is shift
# invariant), so AdamW turns rounding noise into steps of up to the learning rate.
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4
BROKEN = 10  # unreadable images 0..9 of 24 in the "broken" dataset


# ------------------------------------------------------------------------------ unit level


def test_batch_layout_splits_the_global_batch() -> None:
    layout = BatchLayout(84, 8)  # the paper's stage-1 batch on 8 GPUs: 11 or 10 per rank
    assert layout.sizes == [11, 11, 11, 11, 10, 10, 10, 10] and sum(layout.sizes) == 84
    assert [layout.share(r).start for r in range(8)] == [0, 11, 22, 33, 44, 54, 64, 74]
    assert layout.grad_accum == 1 and BatchLayout(96, 2, max_rank_batch=16).grad_accum == 3
    assert BatchLayout(96, 1, max_rank_batch=48).describe() == {
        "global_batch": 96,
        "world_size": 1,
        "rank_batch": 96,
        "grad_accum": 2,
        "micro_global_batch": 48,
    }
    # every position of every step belongs to exactly one rank, in global-batch order
    rows = np.sort(np.concatenate([layout.rows(r, 2, 5) for r in range(8)]))
    assert np.array_equal(rows, np.arange(2 * 84, 5 * 84))
    with pytest.raises(ValueError, match="smaller than the 8 processes"):
        BatchLayout(4, 8)


def test_shards_are_batch_aligned_and_regather_in_order() -> None:
    info = [DistInfo(r, 3, 0, torch.device("cpu")) for r in range(3)]
    shares = [shard_for_rank(23, i, align=4) for i in info]
    assert [(s.start, s.stop) for s in shares] == [(0, 8), (8, 16), (16, 23)]
    assert all(s.start % 4 == 0 for s in shares)
    single = DistInfo(0, 1, 0, torch.device("cpu"))
    assert np.array_equal(gather_rows(np.arange(5), 5, single), np.arange(5))
    assert [shard_for_rank(10, DistInfo(r, 4, 0, torch.device("cpu"))) for r in range(4)] == [
        slice(0, 3),
        slice(3, 6),
        slice(6, 9),
        slice(9, 10),
    ]


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("dist")
    clean = make_karpathy(root / "clean", n_train=24, n_val=8, n_test=2)
    broken = make_karpathy(root / "broken", n_train=24, n_val=2, n_test=2, broken=BROKEN)
    seed_everything(0)
    teacher = build_teacher(pretrained=None, tiny=True)  # T' stand-in for KD and HN
    save_checkpoint(root / "teacher.pt", teacher, {"stage": 2})
    return {"root": root, "clean": clean, "broken": broken, "teacher": str(root / "teacher.pt")}


def stage1_config(data: dict[str, Any], run: str, **train: Any) -> dict[str, Any]:
    root = data["root"]
    config = tiny_stage1_config(
        root, *data["clean"], **{"epochs": 1, "max_steps": 4, "batch_size": 8, "checkpoint_every": 0, **train}
    )
    config["run_dir"] = str(root / run)
    return config


def stage2_config(data: dict[str, Any], run: str, **train: Any) -> dict[str, Any]:
    model = {"kind": "student", "image_backbone": "vit_small_patch16_224", "text_layers": 2}
    return tiny_stage2_config(data["root"], *data["clean"], run, model, data["teacher"], epochs=1, **train)


def broken_stage1_config(data: dict[str, Any], run: str) -> dict[str, Any]:
    config = tiny_stage1_config(
        data["root"], *data["broken"], epochs=1, batch_size=4, modalities=["image"], checkpoint_every=0
    )
    config["run_dir"] = str(data["root"] / run)
    return config


def broken_stage2_config(data: dict[str, Any], run: str) -> dict[str, Any]:
    return tiny_stage2_config(
        data["root"],
        *data["broken"],
        run,
        {"kind": "teacher"},
        None,
        phases=["image"],
        kd=False,
        hn=False,
        epochs=1,
        batch_size=4,
        max_steps=10,
    )


def embed_argv(data: dict[str, Any], out: Path) -> list[str]:
    json_path, image_root = data["broken"]
    return [
        "--model",
        data["teacher"],
        "--karpathy",
        str(json_path),
        "--image-root",
        str(image_root),
        "--split",
        "train",
        "--out",
        str(out),
        "--shard-size",
        "5",
        "--batch-size",
        "4",
        "--index",
        "exact",
        "--device",
        "cpu",
    ]


def encode_task(data: dict[str, Any]) -> dict[str, Any]:
    json_path, image_root = data["broken"]
    return {
        "kind": "encode_and_mine",
        "name": "encode",
        "json": str(json_path),
        "root": str(image_root),
        "batch_size": 4,
    }


@pytest.fixture(scope="module")
def world2(data: dict[str, Any]) -> Path:
    out = data["root"] / "world2"
    launch_world(
        2,
        [
            {"kind": "stage1", "name": "stage1", "config": stage1_config(data, "s1_w2")},
            {
                "kind": "stage1",
                "name": "stage1_image",
                "config": stage1_config(data, "s1i_w2", modalities=["image"]),
            },
            {"kind": "stage2", "name": "stage2", "config": stage2_config(data, "s2_w2")},
            {"kind": "stage1", "name": "broken1", "config": broken_stage1_config(data, "b1_w2")},
            {"kind": "stage2", "name": "broken2", "config": broken_stage2_config(data, "b2_w2")},
            {"kind": "embed", "name": "embed", "argv": embed_argv(data, data["root"] / "emb_w2")},
            encode_task(data),
        ],
        out,
    )
    return out


@pytest.fixture(scope="module")
def world4(data: dict[str, Any]) -> Path:
    out = data["root"] / "world4"
    launch_world(
        4,
        [
            {"kind": "stage1", "name": "stage1", "config": stage1_config(data, "s1_w4")},
            {"kind": "stage2", "name": "stage2", "config": stage2_config(data, "s2_w4")},
            encode_task(data),
        ],
        out,
    )
    return out


@pytest.fixture(scope="module")
def single(data: dict[str, Any]) -> dict[str, Any]:
    """The one-process references, run here with one thread as the ranks are."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: dict[str, Any] = {}
        for name, cls, config in (
            ("stage1", stage1.Stage1Trainer, stage1_config(data, "s1_w1")),
            ("stage1_image", stage1.Stage1Trainer, stage1_config(data, "s1i_w1", modalities=["image"])),
            ("stage2", stage2.Stage2Trainer, stage2_config(data, "s2_w1")),
            ("broken1", stage1.Stage1Trainer, broken_stage1_config(data, "b1_w1")),
        ):
            trainer = cls(config)
            result = trainer.run()
            model = trainer.student if cls is stage1.Stage1Trainer else trainer.model
            out[name] = {
                "history": result if cls is stage1.Stage1Trainer else result.history,
                "state_dict": copy.deepcopy(model.state_dict()),
            }
        out["encode"] = encode_and_mine(encode_task(data), DistInfo(0, 1, 0, torch.device("cpu")))
        from training import embed

        embed.main(embed_argv(data, data["root"] / "emb_w1"))
        return out
    finally:
        torch.set_num_threads(threads)


def _load(world: Path, name: str) -> dict[str, Any]:
    return torch.load(world / f"{name}.pt", weights_only=False)


def _same_training(got: dict[str, Any], expected: dict[str, Any], keys: tuple[str, ...]) -> None:
    assert len(got["history"]) == len(expected["history"]) > 0
    for g, e in zip(got["history"], expected["history"]):
        assert g["batch"] == e["batch"]
        for key in keys + ("grad_norm",):
            assert g[key] == pytest.approx(e[key], rel=LOSS_RTOL, abs=1e-6), key
    for name, tensor in expected["state_dict"].items():
        diff = (got["state_dict"][name].float() - tensor.float()).abs()
        if name.endswith(("in_proj_bias", "qkv.bias")):  # [q | k | v]: drop the key bias
            third = tensor.shape[0] // 3
            diff = torch.cat([diff[:third], diff[2 * third :]])
        assert float(diff.max()) <= WEIGHT_ATOL, (name, float(diff.max()))


# ------------------------------------------------------------------------------ equivalence


@pytest.mark.parametrize("world", ["world2", "world4"])
def test_stage1_w_processes_equal_one_process(
    world: str, single: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    """Both towers trained, per-tower DDP: also the step-2 failure of wrapping the whole student
    (its logit scale never gets a gradient in stage 1) stays fixed."""
    out = request.getfixturevalue(world)
    _same_training(_load(out, "stage1"), single["stage1"], ("loss", "image", "text"))


def test_stage1_image_only_under_ddp(world2: Path, single: dict[str, Any]) -> None:
    """Table 2's stage 1 (image tower only): the text tower is neither wrapped nor changed."""
    got = _load(world2, "stage1_image")
    _same_training(got, single["stage1_image"], ("loss", "image"))
    assert "text" not in got["history"][0]


@pytest.mark.parametrize("world", ["world2", "world4"])
def test_stage2_w_processes_equal_one_process(
    world: str, single: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    out = request.getfixturevalue(world)
    _same_training(
        _load(out, "stage2"), single["stage2"], ("t2v", "v2t", "kd_kl", "kd_contrastive", "hn", "loss")
    )


# ------------------------------------------------------------------------------ rank agreement


def _readable_per_rank(positions_to_images: np.ndarray, layout: BatchLayout, steps: int) -> list[list[int]]:
    return [
        [
            int((positions_to_images[layout.rows(r, s, s + 1) % len(positions_to_images)] >= BROKEN).sum())
            for r in range(layout.world_size)
        ]
        for s in range(steps)
    ]


def test_unreadable_images_keep_ranks_in_step_stage1(
    data: dict[str, Any], world2: Path, single: dict[str, Any]
) -> None:
    """Ranks lose different numbers of images: they exchange sizes and gather padded tensors
    (the old code all_gathered mismatched shapes); a step where one rank has none left is
    skipped by both ranks together (the old code's `continue` left the other rank waiting)."""
    corpus = load_karpathy(*data["broken"], "train")
    order = epoch_permutation(len(corpus), 0, 1, 0)
    per_step = _readable_per_rank(order, BatchLayout(4, 2), len(corpus) // 4)
    skipped = [s for s, sizes in enumerate(per_step) if min(sizes) == 0]
    uneven = [s for s, sizes in enumerate(per_step) if min(sizes) > 0 and len(set(sizes)) > 1]
    assert skipped and uneven, per_step  # the data exercises both cases
    got = _load(world2, "broken1")
    assert [h["step"] for h in got["history"]] == [s for s in range(len(per_step)) if s not in skipped]
    assert [h["batch"] for h in got["history"]] == [sum(per_step[h["step"]]) for h in got["history"]]
    assert got["skipped_images"] == 4 * len(per_step) - sum(map(sum, per_step))
    # up to the first skipped step, two processes train exactly as one
    expected = single["broken1"]["history"]
    for g, e in zip(got["history"][: skipped[0]], expected[: skipped[0]]):
        assert g["loss"] == pytest.approx(e["loss"], rel=LOSS_RTOL)


def test_unreadable_images_keep_ranks_in_step_stage2(data: dict[str, Any], world2: Path) -> None:
    """Teacher fine-tuning reads pixels with no cache to filter unreadable images first: the old
    code raised on one rank's empty batch while the other waited in all_reduce."""
    corpus = load_karpathy(*data["broken"], "train")
    pairs = epoch_pairs(corpus, 0, 0, 0)
    per_step = _readable_per_rank(pairs[:, 0], BatchLayout(4, 2), 10)
    assert any(min(s) == 0 for s in per_step) and any(min(s) > 0 and len(set(s)) > 1 for s in per_step), (
        per_step
    )
    got = _load(world2, "broken2")
    assert [h["step"] for h in got["history"]] == [s for s, sizes in enumerate(per_step) if min(sizes) > 0]
    assert [h["batch"] for h in got["history"]] == [sum(sizes) for sizes in per_step if min(sizes) > 0]


# ------------------------------------------------------------------------------ sharded passes


@pytest.mark.parametrize("world", ["world2", "world4"])
def test_sharded_encoding_and_mining_equal_one_process_exactly(
    world: str, single: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    out = request.getfixturevalue(world)
    with np.load(out / "encode.npz") as got:
        expected = single["encode"]
        assert not expected["valid"][:BROKEN].any() and expected["valid"][BROKEN:].all()
        for key in ("images", "valid", "texts", "mined"):
            assert np.array_equal(got[key], expected[key]), key
    mined = expected["mined"]
    assert (mined >= 0).all() and not np.isin(mined, [3, 30]).any()


def test_embedding_job_under_two_processes_equals_one(
    data: dict[str, Any], world2: Path, single: dict[str, Any]
) -> None:
    """`torchrun -m training.embed`: 5 job shards over 2 ranks (0, 2, 4 and 1, 3) give the same
    files, index shards and manifest as one process."""
    import json

    one, two = data["root"] / "emb_w1", data["root"] / "emb_w2"
    for kind, ext in (("images", "npy"), ("texts", "npy"), ("shards", "npz")):
        names = sorted(p.name for p in (one / kind).iterdir())
        assert names == [f"{s:05d}.{ext}" for s in range(5)]  # 24 images, shards of 5
        assert sorted(p.name for p in (two / kind).iterdir()) == names
        for name in names:
            if ext == "npy":
                assert np.array_equal(np.load(one / kind / name), np.load(two / kind / name)), (kind, name)
                continue
            with np.load(one / kind / name) as a, np.load(two / kind / name) as b:
                assert sorted(a.files) == sorted(b.files)
                for key in a.files:
                    assert np.array_equal(a[key], b[key]), (kind, name, key)
    manifest = json.loads((one / "manifest.json").read_text())
    assert manifest["images"] == {"rows": 24, "valid": 24 - BROKEN}
    assert len(manifest["problems"]) == BROKEN
    assert manifest == json.loads((two / "manifest.json").read_text())
    for kind in ("images", "texts"):
        for f in sorted((one / f"{kind}.index").iterdir()):
            assert f.read_bytes() == (two / f"{kind}.index" / f.name).read_bytes(), f


# ------------------------------------------------------------------------------ shutdown


@pytest.mark.skipif(sys.platform != "linux", reason="reads thread names from /proc/self/task")
def test_ranks_exit_cleanly_after_collectives(tmp_path: Path) -> None:
    # A process group alive at interpreter exit lets gloo's threads outlive Python, and some
    # launches died with SIGABRT ("terminate called without an active exception") after their
    # work was done. torch.distributed.nn.functional, imported after init_process_group (timm
    # does), pinned the group through its default arguments, so destroying it ended nothing.
    for attempt in range(2):
        task = {"kind": "collectives", "name": "gather", "rounds": 50}
        out = tmp_path / str(attempt)
        results = launch_world(2, [task], out, timeout=120)
        assert [code for code, _ in results] == [0, 0], results
        for rank in range(2):
            names = json.loads((out / f"threads{rank}.json").read_text())
            assert not [n for n in names if "gloo" in n], (rank, names)


# ------------------------------------------------------------------------------ resumption


def test_killed_two_process_run_resumes_to_the_same_weights(data: dict[str, Any], world2: Path) -> None:
    config = stage1_config(data, "s1_killed", checkpoint_every=1)
    out = data["root"] / "killed"
    results = launch_world(
        2,
        [{"kind": "stage1", "name": "killed", "config": config, "kill_after_checkpoint": 2}],
        out,
        expect_success=False,
    )
    assert all(code != 0 for code, _ in results)  # both ranks died after checkpoint 2
    latest = Path(config["run_dir"]) / "latest.pt"
    assert torch.load(latest, weights_only=False)["train_state"]["global_step"] == 2
    resumed = copy.deepcopy(config)
    resumed["train"]["max_steps"] = 2  # steps 2 and 3 of the uninterrupted run
    launch_world(2, [{"kind": "stage1", "name": "resumed", "config": resumed, "resume": str(latest)}], out)
    got, expected = _load(out, "resumed"), _load(world2, "stage1")
    assert [h["loss"] for h in got["history"]] == [h["loss"] for h in expected["history"]]
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][name], tensor), name
