"""Chains: parsing, validation, and the canonical text form."""

import random

import pytest

from lm_eval_cola.chain import Chain, ChainError


@pytest.mark.parametrize(
    ("text", "layers"),
    [
        ("0-3", (0, 1, 2, 3)),
        ("0-11.11-29", (*range(12), *range(11, 30))),
        ("5", (5,)),
        ("3-1", (3, 2, 1)),
        ("4-6x2", (4, 5, 6, 4, 5, 6)),
        ("0.2x3.1", (0, 2, 2, 2, 1)),
        ("[0, 1, 1, 2]", (0, 1, 1, 2)),
        (" 0-2 ", (0, 1, 2)),
    ],
)
def test_parse_text_forms(text, layers):
    assert Chain.parse(text).layers == layers


def test_parse_lists_ints_and_chains():
    assert Chain.parse([2, 0, 1]).layers == (2, 0, 1)
    assert Chain.parse(7).layers == (7,)
    chain = Chain.parse("0-3")
    assert Chain.parse(chain) is chain


@pytest.mark.parametrize(
    ("layers", "text"),
    [
        ((0, 1, 2, 3), "0-3"),
        ((*range(12), *range(11, 30)), "0-11.11-29"),
        ((3, 2, 1), "3.2.1"),
        ((0, 2, 4), "0.2.4"),
        ((5,), "5"),
        ((1, 1, 1), "1.1.1"),
    ],
)
def test_canonical_text(layers, text):
    assert str(Chain(layers)) == text


def test_text_round_trips_for_random_chains():
    rng = random.Random(0)
    for _ in range(500):
        layers = tuple(rng.randrange(30) for _ in range(rng.randrange(1, 60)))
        assert Chain.parse(str(Chain(layers))).layers == layers


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("", "empty chain"),
        ("0-3.a.5", "'a'"),
        ("0-3..5", "'(empty)'"),
        ("0--3", "'0--3'"),
        ("1x0", "repeat count"),
        ("0,1,2", "'0,1,2'"),
        ("[0, 1.5]", "1.5"),
        ("[0, true]", "True"),
        ("[0, 1", "not a valid JSON list"),
        ([], "empty chain"),
        ([0, -1], "-1"),
        (3.1, "quote it"),
        (True, "not a chain"),
    ],
)
def test_bad_chains_name_the_bad_token(spec, named):
    with pytest.raises(ChainError) as info:
        Chain.parse(spec)
    assert named in str(info.value)


def test_validate_checks_range_and_cap():
    chain = Chain.parse("0-29")
    assert chain.validate(30) is chain
    with pytest.raises(ChainError, match=r"layer 30 .* out of range: the model has 30 layers"):
        Chain.parse("0-30").validate(30)
    with pytest.raises(ChainError, match="more than the cap of 120"):
        Chain.parse("0-29x5").validate(30)
    with pytest.raises(ChainError, match="more than the cap of 10"):
        Chain.parse("0-5x2").validate(30, max_length=10)


def test_identity():
    assert Chain.identity(4).layers == (0, 1, 2, 3)
    assert Chain.identity(4).is_identity(4)
    assert not Chain.parse("0.1.1.2.3").is_identity(4)
