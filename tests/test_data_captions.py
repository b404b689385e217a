"""The captions data: every digit inside the canvas where its box says, boxes in
left-to-right order and disjoint, captions naming the digits in that order, and
seeded splits that are reproducible and drawn from disjoint digit images."""

import pytest
import torch

from fastattn.data.captions import DIGIT_SIZE, WORDS, compose_canvases, load_caption_splits
from fastattn.data.digits import load_digits_splits


@pytest.fixture(scope="module")
def splits():
    return load_caption_splits(3, {"train": 300, "valid": 40, "test": 60}, height=20, width=44, max_digits=3)


def test_digits_split_is_disjoint_and_seeded():
    first, again, other = load_digits_splits(0), load_digits_splits(0), load_digits_splits(1)
    sizes = [len(first[split].labels) for split in ("train", "valid", "test")]
    assert sum(sizes) == 1797 and min(sizes) > 200
    images = {split: {tuple(image.flatten().tolist()) for image in first[split].images} for split in first}
    # sklearn's digits hold a few exact duplicates; the split itself never repeats an index
    assert len(images["train"] & images["test"]) <= 3
    assert torch.equal(first["test"].images, again["test"].images)
    assert not torch.equal(first["test"].images, other["test"].images)


def test_every_digit_is_drawn_inside_its_box_and_nowhere_else(splits):
    data = splits["train"]
    for canvas in range(len(data)):
        covered = torch.zeros_like(data.images[canvas], dtype=torch.bool)
        for slot in range(int(data.counts[canvas])):
            top, left, bottom, right = data.boxes[canvas, slot].tolist()
            assert bottom - top == DIGIT_SIZE and right - left == DIGIT_SIZE
            assert 0 <= top and bottom <= 20 and 0 <= left and right <= 44
            assert not covered[top:bottom, left:right].any(), "boxes overlap"
            covered[top:bottom, left:right] = True
        assert (data.images[canvas][~covered] == 0).all()


def test_boxes_are_left_to_right_and_captions_name_them_in_order(splits):
    data = splits["test"]
    assert set(data.counts.tolist()) == {1, 2, 3}
    for canvas in range(len(data)):
        count = int(data.counts[canvas])
        lefts = data.boxes[canvas, :count, 1]
        assert torch.all(lefts[1:] >= lefts[:-1] + DIGIT_SIZE)
        assert (data.digits[canvas, count:] == -1).all() and (data.boxes[canvas, count:] == -1).all()
        words = data.caption(canvas).split()
        assert words == [WORDS[label] for label in data.digits[canvas, :count].tolist()]


def test_each_box_holds_an_image_of_its_label():
    """Compose from a pool of one image per class: the pixels in each box must be that class's image."""
    pool = load_digits_splits(0)["train"]
    firsts = [int((pool.labels == label).nonzero()[0]) for label in range(10)]
    one_per_class = type(pool)(pool.images[firsts], pool.labels[firsts])
    data = compose_canvases(one_per_class, 50, torch.Generator().manual_seed(0), height=16, width=40)
    for canvas in range(len(data)):
        for slot in range(int(data.counts[canvas])):
            top, left, bottom, right = data.boxes[canvas, slot].tolist()
            label = int(data.digits[canvas, slot])
            assert torch.equal(data.images[canvas, top:bottom, left:right], one_per_class.images[label])


def test_splits_are_reproducible_and_independent_of_other_split_sizes():
    small = load_caption_splits(5, {"train": 10, "valid": 5, "test": 7})
    large = load_caption_splits(5, {"train": 30, "valid": 5, "test": 7})
    assert torch.equal(small["test"].images, large["test"].images)
    assert small["test"].captions() == large["test"].captions()
    assert not torch.equal(small["test"].images, load_caption_splits(6, {"train": 10, "valid": 5, "test": 7})["test"].images)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(width=20, max_digits=3), "width"),
        (dict(height=7), "height"),
        (dict(max_digits=0), "max_digits"),
    ],
)
def test_bad_arguments_name_the_argument(arguments, message):
    pool = load_digits_splits(0)["valid"]
    with pytest.raises(ValueError, match=message):
        compose_canvases(pool, 3, torch.Generator(), **arguments)


def test_unknown_split_name_is_refused():
    with pytest.raises(ValueError, match="sizes"):
        load_caption_splits(0, {"training": 10})
