"""Where Redis is, from settings and flags: Sentinel, cluster and WAIT options are validated
with one-line errors that name the option."""

from __future__ import annotations

import pytest

from chargepath.cli import main
from chargepath.settings import Settings
from chargepath.store.connect import RedisSettingsError, RedisTarget, parse_sentinels


def test_sentinels_parse_as_host_port_pairs() -> None:
    assert parse_sentinels("10.0.0.1:26379, sentinel-b:26380,[::1]:26381") == (
        ("10.0.0.1", 26379),
        ("sentinel-b", 26380),
        ("::1", 26381),
    )


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("sentinel-a", "'sentinel-a' is not host:port"),
        ("a:26379,", "'' is not host:port"),
        ("a:port", "'a:port' is not host:port"),
        (":26379", "':26379' is not host:port"),
        ("a:0", "port 0 of 'a:0' is not in 1..65535"),
        ("a:70000", "port 70000 of 'a:70000' is not in 1..65535"),
    ],
)
def test_a_malformed_sentinel_names_the_option(text: str, says: str) -> None:
    with pytest.raises(RedisSettingsError) as e:
        Settings.from_env({}, redis_sentinel=text, redis_master="m")
    assert str(e.value).startswith("--redis-sentinel: ") and says in str(e.value)
    assert "\n" not in str(e.value)


def test_sentinel_settings_come_from_the_environment() -> None:
    s = Settings.from_env(
        {
            "CHARGEPATH_REDIS_SENTINEL": "s1:26379,s2:26379",
            "CHARGEPATH_REDIS_MASTER": "billing",
            "CHARGEPATH_REDIS_SENTINEL_PASSWORD": "sentinel-secret",
            "CHARGEPATH_REDIS_PASSWORD": "master-secret",
            "CHARGEPATH_REDIS_WAIT_REPLICAS": "1",
            "CHARGEPATH_REDIS_WAIT_TIMEOUT_MS": "30",
        }
    )
    target = s.redis_target()
    assert target.sentinels == (("s1", 26379), ("s2", 26379)) and target.master == "billing"
    assert (target.password, target.sentinel_password) == ("master-secret", "sentinel-secret")
    assert not target.embedded
    assert (s.redis_wait_replicas, s.redis_wait_timeout_ms) == (1, 30)
    assert "secret" not in target.describe()
    assert target.describe() == "master 'billing' of the sentinels s1:26379,s2:26379"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"redis_sentinel": "s:1"}, "--redis-master: the master's name is required"),
        ({"redis_master": "m"}, "--redis-master: needs --redis-sentinel"),
        (
            {"redis_sentinel": "s:1", "redis_master": "m", "redis_url": "redis://r"},
            "--redis-url: give either --redis-url or --redis-sentinel, not both",
        ),
        (
            {"redis_sentinel": "s:1", "redis_master": "m", "redis_cluster": True},
            "--redis-cluster: Redis Cluster has no sentinels",
        ),
        ({"redis_cluster": True}, "--redis-cluster: needs --redis-url"),
        ({"redis_wait_replicas": -1}, "--redis-wait-replicas: -1 is negative"),
        (
            {"redis_wait_replicas": 1, "redis_url": "redis://r", "redis_cluster": True},
            "--redis-wait-replicas: not supported with --redis-cluster",
        ),
        ({"redis_wait_replicas": 1, "redis_wait_timeout_ms": 0}, "--redis-wait-timeout-ms: 0"),
        (
            {"redis_wait_replicas": 1, "redis_wait_timeout_ms": 50},
            "--redis-wait-timeout-ms: 50 must be between 1 and --store-timeout-ms (50) - 1",
        ),
    ],
)
def test_inconsistent_redis_options_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as e:
        Settings.from_env({}, **overrides)
    assert str(e.value).startswith(message)


def test_defaults_mean_the_embedded_redis_and_no_wait() -> None:
    s = Settings.from_env({})
    assert s.redis_target() == RedisTarget() and s.redis_target().embedded
    assert s.redis_wait_replicas == 0
    assert RedisTarget(url="redis://:pw@h:6379/0").describe() == "redis://***@h:6379/0"


def test_serve_refuses_a_malformed_sentinel_flag_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["serve", "--redis-sentinel", "10.0.0.1", "--redis-master", "m"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        "chargepath: --redis-sentinel: '10.0.0.1' is not host:port "
        "(expected host:port,host:port,...)\n"
    )


def test_the_explain_window_defaults_to_the_dedup_window() -> None:
    assert Settings.from_env({}).explain_window_ms == 600_000
    assert Settings.from_env({}, dedup_window_s=60).explain_window_ms == 60_000
    s = Settings.from_env({"CHARGEPATH_EXPLAIN_WINDOW_S": "120"})
    assert s.explain_window_ms == 120_000 and s.problem() is None
    assert Settings.from_env({}, explain_window_s=0).explain_window_ms == 0


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (
            {"explain_window_s": 601},
            "--explain-window-s: 601 must be between 0 and --dedup-window-s (600)",
        ),
        (
            {"explain_window_s": 31, "dedup_window_s": 30},
            "--explain-window-s: 31 must be between 0 and --dedup-window-s (30)",
        ),
        ({"explain_window_s": -2}, "--explain-window-s: -2 must be between 0 and"),
    ],
)
def test_an_explain_window_above_the_dedup_window_is_refused(
    overrides: dict[str, int], says: str
) -> None:
    problem = Settings.from_env({}, **overrides).problem()
    assert problem is not None and problem.startswith(says) and "\n" not in problem


def test_serve_refuses_an_explain_window_above_the_dedup_window_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # refused before anything starts: no data dir, no Redis, no port
    assert main(["serve", "--dedup-window-s", "600", "--explain-window-s", "900"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chargepath: --explain-window-s: 900 must be between 0 and ")
    assert len(err.splitlines()) == 1
