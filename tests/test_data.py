import pytest
import torch
import torch.nn.functional as F

from data import CLASSES, Loader, augment, get_datasets, load_cifar10, reflect, split_indices
from utils import UserError


def test_image_folder_and_pickle_read_the_same(image_folder, pickle_folder, tiny_arrays):
    from_png = load_cifar10(image_folder, allow_download=False)
    from_pickle = load_cifar10(pickle_folder, allow_download=False)
    images, labels = tiny_arrays["train"]
    # The image folder is sorted by class; the pickle keeps the original order.
    order = torch.argsort(labels, stable=True)
    assert torch.equal(from_pickle[0], images) and torch.equal(from_pickle[1], labels)
    assert torch.equal(from_png[0], images[order]) and torch.equal(from_png[1], labels[order])
    assert from_png[2].dtype == torch.uint8 and from_png[2].shape == (50, 3, 32, 32)
    assert torch.equal(from_pickle[3], tiny_arrays["test"][1])


def test_batches_folder_itself_is_accepted(pickle_folder):
    assert len(load_cifar10(pickle_folder / "cifar-10-batches-py", allow_download=False)[0]) == 200


def test_split_is_seeded_and_disjoint():
    a_train, a_val = split_indices(100, 10, seed=3)
    b_train, b_val = split_indices(100, 10, seed=3)
    c_train, c_val = split_indices(100, 10, seed=4)
    assert torch.equal(a_val, b_val) and torch.equal(a_train, b_train)
    assert not torch.equal(a_val, c_val)
    assert sorted(torch.cat([a_train, a_val]).tolist()) == list(range(100))


def test_train_subset_and_val_size(image_folder):
    datasets, split = get_datasets(image_folder, val_size=30, split_seed=0, train_subset=50,
                                   allow_download=False)
    assert len(datasets["train"][0]) == 50 and len(datasets["val"][0]) == 30
    assert split == {"val_size": 30, "split_seed": 0, "num_train_images": 200}
    # the subset is drawn from shuffled indices, so it spans classes despite sorted files
    assert len(datasets["train"][1].unique()) > 5


@pytest.mark.parametrize("t", [0, 2, 4])
def test_augment_translates_and_flips(t):
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.int32).view(2, 3, 32, 32).to(torch.uint8)
    centered = augment(images, torch.full((2, 2), t), torch.tensor([False, True]), translate=t)
    assert torch.equal(centered[0], images[0])
    assert torch.equal(centered[1], images[1].flip(2))
    corners = torch.tensor([[0, 0], [2 * t, 2 * t]])
    shifted = augment(images, corners, torch.tensor([False, False]), translate=t)
    assert torch.equal(shifted[0, :, t:, t:], images[0, :, :32 - t, :32 - t])
    assert torch.equal(shifted[1, :, :32 - t, :32 - t], images[1, :, t:, t:])
    # the uncovered edge is the image mirrored at its border: row t - 1 - i shows row i + 1
    for i in range(t):
        assert torch.equal(shifted[0, :, t - 1 - i, t:], images[0, :, i + 1, :32 - t])
        assert torch.equal(shifted[1, :, 31 - t + 1 + i, :32 - t], images[1, :, 30 - i, t:])


def test_reflect_folds_indices_like_reflect_padding():
    padded = F.pad(torch.arange(8.0).view(1, 1, 8), (5, 5), mode="reflect").flatten()
    assert torch.equal(reflect(torch.arange(-5, 13), 8).float(), padded)


def test_each_image_is_mirrored_in_every_other_epoch():
    # one bright pixel in the left half: a mirrored image has it in the right half
    images = torch.zeros(40, 3, 32, 32, dtype=torch.uint8)
    images[:, :, 16, 2] = 255
    loader = Loader(images, torch.arange(40), batch_size=8, device="cpu", train=True, translate=0)

    def mirrored(epoch):
        flags = {}
        for x, y in loader.batches(epoch):
            flags.update(zip(y.tolist(), (x[:, 0, 16, 29] > x[:, 0, 16, 2]).tolist()))
        return torch.tensor([flags[i] for i in range(40)])

    first, second, third = mirrored(0), mirrored(1), mirrored(2)
    assert torch.equal(second, ~first) and torch.equal(third, first)
    assert 0 < first.sum() < 40  # the starting side is drawn per image


def test_loader_batches_keep_shapes_dtypes_and_labels():
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(40) % 10
    loader = Loader(images, labels, batch_size=16, device="cpu", train=True)
    batches = list(loader.batches(0, seed=0))
    assert len(batches) == len(loader) == 2  # the partial batch is dropped when training
    for x, y in batches:
        assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.dtype == torch.long and y.shape == (16,)
    first = next(loader.batches(0, seed=0))
    assert torch.equal(first[0], batches[0][0])  # the same epoch repeats exactly
    assert not torch.equal(next(loader.batches(1, seed=0))[0], batches[0][0])
    assert not torch.equal(next(loader.batches(0, seed=1))[0], batches[0][0])
    evaluation = Loader(images, labels, batch_size=16, device="cpu")
    assert len(evaluation) == 3 and torch.equal(torch.cat([y for _, y in evaluation]), labels)


def test_low_res_epochs_shrink_the_training_images_then_stop():
    # constant images survive downscaling unchanged, so the pairing with labels can be checked
    labels = torch.arange(32) % 10
    images = (labels * 20 + 10).view(-1, 1, 1, 1).expand(32, 3, 32, 32).to(torch.uint8).contiguous()
    loader = Loader(images, labels, 16, "cpu", train=True, translate=0, low_res_epochs=2, low_res=20)
    for epoch, side in [(0, 20), (1, 20), (2, 32)]:
        for x, y in loader.batches(epoch):
            assert x.shape == (16, 3, side, side) and x.is_contiguous(memory_format=torch.channels_last)
            raw = (x * loader.std + loader.mean).round()
            assert torch.equal(raw[:, 0, side // 2, side // 2], (y * 20 + 10).float())
    evaluation = Loader(images, labels, 16, "cpu", low_res_epochs=2, low_res=20)
    assert next(iter(evaluation))[0].shape[-1] == 32  # evaluation always sees full size


def test_augmented_labels_stay_with_their_images():
    # every image is a constant equal to its label, so the pairing can be checked after augmenting
    labels = torch.arange(64) % 10
    images = (labels * 20 + 10).view(-1, 1, 1, 1).expand(64, 3, 32, 32).to(torch.uint8).contiguous()
    loader = Loader(images, labels, batch_size=32, device="cpu", train=True)
    for x, y in loader.batches(epoch=0, seed=1):
        raw = (x * loader.std + loader.mean).round()
        centre = raw[:, 0, 16, 16]  # the centre pixel is never padding
        assert torch.equal(centre, (y * 20 + 10).float())


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="pass --data-dir"):
        load_cifar10(tmp_path / "nowhere", allow_download=False)


def test_folder_of_something_else_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="is not a CIFAR-10 folder"):
        load_cifar10(tmp_path, allow_download=False)


def test_wrong_class_names_are_refused(tmp_path):
    for split in ("train", "test"):
        for name in [*CLASSES[:9], "lorry"]:
            (tmp_path / split / name).mkdir(parents=True)
    with pytest.raises(UserError, match="class folders"):
        load_cifar10(tmp_path, allow_download=False)
