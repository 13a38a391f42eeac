"""
Tests for L{userli_postfix.cli}: the command line, the output formats and
exit statuses, the Postfix lines, and the Userli check against the fake
Userli in memory (C{StubTreq}) with a fake clock.  The commands against a
real Redis and a running daemon are in C{tests/integration/test_cli.py}.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from tests.fake_userli import (
    ERROR,
    SLOW,
    TOKEN,
    TOKEN_WITHOUT_SCOPE,
    FakeUserli,
    FakeUserliResource,
    UserliData,
)
from userli_postfix import tlspolicy
from userli_postfix.cli import cliObserver, execute, run
from userli_postfix.cli.check import HIDDEN, check, shown_configuration, without_password
from userli_postfix.cli.commands import Tools
from userli_postfix.cli.options import parse
from userli_postfix.cli.postfix import postfix_address, postfix_lines, split_description
from userli_postfix.cli.report import NOT_OK, OK, USAGE, Report, duration, render
from userli_postfix.config import API_TIMEOUT, Config, raw_values
from userli_postfix.httpclient import POOL_IDLE_PER_HOST
from userli_postfix.smtpprobe import HostReport

BASE = "http://userli.test"


class ParseTests(SynchronousTestCase):
    """The command line."""

    def test_commands(self) -> None:
        """Each command parses into its words and arguments."""
        table = [
            (["check"], ("check",), "check"),
            (["lookup", "alias", "a@x"], ("lookup", "alias", "a@x"), "lookup"),
            (["quota", "show", "a@x"], ("quota", "show", "a@x"), "quota show"),
            (["quota", "reset", "a@x"], ("quota", "reset", "a@x"), "quota reset"),
            (["cache", "drop", "domain", "x"], ("cache", "drop", "domain", "x"), "cache drop"),
            (["cache", "flush"], ("cache", "flush"), "cache flush"),
            (["cache", "flush", "senders"], ("cache", "flush", "senders"), "cache flush"),
            (
                ["cache", "drop", "tls_policy", "example.org"],
                ("cache", "drop", "tls_policy", "example.org"),
                "cache drop",
            ),
            (["tls-policy", "x.org"], ("tls-policy", "x.org", "cached"), "tls-policy"),
            (["tls-policy", "--probe", "x.org"], ("tls-policy", "x.org", "probe"), "tls-policy"),
            (["tls-policy", "-p", "x.org"], ("tls-policy", "x.org", "probe"), "tls-policy"),
        ]
        for argv, words, name in table:
            options, as_json = parse(argv)
            self.assertEqual(options.command(), words, argv)
            self.assertEqual(options.commandName(), name, argv)
            self.assertFalse(as_json)

    def test_jsonAnywhere(self) -> None:
        """C{--json} (or C{-j}) counts before the command, after it, or after its arguments."""
        for argv in (
            ["--json", "quota", "show", "a@x"],
            ["quota", "--json", "show", "a@x"],
            ["quota", "show", "a@x", "--json"],
            ["quota", "show", "-j", "a@x"],
        ):
            options, as_json = parse(argv)
            self.assertTrue(as_json, argv)
            self.assertEqual(options.command(), ("quota", "show", "a@x"), argv)

    def test_settingsAsOptions(self) -> None:
        """The daemon's settings are options before the command, as for twistd."""
        options, _ = parse(["--redis-url", "redis://r/1", "--userli-token=t", "check"])
        self.assertEqual(options.given()["redis-url"], "redis://r/1")
        self.assertEqual(options.given()["userli-token"], "t")

    def test_usageErrors(self) -> None:
        """A missing or unknown command, map or argument is a usage error."""
        for argv in (
            [],
            ["nonsense"],
            ["quota"],
            ["quota", "show"],
            ["quota", "show", "a@x", "b@x"],
            ["lookup", "aliases", "a@x"],
            ["cache", "drop", "alias"],
            ["cache", "flush", "nomap"],
            ["cache"],
            ["lookup", "tls_policy", "x.org"],
            ["tls-policy"],
            ["tls-policy", "a.org", "b.org"],
        ):
            self.assertRaises(usage.UsageError, parse, argv)

    def test_helpEverywhere(self) -> None:
        """Every command and sub-command has C{--help}, which exits 0."""
        for argv in (
            ["--help"],
            ["check", "--help"],
            ["lookup", "--help"],
            ["quota", "--help"],
            ["quota", "show", "--help"],
            ["quota", "reset", "--help"],
            ["cache", "--help"],
            ["cache", "drop", "--help"],
            ["cache", "flush", "--help"],
            ["tls-policy", "--help"],
        ):
            stdout = io.StringIO()
            self.patch(__import__("sys"), "stdout", stdout)
            error = self.assertRaises(SystemExit, parse, argv)
            self.assertEqual(error.code, 0, argv)
            self.assertIn("--json", stdout.getvalue(), argv)


class RunTests(SynchronousTestCase):
    """Command line and configuration errors, before anything runs."""

    def run_(self, argv: list[str], environ: dict[str, str]) -> tuple[Any, str, str]:
        stdout, stderr = io.StringIO(), io.StringIO()
        result = run(argv, environ, stdout, stderr)
        return result, stdout.getvalue(), stderr.getvalue()

    def test_configurationError(self) -> None:
        """
        A bad setting exits 2 with one line naming the variable, as the
        daemon does; with C{--json}, stdout holds one document saying so.
        """
        environ = {"USERLI_TOKEN": "t", "LOOKUP_CACHE_TTL": "-5s"}
        status, out, err = self.run_(["check"], environ)
        self.assertEqual(status, USAGE)
        self.assertEqual(out, "")
        self.assertEqual(
            err, "userli-postfix: configuration error: LOOKUP_CACHE_TTL: '-5s' is negative\n"
        )
        status, out, err = self.run_(["quota", "show", "a@x", "--json"], environ)
        self.assertEqual(status, USAGE)
        document = json.loads(out)
        self.assertEqual(document["variable"], "LOOKUP_CACHE_TTL")
        self.assertEqual(document["command"], "quota show")
        self.assertFalse(document["ok"])

    def test_optionWinsOverEnvironment(self) -> None:
        """An option fixes a bad variable, as with twistd."""
        environ = {"USERLI_TOKEN": "t", "RATE_LIMIT_ACTION": "DISCARD"}
        status, _, err = self.run_(["check"], environ)
        self.assertEqual(status, USAGE)
        self.assertIn("RATE_LIMIT_ACTION", err)
        result, _, _ = self.run_(["--rate-limit-action=DEFER", "check"], environ)
        self.assertIsInstance(result, tuple)
        self.assertEqual(result[1].config.rate_limit_action, "DEFER")

    def test_systemdListeners(self) -> None:
        """
        A socket passed in by systemd exists only in the daemon's process:
        the command accepts it as written (the daemon checks it when it
        starts), and C{check} notes that Postfix reaches it elsewhere.
        Everything else is still checked.
        """
        environ = {"USERLI_TOKEN": "t", "POLICY_LISTEN_ADDR": "systemd:domain=INET:index=1"}
        result, _, err = self.run_(["check"], environ)
        self.assertIsInstance(result, tuple, err)
        config = result[1].config
        self.assertEqual(config.policy_listen, "systemd:domain=INET:index=1")
        self.assertTrue(postfix_lines(config).notes[0].startswith("POLICY_LISTEN_ADDR"))
        status, _, err = self.run_(["check"], {**environ, "SOCKETMAP_LISTEN_ADDR": "nonsense"})
        self.assertEqual(status, USAGE)
        self.assertIn("SOCKETMAP_LISTEN_ADDR", err)

    def test_daemonHTTPClient(self) -> None:
        """
        The command calls Userli through the daemon's own HTTP client (its
        kept connections), and closes them when it is done.
        """
        result, _, err = self.run_(["check"], {"USERLI_TOKEN": "t"})
        self.assertIsInstance(result, tuple, err)
        tools = result[1]
        self.assertTrue(tools.pool.persistent)
        self.assertEqual(tools.pool.maxPersistentPerHost, POOL_IDLE_PER_HOST)
        closed: list[bool] = []

        def close() -> defer.Deferred[None]:
            closed.append(True)
            return defer.succeed(None)

        tools.pool.closeCachedConnections = close
        self.successResultOf(tools.close())
        self.assertEqual(closed, [True])
        self.assertIsNone(tools.pool)

    def test_usageError(self) -> None:
        """A bad command line exits 2 and points at C{--help}."""
        status, out, err = self.run_(["lookup", "nomap", "x"], {"USERLI_TOKEN": "t"})
        self.assertEqual(status, USAGE)
        self.assertEqual(out, "")
        self.assertIn("unknown map 'nomap'", err)
        self.assertIn("--help", err)


class PostfixLinesTests(SynchronousTestCase):
    """The lines C{check} prints for Postfix."""

    def test_addresses(self) -> None:
        """Each kind of listener, as Postfix reaches it."""
        table = [
            ("tcp:10001:backlog=4096", "inet:127.0.0.1:10001"),
            ("tcp:10001:interface=0.0.0.0", "inet:127.0.0.1:10001"),
            ("tcp:10001:interface=10.0.0.5:backlog=4096", "inet:10.0.0.5:10001"),
            ("tcp:port=10001:interface=10.0.0.5", "inet:10.0.0.5:10001"),
            ("tcp6:10003:interface=\\:\\:1:backlog=4096", "inet:[::1]:10003"),
            ("tcp6:10003", "inet:127.0.0.1:10003"),
            ("unix:/run/u/policy:mode=666:lockfile=1", "unix:/run/u/policy"),
            ("systemd:domain=INET:index=0", None),
            ("ssl:10001:privateKey=k.pem", None),
        ]
        for description, address in table:
            self.assertEqual(postfix_address(description), address, description)

    def test_split(self) -> None:
        """Escaped colons stay inside their argument."""
        self.assertEqual(
            split_description("tcp6:1:interface=\\:\\:1"), ("tcp6", ["1"], {"interface": "::1"})
        )

    def test_lines(self) -> None:
        """
        The maps and the policy in main.cf, the policy applied on the
        submission services in master.cf, SASL with the chroot-relative
        path; the note about C{sasl_or_sender} only when it is in use.
        """
        config = Config.from_values(
            raw_values(
                {
                    "USERLI_TOKEN": "t",
                    "SOCKETMAP_LISTEN_ADDR": "127.0.0.1:10001",
                    "POLICY_LISTEN_ADDR": ":10003",
                    "SASL_LISTEN_ADDR": "/var/spool/postfix/private/auth",
                    "RATE_LIMIT_IDENTITY": "sasl",
                }
            )
        )
        lines = postfix_lines(config)
        self.assertEqual(
            lines.main_cf,
            [
                "virtual_mailbox_domains = socketmap:inet:127.0.0.1:10001:domain",
                "virtual_mailbox_maps = socketmap:inet:127.0.0.1:10001:mailbox",
                "virtual_alias_maps = socketmap:inet:127.0.0.1:10001:alias",
                "smtpd_sender_login_maps = socketmap:inet:127.0.0.1:10001:senders",
                "userli_policy = check_policy_service inet:127.0.0.1:10003",
                "smtpd_sasl_type = dovecot",
                "smtpd_sasl_path = private/auth",
            ],
        )
        self.assertEqual(
            lines.master_cf,
            [
                "submission inet n - y - - smtpd",
                "  -o smtpd_sasl_auth_enable=yes",
                "  -o smtpd_end_of_data_restrictions=$userli_policy",
                "submissions inet n - y - - smtpd",
                "  -o smtpd_tls_wrappermode=yes",
                "  -o smtpd_sasl_auth_enable=yes",
                "  -o smtpd_end_of_data_restrictions=$userli_policy",
            ],
        )
        self.assertEqual(lines.notes, [])
        default = postfix_lines(Config(userli_token="t"))
        self.assertEqual(len(default.notes), 1)
        self.assertIn("RATE_LIMIT_IDENTITY=sasl", default.notes[0])

    def test_unreachableListener(self) -> None:
        """A listener Postfix cannot reach itself gets a note naming its variable."""
        config = Config(userli_token="t", socketmap_listen="systemd:domain=INET:index=0")
        lines = postfix_lines(config)
        self.assertFalse(any("socketmap:" in line for line in lines.main_cf))
        self.assertTrue(lines.notes[0].startswith("SOCKETMAP_LISTEN_ADDR"))


class SecretsTests(SynchronousTestCase):
    """What C{check} shows of the configuration."""

    def test_secretsHidden(self) -> None:
        """The token and the passwords never appear; their presence does."""
        environ = {
            "USERLI_TOKEN": "s3cret-token",
            "REDIS_URL": "redis://user:pa55word@redis:6379/1",
            "REDIS_SENTINEL_ADDRS": "s1:26379",
            "REDIS_SENTINEL_PASSWORD": "sentinel-pa55",
        }
        raw = raw_values(environ)
        shown = shown_configuration(raw, Config.from_values(raw))
        text = json.dumps(shown)
        for secret in ("s3cret-token", "pa55word", "sentinel-pa55"):
            self.assertNotIn(secret, text)
        self.assertEqual(shown["USERLI_TOKEN"], HIDDEN)
        self.assertEqual(shown["REDIS_SENTINEL_PASSWORD"], HIDDEN)
        self.assertEqual(shown["REDIS_URL"], "redis://user:***@redis:6379/1")

    def test_ehloNameShown(self) -> None:
        """The EHLO name the probe uses is shown, also when it is this host's."""
        raw = raw_values({"USERLI_TOKEN": "t"})
        config = Config.from_values(raw)
        shown = shown_configuration(raw, config)
        self.assertEqual(
            shown["TLS_POLICY_EHLO_HOSTNAME"], f"(this host: {config.tls_policy_ehlo_hostname})"
        )
        raw = raw_values({"USERLI_TOKEN": "t", "TLS_POLICY_EHLO_HOSTNAME": "mx.example.org"})
        shown = shown_configuration(raw, Config.from_values(raw))
        self.assertEqual(shown["TLS_POLICY_EHLO_HOSTNAME"], "mx.example.org")

    def test_withoutPassword(self) -> None:
        """A URL without a password is shown as it is."""
        self.assertEqual(without_password("redis://redis:6379/0"), "redis://redis:6379/0")
        self.assertEqual(without_password("redis://:pw@redis"), "redis://:***@redis")


def check_report(**overrides: Any) -> Report:
    """A C{check} report, all well unless C{overrides} say otherwise."""
    data: dict[str, Any] = {
        "configuration": {"USERLI_TOKEN": HIDDEN, "REDIS_URL": "redis://r:6379/0"},
        "userli": {"url": BASE, "ok": True, "status": "200", "meaning": "reached"},
        "redis": {
            "configured": True,
            "ok": True,
            "target": "redis://r:6379/0",
            "version": "7.2.4",
            "role": "master",
            "tracking": {"ok": True},
        },
        "postfix": {"main.cf": ["a = b"], "master.cf": ["submission inet"], "notes": []},
    }
    data.update(overrides)
    return Report("check", OK, data)


class RenderTests(SynchronousTestCase):
    """Readable lines and the JSON document."""

    def test_json(self) -> None:
        """C{--json}: exactly one JSON document on stdout, with the command and C{ok}."""
        report = Report("cache flush", OK, {"pattern": "userli:lookup:*", "removed": 3})
        out, err = render(report, True)
        self.assertEqual(err, "")
        self.assertEqual(out.count("\n"), 1)
        self.assertEqual(
            json.loads(out),
            {"command": "cache flush", "ok": True, "pattern": "userli:lookup:*", "removed": 3},
        )
        self.assertFalse(json.loads(render(Report("lookup", NOT_OK, {}), True)[0])["ok"])

    def test_check(self) -> None:
        """C{check}: the configuration, Userli, Redis and the Postfix lines."""
        out, _ = render(check_report(), False)
        self.assertIn("  USERLI_TOKEN = (set, not shown)\n", out)
        self.assertIn(f"Userli {BASE}: ok: reached\n", out)
        self.assertIn("Redis redis://r:6379/0: ok\n  version 7.2.4, role master\n", out)
        self.assertIn("  client tracking: works\n", out)
        self.assertIn("# main.cf\na = b\n", out)
        self.assertIn("submission inet\n", out)

    def test_checkFailures(self) -> None:
        """A failed part says FAILED and why."""
        report = check_report(
            userli={"url": BASE, "ok": False, "status": "401", "meaning": "HTTP 401: wrong"},
            redis={
                "configured": True,
                "ok": False,
                "target": "redis://r",
                "error": "not reachable",
            },
        )
        out, _ = render(report, False)
        self.assertIn(f"Userli {BASE}: FAILED: HTTP 401: wrong\n", out)
        self.assertIn("Redis redis://r: FAILED\n  not reachable\n", out)

    def test_checkWithoutRedis(self) -> None:
        """Without Redis, C{check} says where the daemon keeps its state."""
        out, _ = render(check_report(redis={"configured": False, "ok": True}), False)
        self.assertIn("Redis: not configured", out)

    def test_lookup(self) -> None:
        """C{lookup}: the cached answer and its lifetime, Userli's, and Postfix's."""
        data = {
            "map": "alias",
            "key": "Info@example.org",
            "normalised": "info@example.org",
            "cached": {
                "key": "userli:lookup:alias:Info@example.org",
                "reply": "OK a@example.org",
                "ttl": 61.2,
            },
            "userli": "OK a@example.org,b@example.org",
            "reply": "OK a@example.org",
        }
        out, _ = render(Report("lookup", OK, data), False)
        self.assertEqual(
            out,
            "alias Info@example.org\n"
            "  normalised key: info@example.org\n"
            "  cache: 'OK a@example.org' under userli:lookup:alias:Info@example.org, "
            "for 1m01s more\n"
            "  Userli now: OK a@example.org,b@example.org\n"
            "  Postfix gets: OK a@example.org\n",
        )

    def test_tlsPolicy(self) -> None:
        """C{tls-policy}: the cached verdict, how long it stays, Postfix's answer."""
        data = {
            "key": "User@Example.org",
            "domain": "example.org",
            "cached": {
                "key": "userli:tlspolicy:domain:example.org",
                "verdict": "encrypt",
                "ttl": 3 * 3600 + 61.2,
            },
            "reply": "OK encrypt",
            "probe": None,
        }
        out, _ = render(Report("tls-policy", OK, data), False)
        self.assertEqual(
            out,
            "tls_policy User@Example.org\n"
            "  domain: example.org\n"
            "  cache: encrypt under userli:tlspolicy:domain:example.org, for 3h01m01s more\n"
            "  Postfix gets: OK encrypt\n",
        )
        data["cached"] = {
            "key": "userli:tlspolicy:domain:example.org",
            "verdict": None,
            "ttl": None,
        }
        data["reply"] = "NOTFOUND"
        out, _ = render(Report("tls-policy", NOT_OK, data), False)
        self.assertIn("nothing under userli:tlspolicy:domain:example.org", out)

    def test_lookupFromRemoteDomainMemory(self) -> None:
        """
        C{lookup} of a key in a remembered remote domain: the memory's entry
        and lifetime, and that Postfix's C{NOTFOUND} comes from it.
        """
        data = {
            "map": "alias",
            "key": "someone@remote.test",
            "normalised": "someone@remote.test",
            "remote": {
                "key": "userli:lookup:remote:remote.test",
                "domain": "remote.test",
                "reply": "NOTFOUND",
                "ttl": 42.0,
            },
            "cached": {"key": "userli:lookup:alias:someone@remote.test", "reply": None},
            "userli": "NOTFOUND",
            "reply": "NOTFOUND",
            "source": "remote-domain memory",
        }
        out, _ = render(Report("lookup", NOT_OK, data), False)
        self.assertEqual(
            out,
            "alias someone@remote.test\n"
            "  normalised key: someone@remote.test\n"
            "  remote-domain memory: remote.test is not a Userli domain, "
            "under userli:lookup:remote:remote.test, for 42s more\n"
            "  cache: nothing under userli:lookup:alias:someone@remote.test\n"
            "  Userli now: NOTFOUND\n"
            "  Postfix gets: NOTFOUND (from the remote-domain memory)\n",
        )
        data["remote"] = {**data["remote"], "reply": None, "ttl": None}  # type: ignore[dict-item]
        data["source"] = "Userli"
        out, _ = render(Report("lookup", NOT_OK, data), False)
        self.assertIn(
            "  remote-domain memory: nothing under userli:lookup:remote:remote.test\n", out
        )
        self.assertIn("  Postfix gets: NOTFOUND\n", out)

    def test_cacheFlushPatterns(self) -> None:
        """C{cache flush domain} names both patterns it removed."""
        data = {
            "pattern": "userli:lookup:domain:*",
            "patterns": ["userli:lookup:domain:*", "userli:lookup:remote:*"],
            "removed": 4,
        }
        out, _ = render(Report("cache flush", OK, data), False)
        self.assertEqual(
            out,
            "Dropped 4 cached answer(s) matching userli:lookup:domain:* and "
            "userli:lookup:remote:*\n",
        )

    def test_quotaShow(self) -> None:
        """C{quota show}: identity, limits, counts and the next accepted message."""
        data = {
            "address": "Limited@example.org",
            "identity": "limited@example.org",
            "limits": {"per_hour": 2, "per_day": 0},
            "limits_error": None,
            "window": {"key": "userli:ratelimit:sender:limited@example.org", "hour": 2, "day": 5},
            "next_accepted": "2026-01-01T10:00:00Z",
            "next_accepted_in": 125.0,
        }
        out, _ = render(Report("quota show", OK, data), False)
        self.assertIn("  limits: 2 per hour, unlimited per day\n", out)
        self.assertIn("  counted: 2 in the last hour, 5 in the last day\n", out)
        self.assertIn("accepted from 2026-01-01T10:00:00Z (in 2m05s", out)
        data["next_accepted_in"] = 0.0
        out, _ = render(Report("quota show", OK, data), False)
        self.assertIn("  next message: accepted now\n", out)

    def test_usageErrorOnlyOnStderr(self) -> None:
        """A usage error is one line on stderr and nothing on stdout (readable output)."""
        report = Report("quota show", USAGE, {"error": "quota show: needs Redis"})
        self.assertEqual(render(report, False), ("", "userli-postfix: quota show: needs Redis\n"))

    def test_failureOnlyOnStderr(self) -> None:
        """A command that failed midway: one line on stderr; with C{--json} the document too."""
        report = Report("cache flush", NOT_OK, {"error": "cache flush: Redis gone"})
        self.assertEqual(render(report, False), ("", "userli-postfix: cache flush: Redis gone\n"))
        out, err = render(report, True)
        self.assertEqual(json.loads(out)["error"], "cache flush: Redis gone")
        self.assertEqual(err, "userli-postfix: cache flush: Redis gone\n")

    def test_duration(self) -> None:
        """Durations for humans."""
        self.assertEqual(
            [duration(s) for s in (0, 5.4, 65, 3600, 3725, -3)],
            ["0s", "5s", "1m05s", "1h00m00s", "1h02m05s", "0s"],
        )


def userli_data() -> UserliData:
    return UserliData(users={"alice@example.org": "pw"}, domains={"example.org"})


class CheckUserliTests(SynchronousTestCase):
    """C{check}'s verdict on Userli, and what each failure means."""

    def tools(self, token: str = TOKEN) -> tuple[Tools, FakeUserli, task.Clock]:
        clock = task.Clock()
        fake = FakeUserli(userli_data())
        self.stub = StubTreq(FakeUserliResource(fake, clock))
        config = Config(userli_token=token, userli_base_url=BASE)
        tools = Tools(config, raw_values({"USERLI_TOKEN": token}), clock, self.stub.request)
        return tools, fake, clock

    def check(self, tools: Tools, clock: task.Clock | None = None) -> Report:
        d = check(tools)
        self.stub.flush()
        if clock is not None:
            clock.advance(API_TIMEOUT)
            self.stub.flush()
        report: Report = self.successResultOf(d)
        return report

    def test_ok(self) -> None:
        """A token Userli accepts: exit 0; Redis not configured is not a failure."""
        tools, _, _ = self.tools()
        report = self.check(tools)
        self.assertEqual(report.status, OK)
        self.assertEqual(report.data["userli"]["status"], "200")
        self.assertFalse(report.data["redis"]["configured"])

    def test_wrongToken(self) -> None:
        """401: the token is wrong, exit 1; the token is nowhere in the output."""
        tools, _, _ = self.tools("not-the-token")
        report = self.check(tools)
        self.assertEqual(report.status, NOT_OK)
        self.assertIn("USERLI_TOKEN is wrong", report.data["userli"]["meaning"])
        for as_json in (True, False):
            out, err = render(report, as_json)
            self.assertNotIn("not-the-token", out + err)

    def test_tokenWithoutScope(self) -> None:
        """403: the token lacks the postfix scope."""
        tools, _, _ = self.tools(TOKEN_WITHOUT_SCOPE)
        report = self.check(tools)
        self.assertEqual(report.status, NOT_OK)
        self.assertIn("lacks the postfix scope", report.data["userli"]["meaning"])

    def test_timeout(self) -> None:
        """No answer within the daemon's deadline: not reachable."""
        tools, fake, clock = self.tools()
        fake.set_mode(SLOW, delay=60.0)
        report = self.check(tools, clock)
        self.assertEqual(report.status, NOT_OK)
        self.assertIn("not reachable", report.data["userli"]["meaning"])
        self.assertIn(f"{API_TIMEOUT:g} s", report.data["userli"]["meaning"])

    def test_serverError(self) -> None:
        """Another status: an unexpected answer, named."""
        tools, fake, _ = self.tools()
        fake.set_mode(ERROR)
        report = self.check(tools)
        self.assertEqual(report.status, NOT_OK)
        self.assertIn("HTTP 500", report.data["userli"]["meaning"])

    def test_backendFailure(self) -> None:
        """
        A command whose backend fails midway ends with exit status 1 and
        the reason, and closes what it opened.
        """
        tools, _, _ = self.tools()
        closed: list[bool] = []

        def broken(address: str) -> Any:
            raise ConnectionError("Redis not reachable within 3 s")

        self.patch(tools, "quotaShow", broken)
        self.patch(tools, "close", lambda: closed.append(True))
        report = self.successResultOf(
            execute(tools, "quota show", ("quota", "show", "alice@example.org"))
        )
        self.assertEqual(report.status, NOT_OK)
        self.assertEqual(report.data["error"], "quota show: Redis not reachable within 3 s")
        self.assertEqual(closed, [True])

    def test_lookupWithoutRedis(self) -> None:
        """
        Without Redis, C{lookup} still says what Userli answers, and that
        the cache lives inside the daemon; exit 0 for OK, 1 for NOTFOUND.
        """
        tools, _, _ = self.tools()
        d = tools.lookup("domain", "Example.org")
        self.stub.flush()
        report: Report = self.successResultOf(d)
        self.assertEqual(report.status, OK)
        self.assertEqual(report.data["normalised"], "example.org")
        self.assertEqual(report.data["reply"], "OK 1")
        self.assertIn("daemon's memory", report.data["cached"])
        self.assertIn("daemon's memory", report.data["remote"])
        self.assertEqual(report.data["source"], "Userli")
        d = tools.lookup("mailbox", "nobody@example.org")
        self.stub.flush()
        self.assertEqual(self.successResultOf(d).status, NOT_OK)

    def test_tlsPolicyWithoutRedis(self) -> None:
        """
        Without Redis, C{tls-policy} says the verdicts live inside the
        daemon; a key that is no domain is NOTFOUND and never probed.
        """
        tools, _, _ = self.tools()
        report: Report = self.successResultOf(tools.tlsPolicy("Alice@Example.ORG."))
        self.assertEqual(report.status, NOT_OK)
        self.assertEqual(report.data["domain"], "example.org")
        self.assertIn("daemon's memory", report.data["cached"])
        self.assertIsNone(report.data["probe"])
        self.patch(tools, "makeProber", lambda: self.fail("probed"))
        report = self.successResultOf(tools.tlsPolicy("not a domain", probe=True))
        self.assertEqual((report.status, report.data["domain"]), (NOT_OK, None))

    def test_tlsPolicyProbe(self) -> None:
        """C{--probe}: each server with what it found; exit 0 for encrypt."""
        tools, _, _ = self.tools()
        result = tlspolicy.ProbeResult(
            "example.org",
            tlspolicy.ENCRYPT,
            (
                tlspolicy.MailHost(
                    "mx.example.org",
                    (
                        HostReport("192.0.2.1", error="no connection: refused"),
                        HostReport(
                            "2001:db8::1",
                            answered=True,
                            banner="220 mx ESMTP",
                            starttls_offered=True,
                            tls=True,
                            tls_version="TLSv1.3",
                            cipher="TLS_AES_128_GCM_SHA256",
                        ),
                    ),
                ),
            ),
        )

        class Prober:
            def probe(self, domain: str) -> Any:
                assert domain == "example.org"
                return defer.succeed(result)

        self.patch(tools, "makeProber", Prober)
        report: Report = self.successResultOf(tools.tlsPolicy("example.org", probe=True))
        self.assertEqual(report.status, OK)
        probe = report.data["probe"]
        self.assertEqual(probe["verdict"], "encrypt")
        self.assertEqual(probe["hosts"][0]["addresses"][1]["cipher"], "TLS_AES_128_GCM_SHA256")
        json.dumps(report.document())
        out, _ = render(report, False)
        self.assertIn("    mx.example.org\n", out)
        self.assertIn("      192.0.2.1:\n        error: no connection: refused\n", out)
        self.assertIn(
            "        banner: 220 mx ESMTP\n"
            "        STARTTLS offered: yes\n"
            "        handshake completed: yes\n"
            "        TLS: TLSv1.3, TLS_AES_128_GCM_SHA256\n",
            out,
        )

    def test_lookupRemoteMemoryOff(self) -> None:
        """With C{REMOTE_DOMAIN_CACHE_TTL=0}, C{lookup} says the memory is off."""
        tools, _, _ = self.tools()
        tools.config = replace(tools.config, remote_domain_cache_ttl=0.0)
        d = tools.lookup("alias", "a@remote.test")
        self.stub.flush()
        report: Report = self.successResultOf(d)
        self.assertEqual(report.data["remote"], "off (REMOTE_DOMAIN_CACHE_TTL=0)")

    def test_commandsNeedingRedis(self) -> None:
        """Without REDIS_URL, the Redis commands exit 2 saying so."""
        tools, _, _ = self.tools()
        for d in (
            tools.quotaShow("alice@example.org"),
            tools.quotaReset("alice@example.org"),
            tools.cacheDrop("alias", "x@example.org"),
            tools.cacheDrop("tls_policy", "example.org"),
            tools.cacheFlush(None),
            tools.cacheFlush("tls_policy"),
        ):
            report: Report = self.successResultOf(d)
            self.assertEqual(report.status, USAGE)
            self.assertEqual(report.data["variable"], "REDIS_URL")
            self.assertIn("REDIS_URL is not set", report.data["error"])


class LogTests(SynchronousTestCase):
    """The command's log on stderr."""

    def events(self, level: str) -> str:
        from twisted.logger import Logger

        stream = io.StringIO()
        observer = cliObserver(level, "text", stream)
        Logger(namespace="userli_postfix.cli.commands", observer=observer).info("reset done")
        Logger(namespace="userli_postfix.redisclient", observer=observer).info("Using Redis")
        Logger(namespace="userli_postfix.redisclient", observer=observer).warn("Redis trouble")
        return stream.getvalue()

    def test_commandEventsOnly(self) -> None:
        """
        What the command did is logged at C{info}; the daemon's modules
        only from C{warn} up, so a command's output is not drowned.
        """
        text = self.events("info")
        self.assertIn("reset done", text)
        self.assertNotIn("Using Redis", text)
        self.assertIn("Redis trouble", text)

    def test_debugShowsAll(self) -> None:
        """C{LOG_LEVEL=debug} shows everything; C{error} hides the command's own events."""
        self.assertIn("Using Redis", self.events("debug"))
        self.assertNotIn("reset done", self.events("error"))
