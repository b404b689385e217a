"""The generated copy / reverse / sort tasks: targets, seeding, held-out splits, lengths."""

import pytest

from fastattn.data.synthetic import SyntheticConfig, generate

SMALL = dict(train_size=400, valid_size=50, test_size=100)


@pytest.mark.parametrize("task", ["copy", "reverse", "sort"])
def test_targets_follow_the_task(task):
    splits = generate(SyntheticConfig(task=task, symbols=13, lengths=(3, 9), **SMALL))
    for source, target in splits["train"] + splits["test"]:
        assert 3 <= len(source) <= 9
        assert all(0 <= int(token) < 13 for token in source)
        expected = {"copy": source, "reverse": source[::-1], "sort": sorted(source, key=int)}[task]
        assert target == expected


def test_the_same_seed_gives_the_same_data_and_another_seed_does_not():
    config = SyntheticConfig(seed=5, **SMALL)
    assert generate(config) == generate(config)
    assert generate(config)["train"] != generate(SyntheticConfig(seed=6, **SMALL))["train"]


def test_valid_and_test_sources_never_occur_in_training_where_lengths_allow():
    """Over 3 symbols, lengths 7 and 8 have 2187 and 6561 sequences (held out);
    shorter ones have under 1000 and occur in every split."""
    splits = generate(SyntheticConfig(symbols=3, lengths=(1, 8), train_size=3000, valid_size=100, test_size=300))
    held_out = {tuple(source) for split in ("valid", "test") for source, _ in splits[split]}
    train = [tuple(source) for source, _ in splits["train"]]
    assert not any(source in held_out for source in train if len(source) >= 7)
    assert any(source in held_out for source in train if len(source) <= 2)  # too few to hold out
    assert {len(source) for source in train} == set(range(1, 9))  # no length is missing from training
    assert [len(splits[name]) for name in ("train", "valid", "test")] == [3000, 100, 300]


def test_test_lengths_can_lie_beyond_the_training_range():
    splits = generate(SyntheticConfig(lengths=(1, 5), test_lengths=(30, 40), **SMALL))
    assert max(len(source) for source, _ in splits["train"]) <= 5
    assert {len(source) for source, _ in splits["test"]} <= set(range(30, 41))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(task="rotate"), "task must be one of"),
        (dict(symbols=1), "symbols must be >= 2"),
        (dict(lengths=(0, 5)), "lengths must be"),
        (dict(test_lengths=(9, 4)), "test_lengths must be"),
        (dict(train_size=0), "train_size must be >= 1"),
    ],
)
def test_bad_configurations_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**fields)


def test_an_impossible_held_out_request_is_an_error_not_a_hang():
    with pytest.raises(ValueError, match="cannot draw"):
        generate(SyntheticConfig(symbols=2, lengths=(10, 10), train_size=10, valid_size=1, test_size=20_000))
