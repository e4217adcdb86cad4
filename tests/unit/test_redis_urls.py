"""A Redis URL that redis-py would read as something else is refused in one line naming the
option (issue #14, item 3: ``redis:/typo`` used to become localhost:6379)."""

from __future__ import annotations

import pytest

from chargepath.settings import Settings
from chargepath.store.connect import RedisSettingsError, RedisTarget, redacted


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost",
        "redis://127.0.0.1:6379",
        "redis://127.0.0.1:6379/",
        "redis://:pw@h:6379/0",
        "redis://user:pw@redis.internal:6380/15",
        "rediss://h:6379/0?ssl_ca_certs=%2Ftmp%2Fca.pem",
        "redis://[::1]:6379/0",
        "unix:///run/redis/redis.sock",
        "unix:///run/redis/redis.sock?db=2",
    ],
)
def test_a_well_formed_url_is_accepted(url: str) -> None:
    assert Settings.from_env({}, redis_url=url).redis_target().url == url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis:/typo", "'redis:/typo' is not a Redis URL"),
        ("redis:typo", "'redis:typo' is not a Redis URL"),
        ("localhost:6379", "'localhost:6379' is not a Redis URL"),
        ("http://h:6379", "'http://h:6379' is not a Redis URL"),
        ("redis://", "'redis://' names no host"),
        ("redis://:6379/0", "names no host"),
        ("redis://h:port/0", "'redis://h:port/0': the port is not a number in 1..65535"),
        ("redis://h:0/0", "the port is not a number in 1..65535"),
        ("redis://h:6379/zero", "the database '/zero' is not a number"),
        ("unix://", "'unix://' names no socket path"),
        ("redis://h:6379/0?db=x", "Invalid value for 'db'"),
    ],
)
def test_a_malformed_url_is_refused_naming_the_option(url: str, says: str) -> None:
    with pytest.raises(RedisSettingsError) as e:
        Settings.from_env({}, redis_url=url)
    message = str(e.value)
    assert message.startswith("--redis-url: ") and says in message
    assert "\n" not in message


def test_a_refusal_never_shows_the_password() -> None:
    with pytest.raises(RedisSettingsError) as e:
        RedisTarget(url="redis://user:s3cret@h:port/0").validate()
    assert "s3cret" not in str(e.value) and "redis://***@h:port/0" in str(e.value)
    # even when the URL is too malformed to have a scheme
    assert redacted("user:s3cret@h") == "***@h"


def test_the_environment_variable_is_checked_too() -> None:
    with pytest.raises(RedisSettingsError, match=r"^--redis-url: 'redis:/typo'"):
        Settings.from_env({"CHARGEPATH_REDIS_URL": "redis:/typo"})
