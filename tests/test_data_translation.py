"""The TSV parallel corpus: parsing, clear errors, tokens, vocabulary, filtering, split."""

import itertools

import pytest

from fastattn.data import DataError
from fastattn.data.translation import detokenize, keep_short, read_pairs, split, tokenize
from fastattn.data.vocabulary import SPECIALS, Vocabulary


def write(tmp_path, text, name="corpus.tsv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_pairs_are_read_with_extra_columns_ignored_and_blank_lines_skipped(tmp_path):
    path = write(tmp_path, "Go.\tVa !\tCC-BY 2.0 (France)\n\nI don't know.\tJe ne sais pas.\n")
    pairs = read_pairs(path)
    assert [(s.text, t.text) for s, t in pairs] == [("Go.", "Va !"), ("I don't know.", "Je ne sais pas.")]
    assert pairs[1][0].tokens == ["I", "don't", "know", "."]


def test_lowercase_applies_to_tokens_and_to_the_reference_text(tmp_path):
    (source, target), = read_pairs(write(tmp_path, "Hi Tom.\tSalut Tom.\n"), lowercase=True)
    assert source.tokens == ["hi", "tom", "."] and target.text == "salut tom."


@pytest.mark.parametrize(
    "text, message",
    [
        ("Go.\tVa !\nno tab here\n", r"corpus\.tsv:2: expected source<TAB>target, found no tab"),
        ("Go.\tVa !\n\n\t  Va !\n", r"corpus\.tsv:3: the source is empty"),
        ("Go.\t\n", r"corpus\.tsv:1: the target is empty"),
        ("\n\n", r"corpus\.tsv: no sentence pairs"),
    ],
)
def test_a_malformed_file_names_the_file_and_line(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        read_pairs(write(tmp_path, text))


def test_missing_and_non_utf8_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="missing.tsv: no such file"):
        read_pairs(tmp_path / "missing.tsv")
    path = tmp_path / "latin1.tsv"
    path.write_bytes("caf\xe9\tcoffee\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.tsv: not UTF-8"):
        read_pairs(path)


@pytest.mark.parametrize(
    "text",
    ["I don't know, Tom's dog (really)!", "Is it 5% off? Yes: today.", "¿Qué pasa? «Nada».", "Hello"],
)
def test_detokenize_undoes_tokenize(text):
    assert detokenize(tokenize(text)) == text


def test_length_filter_and_seeded_split(tmp_path):
    lines = "".join(f"{'w ' * (index % 7 + 1)}\tt{index}\n" for index in range(100))
    pairs = read_pairs(write(tmp_path, lines))
    short = keep_short(pairs, max_length=4)
    assert len(short) == sum(1 for index in range(100) if index % 7 + 1 <= 4)
    first, again, other = split(short, 0.1, 0.2, seed=3), split(short, 0.1, 0.2, seed=3), split(short, 0.1, 0.2, seed=4)
    assert first == again and first != other
    assert [len(first[name]) for name in ("test", "valid")] == [round(0.2 * len(short)), round(0.1 * len(short))]
    assert sorted(p[1].text for name in first for p in first[name]) == sorted(p[1].text for p in short)
    with pytest.raises(ValueError, match="valid_fraction must lie in"):
        split(short, 0.0, 0.2, seed=3)
    with pytest.raises(DataError, match="at least 3 sentence pairs"):
        split(short[:2], 0.1, 0.1, seed=3)


def test_every_split_keeps_a_pair_whatever_the_fractions(tmp_path):
    """Test and valid counts were rounded up each on its own: 4 pairs at 0.4 and 0.4 left
    train empty, and training then "succeeded" with 0 steps."""
    pairs = read_pairs(write(tmp_path, "".join(f"s{index}\tt{index}\n" for index in range(40))))
    for count in range(3, 41):
        for valid, test in itertools.product((0.01, 0.25, 0.4, 0.49), repeat=2):
            splits = split(pairs[:count], valid, test, seed=0)
            assert all(splits.values()) and sum(map(len, splits.values())) == count, (count, valid, test)


def test_a_byte_order_mark_is_not_read_as_a_token(tmp_path):
    path = tmp_path / "notepad.tsv"
    path.write_text("Go.\tVa !\n", encoding="utf-8-sig")
    (source, target), = read_pairs(path)
    assert source.text == "Go." and source.tokens == ["Go", "."] and target.tokens == ["Va", "!"]


def test_vocabulary_min_frequency_and_unknown_tokens():
    vocabulary = Vocabulary.build([["a", "b", "a"], ["c", "a", "b"]], min_frequency=2)
    assert vocabulary.tokens == [*SPECIALS, "a", "b"]
    assert vocabulary.encode(["a", "c", "zebra"]) == [4, Vocabulary.unk_id, Vocabulary.unk_id]
    assert vocabulary.decode([Vocabulary.bos_id, 4, 5, Vocabulary.eos_id, 4]) == ["a", "b"]
    assert Vocabulary(vocabulary.tokens).ids == vocabulary.ids
    with pytest.raises(ValueError, match="min_frequency must be >= 1"):
        Vocabulary.build([["a"]], min_frequency=0)
    with pytest.raises(ValueError, match="must start with the special tokens"):
        Vocabulary(["a", "b"])
