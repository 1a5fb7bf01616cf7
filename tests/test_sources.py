
import numpy as np
import pytest
import torch
from PIL import Image

from featx.decode import Decoded, jpeg_tensor, to_rgb
from featx.preprocess import Preprocess
from featx.errors import FeatxError
from featx.sources import TorchvisionSource, folder_source, list_source, open_source

from conftest import make_image

PRE = Preprocess(resize=16, crop=16, mean=(0.5,) * 3, std=(0.5,) * 3)


def test_folder_with_classes_split_and_ids(image_tree):
    src = folder_source(image_tree, "train")
    assert src.classes == ["blue", "red"]
    assert len(src) == 12
    assert src.ids[0] == "train/blue/0.jpg"  # relative to the data folder, source order
    assert src.labels.tolist() == [0] * 6 + [1] * 6


def test_flat_folder_is_unlabeled(tmp_path):
    for i in range(3):
        make_image(tmp_path / f"{i}.png", (10, 20, 30))
    (tmp_path / "notes.txt").write_text("not listed")
    src = folder_source(tmp_path)
    assert src.ids == ["0.png", "1.png", "2.png"] and src.labels.tolist() == [-1, -1, -1]


def test_missing_split_names_what_exists(image_tree):
    with pytest.raises(FeatxError, match="split 'test' not found.*train, val"):
        folder_source(image_tree, "test")


def test_missing_folder(tmp_path):
    with pytest.raises(FeatxError, match="does not exist"):
        open_source(str(tmp_path / "nope"))


def test_csv_and_tsv_lists_relative_to_list_file(tmp_path):
    make_image(tmp_path / "imgs" / "a.jpg", (200, 0, 0))
    make_image(tmp_path / "imgs" / "b.jpg", (0, 0, 200))
    (tmp_path / "list.csv").write_text("path,label\nimgs/a.jpg,cat\nimgs/b.jpg,dog\nimgs/a.jpg,\n")
    src = list_source(tmp_path / "list.csv")
    assert src.classes == ["cat", "dog"] and src.labels.tolist() == [0, 1, -1]
    assert Decoded(src, PRE)[1][2] is None  # decodes relative to the list's folder
    (tmp_path / "list.tsv").write_text("imgs/b.jpg\tdog\n")
    assert list_source(tmp_path / "list.tsv").ids == ["imgs/b.jpg"]


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_torchvision_dataset_reads_local_files_offline(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    x = np.random.default_rng(0).integers(0, 255, (5, 28, 28))
    y = np.array([0, 1, 2, 3, 9])
    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(x))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(y))
    src = TorchvisionSource("FashionMNIST", str(tmp_path), "test")
    assert len(src) == 5 and src.labels.tolist() == y.tolist()
    assert src.classes[9] == "Ankle boot"
    t, _, err = Decoded(src, PRE)[0]
    assert err is None and t.shape == (3, 16, 16)  # gray -> 3 channels


def test_unknown_torchvision_dataset():
    with pytest.raises(FeatxError, match="no data set 'NoSuchSet'"):
        open_source("torchvision:NoSuchSet", root="x")


# -- every image becomes 8-bit RGB correctly ---------------------------------------------


def test_grayscale_and_palette():
    assert to_rgb(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    p = Image.new("P", (2, 2))
    p.putpalette([10, 20, 30] * 256)
    assert to_rgb(p).getpixel((1, 1)) == (10, 20, 30)


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    out = to_rgb(rgba)
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent -> background
    assert out.getpixel((1, 0)) == (255, 0, 0)
    pt = Image.new("P", (1, 1), 0)
    pt.putpalette([0, 0, 0] * 256)
    pt.info["transparency"] = 0
    assert to_rgb(pt).getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_and_16_bit():
    assert to_rgb(Image.new("CMYK", (1, 1), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    img16 = Image.fromarray(np.array([[65535, 32768, 0]], dtype=np.uint16))
    assert img16.mode.startswith("I;16")
    assert [to_rgb(img16).getpixel((i, 0))[0] for i in range(3)] == [255, 128, 0]  # scaled, not clipped


def test_sixteen_bit_png_file(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(path)
    assert to_rgb(Image.open(path)).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (30, 10), (0, 0, 0))
    img.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=100)
    out = to_rgb(Image.open(path))
    assert out.size == (10, 30)
    assert sum(out.getpixel((9, 0))) > 600  # the white corner moved to the top right


def test_bad_images_are_values_not_exceptions(tmp_path):
    good = make_image(tmp_path / "good.jpg", (1, 2, 3), size=(64, 64))
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    make_image(tmp_path / "bomb.png", (0, 0, 0), size=(300, 300))
    src = folder_source(tmp_path)
    ds = Decoded(src, PRE, max_pixels=200 * 200)
    errors = {src.ids[i]: ds[i][2] for i in range(len(src))}
    assert errors["good.jpg"] is None
    assert "bomb" in errors["bomb.png"]
    for bad in ("truncated.jpg", "empty.jpg", "text.jpg"):
        assert errors[bad], bad


def test_jpeg_draft_decodes_large_photos_at_reduced_scale(tmp_path):
    path = make_image(tmp_path / "big.jpg", (120, 60, 30), size=(1600, 1200))
    img = Image.open(path)
    img.draft("RGB", (100, 100))
    assert img.size == (200, 150)  # 1/8 scale, still >= the requested size
    t, _, err = Decoded(folder_source(tmp_path), Preprocess(100, 100, (0.5,) * 3, (0.5,) * 3))[0]
    assert err is None and t.shape == (3, 100, 100)


# -- training and validation splits (sweep, finetune) -------------------------------------


def test_stratified_holdout_is_seeded_and_per_class():
    from featx.sources import stratified_holdout

    labels = np.array([0] * 10 + [1] * 5 + [2] * 1)
    tr, va = stratified_holdout(labels, 0.2, seed=3)
    assert np.bincount(labels[va], minlength=3).tolist() == [2, 1, 0]  # a class of one stays in training
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(16)) and not set(tr) & set(va)
    assert (np.diff(tr) > 0).all() and (np.diff(va) > 0).all()  # source order
    again, _ = stratified_holdout(labels, 0.2, seed=3)
    other, _ = stratified_holdout(labels, 0.2, seed=4)
    assert again.tolist() == tr.tolist() and other.tolist() != tr.tolist()


def test_open_splits_finds_split_folders_or_holds_out(image_tree):
    from featx.sources import open_splits

    s = open_splits(str(image_tree))  # train/ and val/ folders
    assert len(s.train) == 12 and len(s.val) == 6 and "split 'val'" in s.note
    s = open_splits(str(image_tree / "train"))  # plain class folders: hold out 20 % of each class
    assert len(s.train) == 10 and len(s.val) == 2 and "holding out 2 of the 12" in s.note
    assert s.val.classes == s.train.classes == ["blue", "red"] and sorted(s.val.labels.tolist()) == [0, 1]
    assert not set(s.train.ids) & set(s.val.ids)
    assert open_splits(str(image_tree / "train"), val_fraction=0).val is None
    with pytest.raises(FeatxError, match="split 'test' not found"):
        open_splits(str(image_tree), val_split="test")  # a split asked for by name must exist


def test_augmentation_is_a_function_of_seed_epoch_and_image(tmp_path):
    """Training images get the same augmentation for the same (seed, epoch, image), whatever
    the order or worker that asks: a resumed run repeats an uninterrupted one exactly."""
    from torchvision.transforms import v2 as T

    for i in range(3):
        make_image(tmp_path / f"{i}.png", (30 * i, 90, 200), size=(48, 48), seed=i)
    aug = T.Compose([T.RandomResizedCrop(16, scale=(0.3, 1.0)), T.ColorJitter(0.5, 0.5, 0.5)])
    ds = Decoded(folder_source(tmp_path), PRE, transform=aug, seed=7)
    first = [ds[(i, 1)][0] for i in (2, 1, 0)][::-1]
    again = [ds[(i, 1)][0] for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(ds[(0, 2)][0], first[0])  # another epoch, another draw
    assert not torch.equal(Decoded(folder_source(tmp_path), PRE, transform=aug, seed=8)[(0, 1)][0], first[0])


class _PillowOnly:
    """A source whose items are only reachable through Pillow (as for torchvision data sets)."""

    def __init__(self, src):
        self.src = src

    def __len__(self):
        return len(self.src)

    def open(self, i):
        return self.src.open(i)

    def read_bytes(self, i):
        return None


def test_the_libjpeg_turbo_path_gives_pillows_pixels(tmp_path):
    """Ordinary JPEGs (RGB, grey, EXIF-rotated) take torchvision's decoder; the pixels stay
    within a grey level or two of Pillow's, and the orientation is applied."""
    from sklearn.datasets import load_sample_image

    photo = Image.fromarray(load_sample_image("flower.jpg")).resize((96, 64))
    photo.save(tmp_path / "rgb.jpg", quality=90)
    photo.convert("L").save(tmp_path / "grey.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(tmp_path / "rotated.jpg", quality=90, exif=exif)
    photo.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)
    src = folder_source(tmp_path)
    pre = Preprocess(resize=48, crop=40, mean=(0.5,) * 3, std=(0.5,) * 3)  # no reduced-scale decode
    fast, pillow = Decoded(src, pre), Decoded(_PillowOnly(src), pre)
    took = {name for i, name in enumerate(src.ids) if jpeg_tensor(src.read_bytes(i), pre) is not None}
    assert took == {"rgb.jpg", "grey.jpg", "rotated.jpg"}  # CMYK goes to Pillow
    for i, name in enumerate(src.ids):
        a, _, err = fast[i]
        b, _, _ = pillow[i]
        assert err is None and a.shape == b.shape == (3, 40, 40), name
        assert (a.int() - b.int()).abs().max() <= 3, name
    rotated = fast[src.ids.index("rotated.jpg")][0]
    upright = fast[src.ids.index("rgb.jpg")][0]
    assert (rotated.int() - upright.int()).abs().float().mean() > 10  # turned, not the same picture


def test_a_truncated_jpeg_of_ordinary_size_is_still_a_failure(tmp_path):
    from sklearn.datasets import load_sample_image

    Image.fromarray(load_sample_image("china.jpg")).resize((96, 64)).save(tmp_path / "a.jpg", quality=90)
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(data[: len(data) * 2 // 3])
    pre = Preprocess(resize=48, crop=40, mean=(0.5,) * 3, std=(0.5,) * 3)
    t, _, err = Decoded(folder_source(tmp_path), pre)[0]
    assert t is None and err
