"""Data: world-size-independent sharding, and the three data set kinds."""
import os

import mxnet as mx
import numpy as np
import pytest

from distft.data.datasets import ImageFolder, RecordFile
from distft.data.loader import BatchLoader
from distft.data.sets import open_dataset
from distft.data.sharding import ShardSampler, eval_shard
from distft.data.transforms import Transform
from distft.errors import DataError

from imagefiles import png


def images(n=6, size=12, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (size, size + 2, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("world", [2, 4])
def test_union_of_rank_batches_is_the_single_process_batch(world):
    B = 5
    single = ShardSampler(size=103, batch_size=B * world, world_size=1, rank=0, seed=7)
    ranks = [ShardSampler(size=103, batch_size=B, world_size=world, rank=r, seed=7) for r in range(world)]
    assert all(s.steps_per_epoch == single.steps_per_epoch for s in ranks)
    for epoch in (0, 3):
        for step in range(single.steps_per_epoch):
            union = np.concatenate([s.indices(epoch, step) for s in ranks])
            assert np.array_equal(union, single.indices(epoch, step))
            assert len(set(union)) == len(union)


def test_epochs_reshuffle_and_eval_shards_cover_everything():
    s = ShardSampler(size=50, batch_size=10, world_size=1, rank=0, seed=1)
    assert not np.array_equal(s.permutation(0), s.permutation(1))
    shards = np.concatenate([eval_shard(50, 3, r) for r in range(3)])
    assert sorted(shards) == list(range(50))


@pytest.mark.parametrize("world", [1, 3])
def test_fixed_shards_are_disjoint_and_the_same_every_epoch(world):
    B = 4
    ranks = [ShardSampler(size=103, batch_size=B, world_size=world, rank=r, seed=7, fixed=True) for r in range(world)]
    plain = ShardSampler(size=103, batch_size=B, world_size=world, rank=0, seed=7)
    assert all(s.steps_per_epoch == plain.steps_per_epoch for s in ranks)
    shards = [set(s.shard().tolist()) for s in ranks]
    assert sum(len(x) for x in shards) == len(set().union(*shards)) == plain.steps_per_epoch * B * world
    for s, mine in zip(ranks, shards):
        seen = [np.concatenate([s.indices(e, t) for t in range(s.steps_per_epoch)]) for e in range(3)]
        assert all(set(x.tolist()) == mine and len(x) == len(mine) for x in seen)  # the whole shard
        assert not np.array_equal(seen[0], seen[1])  # reshuffled within the shard
    # each step, the ranks together still take a global batch of distinct samples
    union = np.concatenate([s.indices(2, 5) for s in ranks])
    assert len(set(union.tolist())) == B * world


def test_image_folder(tmp_path):
    imgs = images()
    for i, img in enumerate(imgs):
        cls = tmp_path / ("cat" if i % 2 else "dog")
        cls.mkdir(exist_ok=True)
        (cls / f"{i}.png").write_bytes(png(img))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = open_dataset(str(tmp_path), "train", "data.train")
    assert isinstance(ds, ImageFolder) and ds.class_names == ["cat", "dog"] and len(ds) == 6
    assert np.array_equal(ds.read(0), imgs[1])  # cat/1.png comes first
    x, y = BatchLoader(ds, Transform(8, [0.5] * 3, [0.25] * 3, False, 0), workers=2).batch(np.arange(6), 0)
    assert x.shape == (6, 3, 8, 8) and x.dtype == np.float32 and list(y) == [0, 0, 0, 1, 1, 1]


def test_recordio(tmp_path):
    imgs = images(4)
    rec, idx = str(tmp_path / "d.rec"), str(tmp_path / "d.idx")
    writer = mx.recordio.MXIndexedRecordIO(idx, rec, "w")
    for i, img in enumerate(imgs):
        writer.write_idx(i, mx.recordio.pack(mx.recordio.IRHeader(0, float(i % 2), i, 0), png(img)))
    writer.close()
    ds = open_dataset(rec, "train", "data.train")
    assert isinstance(ds, RecordFile) and len(ds) == 4 and list(ds.labels) == [0, 1, 0, 1]
    assert np.array_equal(ds.read(2), imgs[2])


def test_missing_paths_name_the_key_and_file(tmp_path):
    with pytest.raises(DataError, match=r"data.val: .*/nope: no such file or directory"):
        open_dataset(str(tmp_path / "nope"), "val", "data.val")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="one sub-folder per class"):
        open_dataset(str(tmp_path / "empty"), "train", "data.train")
    (tmp_path / "lonely.rec").write_bytes(b"")
    with pytest.raises(DataError, match=r"lonely.idx: no such file"):
        open_dataset(str(tmp_path / "lonely.rec"), "train", "data.train")


def test_augmentation_depends_on_seed_epoch_and_index_only():
    t = Transform(8, [0.5] * 3, [0.25] * 3, True, seed=3)
    img = images(1, size=16)[0]
    assert np.array_equal(t(img, 1, 5), t(img, 1, 5))
    assert not np.array_equal(t(img, 1, 5), t(img, 2, 5))


def test_demo_sets_are_disjoint_digits():
    pre, ft, val = (open_dataset(s, r, "data.train") for s, r in
                    (("demo-pretrain", "train"), ("demo", "train"), ("demo", "val")))
    from sklearn.datasets import load_digits
    target = load_digits().target
    assert pre.classes == ft.classes == 5
    assert len(pre) == round(0.8 * (target < 5).sum())
    assert len(ft) + len(val) == (target >= 5).sum() and abs(len(val) - 0.2 * (target >= 5).sum()) <= 1


def test_a_users_folder_reads_nested_photos_and_never_hidden_ones(tmp_path):
    """Nested photos belong to their class folder; hidden folders are never classes (an
    `.ipynb_checkpoints/` made class 0 and shifted every label); hidden files, AppleDouble
    `._*` files and non-images are ignored (and counted), not read as images."""
    from imagefiles import make_users_folder

    root = make_users_folder(tmp_path / "photos")
    ds = ImageFolder(root)
    assert ds.class_names == ["café", "cat", "dog", "red fox"]
    per_class = np.bincount(ds.labels).tolist()
    assert per_class == [6, 7, 10, 7]  # cat: + truncated.jpg; dog: + 4 nested; red fox: + UPPER.JPG
    assert "dog/from_phone/2023/IMG_0000.jpg" in ds.ids and "red fox/UPPER.JPG" in ds.ids
    assert not any("/." in p or "._" in p for p in ds.files)
    assert sorted(p[len(root) + 1:] for p in ds.ignored) == sorted(
        [".DS_Store", ".ipynb_checkpoints/", "café/._000.jpg", "cat/.DS_Store", "dog/Thumbs.db"])
    assert ds.ignored_per_class == {"café": 1, "cat": 1, "dog": 1, "red fox": 0}


def test_class_folders_differing_only_in_unicode_form_are_one_class(tmp_path):
    import unicodedata

    nfd = unicodedata.normalize("NFD", "café")
    for name in ("café", nfd):
        os.makedirs(tmp_path / name, exist_ok=True)
    for i, img in enumerate(images(4)):
        (tmp_path / ("café" if i % 2 else nfd) / f"{i}.png").write_bytes(png(img))
    (tmp_path / "tea").mkdir()
    (tmp_path / "tea" / "t.png").write_bytes(png(images(1)[0]))
    ds = ImageFolder(str(tmp_path))
    assert ds.class_names == ["café", "tea"] and list(ds.labels) == [0, 0, 0, 0, 1]
