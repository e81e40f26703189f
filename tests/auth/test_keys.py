from __future__ import annotations

import datetime as dt

import pytest

from fleetgate.auth import keys


def test_generated_keys_are_well_formed_and_unique():
    ks = {keys.generate() for _ in range(200)}
    assert len(ks) == 200
    for k in ks:
        assert k.startswith("fg-") and keys.well_formed(k)
        assert len(k) == 3 + 43  # 32 random bytes, base64url


def test_digest_is_sha256_hex_and_prefix_is_short():
    k = keys.generate()
    assert len(keys.digest(k)) == 64
    assert keys.digest(k) != keys.digest(k + "x")
    assert keys.display_prefix(k) == k[:9]


@pytest.mark.parametrize("bad", ["", "fg-", "sk-" + "a" * 43, "fg-" + "a" * 42, "fg-" + "!" * 43,
                                 "fg-" + "a" * 44])
def test_malformed_keys(bad):
    assert not keys.well_formed(bad)


@pytest.mark.parametrize("text, seconds", [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400),
                                           ("2w", 14 * 86400), ("45s", 45),
                                           ("36500d", 36500 * 86400)])
def test_durations(text, seconds):
    assert keys.parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0d", "-1d", "5y", "d", "1.5h", "999999999w", "36501d"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        keys.parse_duration(text)
