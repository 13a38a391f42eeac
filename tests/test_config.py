"""
Tests for L{userli_postfix.config}: the daemon must read the Go program's
environment unchanged, and refuse a bad one at start-up with a message that
names the variable at fault.
"""

from __future__ import annotations

import os
import socket

from twisted.internet.endpoints import _SystemdParser
from twisted.python.systemd import ListenFDs
from twisted.trial.unittest import SynchronousTestCase

from tests.doubles import configFrom
from userli_postfix import config as config_module
from userli_postfix.config import (
    LISTENERS,
    SETTINGS,
    Config,
    ConfigError,
    RedisTarget,
    listen_endpoint,
    parse_base_url,
    parse_duration,
    parse_redis_url,
)

TOKEN = {"USERLI_TOKEN": "secret-token"}


def _canBindIPv6() -> bool:
    """Whether an IPv6 socket can be bound here, asked without the code under test."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::", 0))
    except OSError:
        return False
    return True


class ParseDurationTests(SynchronousTestCase):
    """Go's C{time.ParseDuration} syntax, as the Go program read C{LOOKUP_CACHE_TTL}."""

    def test_valid(self) -> None:
        """Each Go duration spelling an operator may have used gives its seconds."""
        table = [
            ("300s", 300.0),
            ("5m", 300.0),
            ("1h30m", 5400.0),
            ("1.5h", 5400.0),
            ("0", 0.0),
            ("0s", 0.0),
            ("300ms", 0.3),
            ("1500us", 0.0015),
            ("1500\u00b5s", 0.0015),
            ("2000000ns", 0.002),
            ("1h1m1s", 3661.0),
            (".5s", 0.5),
            ("5.s", 5.0),
            ("+5m", 300.0),
            (" 5m ", 300.0),
        ]
        for text, seconds in table:
            self.assertAlmostEqual(parse_duration(text), seconds, msg=text)

    def test_negative(self) -> None:
        """A sign is part of Go's syntax: negatives parse (the caller refuses them)."""
        self.assertEqual(parse_duration("-5m"), -300.0)
        self.assertEqual(parse_duration("-1h30m"), -5400.0)
        self.assertEqual(parse_duration("-0"), 0.0)

    def test_invalid(self) -> None:
        """
        Garbage, bare numbers other than C{0}, unknown units and Python-only
        spellings are refused, like Go refuses them.
        """
        for text in [
            "",
            "   ",
            "5",
            "300",
            "1.5",
            "abc",
            "s",
            "-",
            "+",
            ".s",
            "1d",
            "1w",
            "5 m",
            "1h-30m",
            "1e3s",
            "5M",
            "inf",
            "nan",
            "0x10s",
        ]:
            self.assertRaises(ValueError, parse_duration, text)


class ListenEndpointTests(SynchronousTestCase):
    """
    Listen addresses: the Go forms become endpoint descriptions at the edge;
    descriptions pass through after Twisted has checked them.
    """

    def setUp(self) -> None:
        self.patch(config_module, "ipv6Available", lambda: True)

    def test_go_forms(self) -> None:
        """Every Go address form maps to the matching endpoint description."""
        table = [
            (":10001", "tcp6:10001:interface=\\:\\::backlog=4096"),
            ("127.0.0.1:10001", "tcp:10001:interface=127.0.0.1:backlog=4096"),
            ("0.0.0.0:25", "tcp:25:interface=0.0.0.0:backlog=4096"),
            ("localhost:10002", "tcp:10002:interface=localhost:backlog=4096"),
            ("[::1]:10001", "tcp6:10001:interface=\\:\\:1:backlog=4096"),
            ("[::]:10001", "tcp6:10001:interface=\\:\\::backlog=4096"),
            ("/path/x.sock", "unix:/path/x.sock:mode=666:lockfile=1:backlog=4096"),
            (
                "/var/spool/postfix/private/auth",
                "unix:/var/spool/postfix/private/auth:mode=666:lockfile=1:backlog=4096",
            ),
            ("x.sock", "unix:x.sock:mode=666:lockfile=1:backlog=4096"),
            (" :10001 ", "tcp6:10001:interface=\\:\\::backlog=4096"),
        ]
        for value, description in table:
            self.assertEqual(listen_endpoint("SOCKETMAP_LISTEN_ADDR", value), description, value)

    def test_every_address_without_ipv6(self) -> None:
        """
        On a host that cannot listen on IPv6, C{:PORT} is every IPv4 address
        (as Go falls back to); C{0.0.0.0:PORT} is IPv4 only either way.
        """
        self.patch(config_module, "ipv6Available", lambda: False)
        self.assertEqual(listen_endpoint("X", ":10001"), "tcp:10001:backlog=4096")
        self.assertEqual(
            listen_endpoint("X", "0.0.0.0:10001"), "tcp:10001:interface=0.0.0.0:backlog=4096"
        )

    def test_socket_path_escaped(self) -> None:
        """
        A colon or equals sign in a socket path is escaped, so the path is not
        read as endpoint parameters.
        """
        self.assertEqual(
            listen_endpoint("X", "/run/a:b=c.sock"),
            "unix:/run/a\\:b\\=c.sock:mode=666:lockfile=1:backlog=4096",
        )

    def test_descriptions_pass_through(self) -> None:
        """Twisted endpoint descriptions are used as given."""
        for description in [
            "tcp:10001:interface=127.0.0.1",
            "tcp6:10001:interface=\\:\\:1",
            "unix:/path:mode=660:lockfile=1",
            "unix:/run/userli/socketmap.sock",
        ]:
            self.assertEqual(listen_endpoint("X", description), description)

    def test_malformed(self) -> None:
        """Values that are none of the accepted forms are refused, naming the variable."""
        for value in [
            "",
            "   ",
            "foo",
            "10001",
            ":abc",
            ":",
            "[::1]",
            "::1:10001",
            "localhost:99999",
            ":65536",
            "host name:10001",
            "*:25",
            "tcp:abc",
            "tcp:10001:nosuchparameter=1",
            "unix:/x:mode=abc",
            "unix:",
            "unix::mode=660",
        ]:
            error = self.assertRaises(ConfigError, listen_endpoint, "POLICY_LISTEN_ADDR", value)
            self.assertEqual(error.variable, "POLICY_LISTEN_ADDR", value)
            self.assertTrue(str(error).startswith("POLICY_LISTEN_ADDR: "), value)

    def _passFileDescriptors(self, names: str) -> None:
        """
        Make the systemd endpoint parser see sockets handed over by a socket
        unit, as it would read them from C{LISTEN_PID}/C{LISTEN_FDS}.
        """
        count = len(names.split(":"))
        environ = {
            "LISTEN_PID": str(os.getpid()),
            "LISTEN_FDS": str(count),
            "LISTEN_FDNAMES": names,
        }
        self.patch(_SystemdParser, "_sddaemon", ListenFDs.fromEnvironment(environ))

    def test_systemd_with_passed_sockets(self) -> None:
        """A systemd description is accepted when the socket unit passed sockets in."""
        self._passFileDescriptors("socketmap:policy")
        self.assertEqual(
            listen_endpoint("SOCKETMAP_LISTEN_ADDR", "systemd:domain=INET:index=0"),
            "systemd:domain=INET:index=0",
        )
        self.assertEqual(
            listen_endpoint("POLICY_LISTEN_ADDR", "systemd:domain=INET:name=policy"),
            "systemd:domain=INET:name=policy",
        )

    def test_systemd_without_passed_sockets(self) -> None:
        """
        Without sockets from systemd the error says so, instead of Twisted's
        bare C{IndexError}, so the operator knows what is missing.
        """
        self.patch(_SystemdParser, "_sddaemon", ListenFDs.fromEnvironment({}))
        error = self.assertRaises(
            ConfigError, listen_endpoint, "SOCKETMAP_LISTEN_ADDR", "systemd:domain=INET:index=0"
        )
        self.assertEqual(error.variable, "SOCKETMAP_LISTEN_ADDR")
        self.assertIn("systemd", str(error))
        self.assertIn("LISTEN_FDS", str(error))

    def test_systemd_index_beyond_passed_sockets(self) -> None:
        """An index past the sockets that were passed in is the same clear error."""
        self._passFileDescriptors("socketmap")
        error = self.assertRaises(
            ConfigError, listen_endpoint, "POLICY_LISTEN_ADDR", "systemd:domain=INET:index=1"
        )
        self.assertEqual(error.variable, "POLICY_LISTEN_ADDR")
        self.assertIn("LISTEN_FDS", str(error))


class ListenersTableTests(SynchronousTestCase):
    """L{LISTENERS}: the one table of the daemon's listeners."""

    def test_every_listen_setting(self) -> None:
        """Every listen address setting has its listener, and no listener lacks its setting."""
        variables = [s.variable for s in SETTINGS if s.variable.endswith("_LISTEN_ADDR")]
        self.assertEqual(sorted(listener.variable for listener in LISTENERS), sorted(variables))

    def test_endpoints(self) -> None:
        """
        Each listener's endpoint is read from its own setting; SASL alone
        is off without an address, the others are an error naming theirs.
        """
        environ = {
            **TOKEN,
            "SOCKETMAP_LISTEN_ADDR": "127.0.0.1:1",
            "POLICY_LISTEN_ADDR": "127.0.0.1:2",
            "METRICS_LISTEN_ADDR": "127.0.0.1:3",
            "SASL_LISTEN_ADDR": "127.0.0.1:4",
        }
        config = configFrom(environ)
        ports = {listener.name: config.endpoint(listener) for listener in LISTENERS}
        self.assertEqual(
            ports,
            {
                name: f"tcp:{port}:interface=127.0.0.1:backlog=4096"
                for name, port in (("socketmap", 1), ("policy", 2), ("http", 3), ("sasl", 4))
            },
        )
        self.assertIsNone(configFrom({**environ, "SASL_LISTEN_ADDR": " "}).sasl_listen)
        for listener in LISTENERS:
            if listener.optional:
                continue
            with self.assertRaises(ConfigError) as caught:
                configFrom({**environ, listener.variable: " "})
            self.assertEqual(caught.exception.variable, listener.variable)

    def test_postfix_listeners(self) -> None:
        """Postfix (and so every worker process) is served by all but the HTTP listener."""
        self.assertEqual(
            [listener.name for listener in LISTENERS if listener.postfix],
            ["socketmap", "policy", "sasl"],
        )
        self.assertEqual(Config(userli_token="t").endpoint(LISTENERS[2]), "tcp:10002")


class IPv6ProbeTests(SynchronousTestCase):
    """L{config_module.ipv6Available}: whether C{:PORT} can include IPv6 here."""

    def test_ipv6_probe(self) -> None:
        """The probe answers whether an IPv6 socket can be bound here, and no without IPv6."""
        self.assertEqual(config_module.ipv6Available(), _canBindIPv6())
        self.patch(socket, "has_ipv6", False)
        self.assertFalse(config_module.ipv6Available())


class RedisURLTests(SynchronousTestCase):
    """C{REDIS_URL} in go-redis's forms."""

    def test_forms(self) -> None:
        """Host, port, database, credentials, TLS and UNIX sockets are all understood."""
        table = [
            ("redis://localhost:6379/0", RedisTarget()),
            ("redis://redis", RedisTarget(host="redis")),
            ("redis://redis:6380/2", RedisTarget(host="redis", port=6380, db=2)),
            ("redis://:secret@redis/1", RedisTarget(host="redis", db=1, password="secret")),
            (
                "redis://user:p%40ss@redis:6390/3",
                RedisTarget(host="redis", port=6390, db=3, username="user", password="p@ss"),
            ),
            ("redis://user@redis", RedisTarget(host="redis", username="user")),
            ("redis://redis?db=5", RedisTarget(host="redis", db=5)),
            ("redis://[::1]:6379/1", RedisTarget(host="::1", db=1)),
            ("rediss://redis:6390", RedisTarget(host="redis", port=6390, tls=True)),
            (
                "rediss://:pw@redis/4",
                RedisTarget(host="redis", db=4, password="pw", tls=True),
            ),
            ("unix:///run/redis/redis.sock", RedisTarget(path="/run/redis/redis.sock")),
            ("unix:///run/redis/redis.sock?db=4", RedisTarget(path="/run/redis/redis.sock", db=4)),
        ]
        for url, target in table:
            self.assertEqual(parse_redis_url("REDIS_URL", url), target, url)

    def test_invalid(self) -> None:
        """Unusable URLs are refused naming C{REDIS_URL}."""
        for url in [
            "http://redis",
            "localhost:6379",
            "redis://",
            "redis://redis:99999",
            "redis://redis:port",
            "redis://redis/abc",
            "redis://redis/-1",
            "unix://",
            "unix:///run/redis.sock?db=x",
        ]:
            error = self.assertRaises(ConfigError, parse_redis_url, "REDIS_URL", url)
            self.assertEqual(error.variable, "REDIS_URL", url)

    def test_password_not_shown(self) -> None:
        """The password appears neither in the target's repr nor in error messages."""
        target = parse_redis_url("REDIS_URL", "redis://user:hunter2@redis/1")
        self.assertNotIn("hunter2", repr(target))
        for url in ["redis://:hunter2@redis/abc", "redis://:hunter2@redis:port/1"]:
            error = self.assertRaises(ConfigError, parse_redis_url, "REDIS_URL", url)
            self.assertNotIn("hunter2", str(error))


class SentinelTests(SynchronousTestCase):
    """Redis through Sentinel: C{REDIS_SENTINEL_ADDRS} and its companions."""

    def test_sentinels(self) -> None:
        """The Sentinel addresses (IPv6 in brackets) and the master name are read."""
        config = configFrom(
            {
                **TOKEN,
                "REDIS_SENTINEL_ADDRS": "s1:26379, [::1]:26380,",
                "REDIS_SENTINEL_MASTER": "m",
            }
        )
        assert config.redis is not None
        self.assertEqual(config.redis.sentinels, (("s1", 26379), ("::1", 26380)))
        self.assertEqual(config.redis.master_name, "m")
        self.assertIsNone(config.redis.sentinel_password)

    def test_default_master(self) -> None:
        """Without a master name, Sentinel's conventional C{mymaster} is used."""
        config = configFrom({**TOKEN, "REDIS_SENTINEL_ADDRS": "s1:26379"})
        assert config.redis is not None
        self.assertEqual(config.redis.master_name, "mymaster")

    def test_url_contributes_credentials(self) -> None:
        """With Sentinels, C{REDIS_URL} still gives the password, user and database."""
        config = configFrom(
            {
                **TOKEN,
                "REDIS_URL": "redis://user:pw@ignored:6379/3",
                "REDIS_SENTINEL_ADDRS": "s1:26379",
                "REDIS_SENTINEL_PASSWORD": "sentinel-pw",
            }
        )
        assert config.redis is not None
        self.assertEqual(
            (config.redis.username, config.redis.password, config.redis.db), ("user", "pw", 3)
        )
        self.assertEqual(config.redis.sentinel_password, "sentinel-pw")
        self.assertNotIn("sentinel-pw", repr(config))

    def test_invalid(self) -> None:
        """Unusable Sentinel settings are refused naming their variable."""
        table = [
            ({"REDIS_SENTINEL_ADDRS": "s1"}, "REDIS_SENTINEL_ADDRS"),
            ({"REDIS_SENTINEL_ADDRS": ",,"}, "REDIS_SENTINEL_ADDRS"),
            ({"REDIS_SENTINEL_ADDRS": ":26379"}, "REDIS_SENTINEL_ADDRS"),
            ({"REDIS_SENTINEL_ADDRS": "s1:0"}, "REDIS_SENTINEL_ADDRS"),
            ({"REDIS_SENTINEL_ADDRS": "s1:70000"}, "REDIS_SENTINEL_ADDRS"),
            (
                {"REDIS_SENTINEL_ADDRS": "s1:26379", "REDIS_SENTINEL_MASTER": " "},
                "REDIS_SENTINEL_MASTER",
            ),
        ]
        for values, variable in table:
            error = self.assertRaises(ConfigError, configFrom, {**TOKEN, **values})
            self.assertEqual(error.variable, variable, values)

    def test_off_without_addresses(self) -> None:
        """Sentinel settings without addresses change nothing."""
        config = configFrom({**TOKEN, "REDIS_SENTINEL_MASTER": "m", "REDIS_SENTINEL_PASSWORD": "x"})
        self.assertIsNone(config.redis)


class BaseURLTests(SynchronousTestCase):
    """C{USERLI_BASE_URL} must be an absolute http(s) URL."""

    def test_valid(self) -> None:
        """http and https URLs are accepted; a trailing slash is dropped."""
        table = [
            ("http://localhost:8000", "http://localhost:8000"),
            ("https://userli.example.org/", "https://userli.example.org"),
            ("https://example.org/userli/", "https://example.org/userli"),
            ("  http://userli  ", "http://userli"),
        ]
        for url, expected in table:
            self.assertEqual(parse_base_url("USERLI_BASE_URL", url), expected)

    def test_invalid(self) -> None:
        """Other schemes, host-less URLs, queries, fragments and bad ports are refused."""
        for url in [
            "",
            "localhost:8000",
            "ftp://userli",
            "http://",
            "http:///path",
            "http://userli?x=1",
            "http://userli#top",
            "http://userli:99999",
            "http://userli:port",
        ]:
            error = self.assertRaises(ConfigError, parse_base_url, "USERLI_BASE_URL", url)
            self.assertEqual(error.variable, "USERLI_BASE_URL", url)


class ConfigTests(SynchronousTestCase):
    """The whole configuration, from the environment and twistd options."""

    def test_defaults(self) -> None:
        """With only the token set, every value is the Go program's default."""
        config = configFrom(TOKEN)
        self.assertEqual(config.userli_token, "secret-token")
        self.assertEqual(config.userli_base_url, "http://localhost:8000")
        self.assertEqual(config.recipient_delimiter, "")
        self.assertEqual(config.socketmap_listen, listen_endpoint("X", ":10001"))
        self.assertEqual(config.policy_listen, listen_endpoint("X", ":10003"))
        self.assertEqual(config.metrics_listen, listen_endpoint("X", ":10002"))
        self.assertIsNone(config.sasl_listen)
        self.assertEqual(config.rate_limit_message, "Rate limit exceeded, please try again later")
        self.assertIsNone(config.redis)
        self.assertEqual(config.lookup_cache_ttl, 300.0)
        self.assertEqual(config.remote_domain_cache_ttl, 60.0)
        self.assertEqual(config.quota_cache_ttl, 0.0)
        self.assertEqual(config.sasl_failure_delay, 2.0)
        self.assertEqual(config.log_level, "info")
        self.assertEqual(config.log_format, "text")

    def test_settings_defaults(self) -> None:
        """The Go program's variables have its documented defaults in L{SETTINGS}."""
        defaults = {s.variable: s.default for s in SETTINGS}
        go = {
            "USERLI_TOKEN": None,
            "USERLI_BASE_URL": "http://localhost:8000",
            "POSTFIX_RECIPIENT_DELIMITER": "",
            "SOCKETMAP_LISTEN_ADDR": ":10001",
            "POLICY_LISTEN_ADDR": ":10003",
            "METRICS_LISTEN_ADDR": ":10002",
            "SASL_LISTEN_ADDR": "",
            "RATE_LIMIT_MESSAGE": "Rate limit exceeded, please try again later",
            "REDIS_URL": "",
            "LOOKUP_CACHE_TTL": "300s",
            "LOG_LEVEL": "info",
        }
        self.assertEqual({k: defaults.get(k, "missing") for k in go}, go)
        self.assertEqual(defaults["QUOTA_CACHE_TTL"], "0")
        self.assertEqual(defaults["REMOTE_DOMAIN_CACHE_TTL"], "60s")
        self.assertEqual(defaults["SASL_FAILURE_DELAY"], "2s")
        self.assertEqual(defaults["LOG_FORMAT"], "text")

    def test_settings_unique(self) -> None:
        """Each variable and each option name appears once, and each has help text."""
        self.assertEqual(len({s.variable for s in SETTINGS}), len(SETTINGS))
        self.assertEqual(len({s.option for s in SETTINGS}), len(SETTINGS))
        for setting in SETTINGS:
            self.assertTrue(setting.help, setting.variable)

    def test_environment(self) -> None:
        """Every variable is read from the environment."""
        config = configFrom(
            {
                "USERLI_TOKEN": " tok ",
                "USERLI_BASE_URL": "https://userli.example.org/",
                "POSTFIX_RECIPIENT_DELIMITER": "+",
                "SOCKETMAP_LISTEN_ADDR": "127.0.0.1:20001",
                "POLICY_LISTEN_ADDR": "[::1]:20003",
                "METRICS_LISTEN_ADDR": "tcp:20002",
                "SASL_LISTEN_ADDR": "/var/spool/postfix/private/auth",
                "RATE_LIMIT_MESSAGE": "Slow down",
                "REDIS_URL": "redis://redis:6379/1",
                "LOOKUP_CACHE_TTL": "5m",
                "QUOTA_CACHE_TTL": "0",
                "SASL_FAILURE_DELAY": "500ms",
                "LOG_LEVEL": "DEBUG",
                "LOG_FORMAT": "JSON",
            }
        )
        self.assertEqual(config.userli_token, "tok")
        self.assertEqual(config.userli_base_url, "https://userli.example.org")
        self.assertEqual(config.recipient_delimiter, "+")
        self.assertEqual(config.socketmap_listen, "tcp:20001:interface=127.0.0.1:backlog=4096")
        self.assertEqual(config.policy_listen, "tcp6:20003:interface=\\:\\:1:backlog=4096")
        self.assertEqual(config.metrics_listen, "tcp:20002")
        self.assertEqual(
            config.sasl_listen,
            "unix:/var/spool/postfix/private/auth:mode=666:lockfile=1:backlog=4096",
        )
        self.assertEqual(config.rate_limit_message, "Slow down")
        self.assertEqual(config.redis, RedisTarget(host="redis", db=1))
        self.assertEqual(config.lookup_cache_ttl, 300.0)
        self.assertEqual(config.quota_cache_ttl, 0.0)
        self.assertEqual(config.sasl_failure_delay, 0.5)
        self.assertEqual(config.log_level, "debug")
        self.assertEqual(config.log_format, "json")

    def test_options_over_environment(self) -> None:
        """A twistd option wins over the variable; an option left unset does not."""
        environ = {
            **TOKEN,
            "LOOKUP_CACHE_TTL": "5m",
            "LOG_LEVEL": "error",
            "REDIS_URL": "redis://redis",
        }
        options: dict[str, str | None] = {
            "lookup-cache-ttl": "1h",
            "log-level": None,
            "userli-token": "from-option",
        }
        config = configFrom(environ, options)
        self.assertEqual(config.lookup_cache_ttl, 3600.0)
        self.assertEqual(config.log_level, "error")
        self.assertEqual(config.userli_token, "from-option")
        self.assertEqual(config.redis, RedisTarget(host="redis"))

    def test_empty_option_overrides(self) -> None:
        """
        An option given as an empty string is a choice (e.g. no Redis), not
        an absent option.
        """
        config = configFrom({**TOKEN, "REDIS_URL": "redis://redis"}, {"redis-url": ""})
        self.assertIsNone(config.redis)

    def test_every_option_is_read(self) -> None:
        """
        Every setting can be given as an option alone, with the same effect as
        its variable.
        """
        values = {
            "USERLI_TOKEN": "tok",
            "USERLI_BASE_URL": "https://userli.example.org",
            "POSTFIX_RECIPIENT_DELIMITER": "+",
            "SOCKETMAP_LISTEN_ADDR": ":20001",
            "POLICY_LISTEN_ADDR": ":20003",
            "METRICS_LISTEN_ADDR": ":20002",
            "SASL_LISTEN_ADDR": ":20006",
            "RATE_LIMIT_MESSAGE": "Slow down",
            "RATE_LIMIT_ACTION": "DEFER",
            "RATE_LIMIT_IDENTITY": "sasl",
            "REDIS_URL": "redis://redis/2",
            "LOOKUP_CACHE_TTL": "1m",
            "QUOTA_CACHE_TTL": "2m",
            "SASL_FAILURE_DELAY": "3s",
            "LOG_LEVEL": "debug",
            "LOG_FORMAT": "json",
        }
        options: dict[str, str | None] = {
            s.option: values.get(s.variable, s.default) for s in SETTINGS
        }
        environ = {s.variable: values[s.variable] for s in SETTINGS if s.variable in values}
        self.assertEqual(len(environ), len(values))
        fromOptions = configFrom({}, options)
        self.assertEqual(fromOptions, configFrom(environ))
        self.assertNotEqual(fromOptions, configFrom(TOKEN))

    def test_log_level_aliases(self) -> None:
        """Levels are case-insensitive, and Go's C{warning} spelling means C{warn}."""
        for value, level in [
            ("WARN", "warn"),
            ("warning", "warn"),
            ("Error", "error"),
            ("", "info"),
        ]:
            config = configFrom({**TOKEN, "LOG_LEVEL": value})
            self.assertEqual(config.log_level, level)

    def test_multi_character_delimiter(self) -> None:
        """Postfix allows several delimiter characters; they are kept as given."""
        config = configFrom({**TOKEN, "POSTFIX_RECIPIENT_DELIMITER": "+-"})
        self.assertEqual(config.recipient_delimiter, "+-")

    def test_rate_limit_message_one_line(self) -> None:
        """
        The rate-limit text becomes part of a one-line policy reply: line breaks
        collapse to spaces, and an empty text falls back to the default.
        """
        config = configFrom({**TOKEN, "RATE_LIMIT_MESSAGE": "Too many\r\nmails\t today "})
        self.assertEqual(config.rate_limit_message, "Too many mails today")
        config = configFrom({**TOKEN, "RATE_LIMIT_MESSAGE": " \n "})
        self.assertEqual(config.rate_limit_message, "Rate limit exceeded, please try again later")

    def test_rate_limit_action(self) -> None:
        """
        C{RATE_LIMIT_ACTION} is REJECT by default (the Go program's only
        answer) and takes each access(5) action the policy may give, in any
        case.
        """
        self.assertEqual(configFrom(TOKEN).rate_limit_action, "REJECT")
        for value, action in [
            ("REJECT", "REJECT"),
            ("defer", "DEFER"),
            (" Defer_If_Permit ", "DEFER_IF_PERMIT"),
            ("HOLD", "HOLD"),
            ("warn", "WARN"),
            ("", "REJECT"),
        ]:
            config = configFrom({**TOKEN, "RATE_LIMIT_ACTION": value})
            self.assertEqual(config.rate_limit_action, action, value)
        self.assertEqual({s.variable: s.default for s in SETTINGS}["RATE_LIMIT_ACTION"], "REJECT")

    def test_rate_limit_identity(self) -> None:
        """
        C{RATE_LIMIT_IDENTITY} is C{sasl_or_sender} by default (the Go
        program's rule) and may be C{sasl}.
        """
        self.assertEqual(configFrom(TOKEN).rate_limit_identity, "sasl_or_sender")
        for value, identity in [("SASL", "sasl"), ("sasl_or_sender", "sasl_or_sender")]:
            config = configFrom({**TOKEN, "RATE_LIMIT_IDENTITY": value})
            self.assertEqual(config.rate_limit_identity, identity)

    def test_zero_ttl(self) -> None:
        """C{LOOKUP_CACHE_TTL=0} is allowed: it turns the cache off."""
        config = configFrom({**TOKEN, "LOOKUP_CACHE_TTL": "0"})
        self.assertEqual(config.lookup_cache_ttl, 0.0)

    def test_remote_domain_ttl(self) -> None:
        """C{REMOTE_DOMAIN_CACHE_TTL} is a Go duration; C{0} turns the memory off."""
        for value, seconds in [("0", 0.0), ("90s", 90.0), ("1h30m", 5400.0), ("1.5m", 90.0)]:
            config = configFrom({**TOKEN, "REMOTE_DOMAIN_CACHE_TTL": value})
            self.assertEqual(config.remote_domain_cache_ttl, seconds, value)

    def test_empty_sasl_is_off(self) -> None:
        """An empty or blank C{SASL_LISTEN_ADDR} leaves the SASL listener off."""
        for value in ["", "  "]:
            config = configFrom({**TOKEN, "SASL_LISTEN_ADDR": value})
            self.assertIsNone(config.sasl_listen)

    def test_errors_name_their_variable(self) -> None:
        """Every bad value raises a L{ConfigError} that names its variable first."""
        table = [
            ("USERLI_TOKEN", ""),
            ("USERLI_TOKEN", "   "),
            ("USERLI_BASE_URL", "userli:8000"),
            ("POSTFIX_RECIPIENT_DELIMITER", "@"),
            ("POSTFIX_RECIPIENT_DELIMITER", "+@"),
            ("POSTFIX_RECIPIENT_DELIMITER", " "),
            ("SOCKETMAP_LISTEN_ADDR", "nonsense"),
            ("POLICY_LISTEN_ADDR", ":99999"),
            ("METRICS_LISTEN_ADDR", "tcp:x"),
            ("SASL_LISTEN_ADDR", "auth"),
            ("REDIS_URL", "memcached://x"),
            ("LOOKUP_CACHE_TTL", "-5m"),
            ("LOOKUP_CACHE_TTL", "300"),
            ("LOOKUP_CACHE_TTL", "five minutes"),
            ("REMOTE_DOMAIN_CACHE_TTL", "-1s"),
            ("REMOTE_DOMAIN_CACHE_TTL", "60"),
            ("REMOTE_DOMAIN_CACHE_TTL", "a minute"),
            ("QUOTA_CACHE_TTL", "-1s"),
            ("QUOTA_CACHE_TTL", "30"),
            ("SASL_FAILURE_DELAY", "-2s"),
            ("SASL_FAILURE_DELAY", "2"),
            ("LOG_LEVEL", "verbose"),
            ("LOG_FORMAT", "xml"),
            ("RATE_LIMIT_ACTION", "DISCARD"),
            ("RATE_LIMIT_ACTION", "REJECT 554"),
            ("RATE_LIMIT_IDENTITY", "sender"),
        ]
        for variable, value in table:
            environ = {**TOKEN, variable: value}
            error = self.assertRaises(ConfigError, configFrom, environ)
            self.assertEqual(error.variable, variable, f"{variable}={value!r}")
            self.assertTrue(str(error).startswith(f"{variable}: "), str(error))

    def test_unicode_digits_and_control_characters(self) -> None:
        """
        C{str.isdigit} and C{int} traps: a Unicode digit (superscript, other
        scripts, full-width) where a number belongs, a line break or another
        control character inside a value, or a duration too long to be a
        number, is one L{ConfigError} naming the variable, never another
        exception (which twistd would print as a traceback).
        """
        table = [
            ("WORKERS", "\u00b2"),
            ("WORKERS", "1\u00b2"),
            ("WORKERS", "\u0661"),
            ("WORKERS", "\uff12"),
            ("WORKERS", "2\n3"),
            ("REDIS_URL", "redis://redis/\u00b2"),
            ("REDIS_URL", "redis://redis/\u0661"),
            ("REDIS_URL", "redis://redis?db=\uff13"),
            ("REDIS_URL", "unix:///run/redis.sock?db=\u00b2"),
            ("REDIS_URL", "redis://redis:\u00b2/0"),
            ("REDIS_URL", "redis://redis:\u0666\u0663\u0667\u0669/0"),
            ("REDIS_URL", "redis://redis:\uff16\uff13\uff17\uff19/0"),
            ("REDIS_URL", "redis://re\x01dis:6379/0"),
            ("REDIS_SENTINEL_ADDRS", "s1:\u00b2"),
            ("REDIS_SENTINEL_ADDRS", "s1:\u0662\u0666\u0663\u0667\u0669"),
            ("REDIS_SENTINEL_ADDRS", "s\x1b1:26379"),
            ("SOCKETMAP_LISTEN_ADDR", ":\u0661\u0660\u0660\u0660\u0661"),
            ("POLICY_LISTEN_ADDR", "localhost\n:10003"),
            ("SASL_LISTEN_ADDR", "127.0.0.1:\u00b2"),
            ("LOOKUP_CACHE_TTL", "\u00b2s"),
            ("LOOKUP_CACHE_TTL", "9" * 400 + "h"),
            ("SASL_FAILURE_DELAY", "\u0662s"),
            ("USERLI_TOKEN", "tok\nen"),
            ("USERLI_TOKEN", "t\u00f6ken"),
            ("USERLI_BASE_URL", "http://userli\x00:8000"),
            ("POSTFIX_RECIPIENT_DELIMITER", "\x00"),
            ("POSTFIX_RECIPIENT_DELIMITER", "+\u200b"),
        ]
        for variable, value in table:
            environ = {**TOKEN, "REDIS_URL": "redis://redis", variable: value}
            error = self.assertRaises(ConfigError, configFrom, environ)
            self.assertEqual(error.variable, variable, f"{variable}={value!r}")

    def test_rate_limit_message_control_characters(self) -> None:
        """Control characters in the reject text become spaces: the reply stays one line."""
        config = configFrom({**TOKEN, "RATE_LIMIT_MESSAGE": "Too\x07 many\x1b[0m mails"})
        self.assertEqual(config.rate_limit_message, "Too many [0m mails")

    def test_token_required(self) -> None:
        """Without C{USERLI_TOKEN} the daemon refuses to start, as the Go program does."""
        error = self.assertRaises(ConfigError, configFrom, {})
        self.assertEqual(error.variable, "USERLI_TOKEN")

    def test_secrets_not_in_repr(self) -> None:
        """Neither the API token nor the Redis password shows in the configuration's repr."""
        config = configFrom({"USERLI_TOKEN": "tok-12345", "REDIS_URL": "redis://:pw-67890@redis/0"})
        self.assertNotIn("tok-12345", repr(config))
        self.assertNotIn("pw-67890", repr(config))

    def test_frozen(self) -> None:
        """The configuration cannot be changed once built."""
        config = configFrom(TOKEN)
        self.assertRaises(AttributeError, setattr, config, "lookup_cache_ttl", 1.0)


class TLSPolicySettingsTests(SynchronousTestCase):
    """The C{TLS_POLICY_*} settings of the C{tls_policy} map."""

    def test_defaults(self) -> None:
        """
        The Go branch's lifetimes and port; no name servers (resolv.conf);
        EHLO with this host's fully qualified name, not C{localhost}.
        """
        self.patch(config_module.socket, "getfqdn", lambda: "mail.example.org")
        config = configFrom(TOKEN)
        self.assertEqual(config.tls_policy_cache_ttl_tls, 168 * 3600.0)
        self.assertEqual(config.tls_policy_cache_ttl_notls, 24 * 3600.0)
        self.assertEqual(config.tls_policy_smtp_port, 25)
        self.assertEqual(config.tls_policy_nameservers, ())
        self.assertEqual(config.tls_policy_ehlo_hostname, "mail.example.org")

    def test_unusableHostName(self) -> None:
        """A host name that cannot go into EHLO falls back to C{localhost}."""
        self.patch(config_module.socket, "getfqdn", lambda: "bad_name.example")
        self.assertEqual(configFrom(TOKEN).tls_policy_ehlo_hostname, "localhost")

    def test_values(self) -> None:
        """Each variable is read, from the environment or as an option."""
        environ = {
            **TOKEN,
            "TLS_POLICY_NAMESERVERS": "127.0.0.1:5353, 192.0.2.53:53",
            "TLS_POLICY_SMTP_PORT": "2525",
            "TLS_POLICY_EHLO_HOSTNAME": "probe.example.net",
            "TLS_POLICY_CACHE_TTL_TLS": "1h",
            "TLS_POLICY_CACHE_TTL_NOTLS": "10m",
        }
        config = configFrom(environ)
        self.assertEqual(config.tls_policy_nameservers, (("127.0.0.1", 5353), ("192.0.2.53", 53)))
        self.assertEqual(config.tls_policy_smtp_port, 2525)
        self.assertEqual(config.tls_policy_ehlo_hostname, "probe.example.net")
        self.assertEqual(config.tls_policy_cache_ttl_tls, 3600.0)
        self.assertEqual(config.tls_policy_cache_ttl_notls, 600.0)
        options = {s.option: environ[s.variable] for s in SETTINGS if s.variable in environ}
        self.assertEqual(configFrom({}, options), config)

    def test_errors(self) -> None:
        """Every bad value is refused naming its variable."""
        table = [
            ("TLS_POLICY_NAMESERVERS", "127.0.0.1"),
            ("TLS_POLICY_NAMESERVERS", "dns.example:53"),
            ("TLS_POLICY_NAMESERVERS", "127.0.0.1:0"),
            ("TLS_POLICY_NAMESERVERS", "127.0.0.1:70000"),
            ("TLS_POLICY_NAMESERVERS", "[::1]:53"),
            ("TLS_POLICY_SMTP_PORT", "0"),
            ("TLS_POLICY_SMTP_PORT", "smtp"),
            ("TLS_POLICY_SMTP_PORT", "65536"),
            ("TLS_POLICY_EHLO_HOSTNAME", "probe example"),
            ("TLS_POLICY_EHLO_HOSTNAME", "probe\r\nMAIL FROM:<x>"),
            ("TLS_POLICY_EHLO_HOSTNAME", "-probe.example"),
            ("TLS_POLICY_CACHE_TTL_TLS", "0"),
            ("TLS_POLICY_CACHE_TTL_TLS", "168"),
            ("TLS_POLICY_CACHE_TTL_NOTLS", "-1h"),
            ("TLS_POLICY_CACHE_TTL_NOTLS", "a day"),
        ]
        for variable, value in table:
            error = self.assertRaises(ConfigError, configFrom, {**TOKEN, variable: value})
            self.assertEqual(error.variable, variable, f"{variable}={value!r}")
