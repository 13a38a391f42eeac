"""
Tests for L{userli_postfix.tap}: the twistd options (one per setting, over
the environment), the one-line refusal of a bad configuration, and
L{makeService} building every listener on a L{MemoryReactor}.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import sys
import tempfile
from typing import Any

from twisted.application.service import Application, IServiceCollection
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from tests.doubles import configFrom
from userli_postfix import __version__, daemon, tap
from userli_postfix import config as config_module
from userli_postfix.cache import MemoryCache, NearCache
from userli_postfix.config import SETTINGS
from userli_postfix.socketmap import SocketmapFactory, netstring
from userli_postfix.tlspolicy import MemoryPolicyCache, RedisPolicyCache


class OptionsTests(SynchronousTestCase):
    """L{tap.Options}: every setting as a flag, checked before the reactor starts."""

    def setUp(self) -> None:
        self.environ: dict[str, str] = {"USERLI_TOKEN": "env-token"}
        self.patch(os, "environ", self.environ)
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        # ":PORT" is every address, IPv6 included, on hosts that have IPv6.
        self.patch(config_module, "ipv6Available", lambda: True)

    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_every_setting_is_an_option(self) -> None:
        """Each entry of L{SETTINGS} is a long option, whose help names its variable."""
        options = tap.Options()
        longOptions = {name.rstrip("=") for name in options.longOpt}
        for setting in SETTINGS:
            self.assertIn(setting.option, longOptions)
        helpText = str(options)
        for setting in SETTINGS:
            self.assertIn(setting.variable, helpText)

    def test_environment(self) -> None:
        """Without flags the environment is used, with the documented defaults."""
        options = self.parse()
        self.assertEqual(options.config, configFrom({"USERLI_TOKEN": "env-token"}))

    def test_flag_over_environment(self) -> None:
        """A flag wins over the variable."""
        self.environ["LOOKUP_CACHE_TTL"] = "5m"
        self.environ["SOCKETMAP_LISTEN_ADDR"] = ":20001"
        options = self.parse("--lookup-cache-ttl", "1h", "--userli-token=flag-token")
        self.assertEqual(options.config.lookup_cache_ttl, 3600.0)
        self.assertEqual(options.config.userli_token, "flag-token")
        self.assertEqual(
            options.config.socketmap_listen, "tcp6:20001:interface=\\:\\::backlog=4096"
        )

    def test_every_flag_read(self) -> None:
        """Every flag reaches the configuration."""
        values = {
            "userli-token": "t",
            "userli-base-url": "https://userli.example.org",
            "recipient-delimiter": "+",
            "socketmap-listen": ":20001",
            "policy-listen": ":20003",
            "metrics-listen": ":20002",
            "sasl-listen": ":20006",
            "rate-limit-message": "Slow down",
            "redis-url": "redis://redis/1",
            "lookup-cache-ttl": "1m",
            "quota-cache-ttl": "2m",
            "sasl-failure-delay": "3s",
            "log-level": "debug",
            "log-format": "json",
        }
        argv = [f"--{name}={value}" for name, value in values.items()]
        config = self.parse(*argv).config
        self.assertEqual(config, configFrom({}, {s.option: values.get(s.option) for s in SETTINGS}))
        self.assertEqual(config.sasl_listen, "tcp6:20006:interface=\\:\\::backlog=4096")
        self.assertEqual(config.log_format, "json")

    def test_bad_configuration(self) -> None:
        """
        A bad setting ends the process with status 2 and one line that names
        the variable, before any listener exists.
        """
        self.environ["LOOKUP_CACHE_TTL"] = "-5m"
        error = self.assertRaises(SystemExit, self.parse)
        self.assertEqual(error.code, 2)
        output = self.stderr.getvalue()
        self.assertEqual(output.count("\n"), 1)
        self.assertTrue(output.endswith("\n"))
        self.assertIn("LOOKUP_CACHE_TTL", output)
        self.assertTrue(output.startswith("userli-postfix: configuration error: "), output)

    def test_unicode_digits(self) -> None:
        """
        C{WORKERS=²} and a Unicode digit in the Redis database or port each
        end the process with one configuration-error line naming the
        variable, not a traceback.
        """
        for variable, value in [
            ("WORKERS", "\u00b2"),
            ("REDIS_URL", "redis://redis/\u00b2"),
            ("REDIS_URL", "redis://redis:\u0666\u0663\u0667\u0669/1"),
        ]:
            self.stderr.seek(0)
            self.stderr.truncate()
            self.environ["REDIS_URL"] = "redis://redis/1"
            self.environ[variable] = value
            error = self.assertRaises(SystemExit, self.parse)
            self.assertEqual(error.code, 2)
            output = self.stderr.getvalue()
            self.assertEqual(output.count("\n"), 1, output)
            self.assertTrue(
                output.startswith(f"userli-postfix: configuration error: {variable}: "), output
            )
            del self.environ[variable]

    def test_bad_flag_value(self) -> None:
        """A bad flag value is refused the same way, naming the variable."""
        error = self.assertRaises(SystemExit, self.parse, "--policy-listen=nonsense")
        self.assertEqual(error.code, 2)
        self.assertIn("POLICY_LISTEN_ADDR", self.stderr.getvalue())

    def test_missing_token(self) -> None:
        """Without a token the daemon refuses to start."""
        del self.environ["USERLI_TOKEN"]
        error = self.assertRaises(SystemExit, self.parse)
        self.assertEqual(error.code, 2)
        self.assertIn("USERLI_TOKEN", self.stderr.getvalue())

    def test_error_hides_secrets(self) -> None:
        """The refusal line shows neither the token nor the Redis password."""
        self.environ["USERLI_TOKEN"] = "tok-secret-1"
        self.environ["REDIS_URL"] = "redis://:pw-secret-2@redis/x"
        self.assertRaises(SystemExit, self.parse)
        output = self.stderr.getvalue()
        self.assertIn("REDIS_URL", output)
        self.assertNotIn("tok-secret-1", output)
        self.assertNotIn("pw-secret-2", output)

    def test_version(self) -> None:
        """C{--version} prints the version and exits 0."""
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        error = self.assertRaises(SystemExit, self.parse, "--version")
        self.assertEqual(error.code, 0)
        self.assertEqual(stdout.getvalue(), f"userli-postfix {__version__}\n")


class MakeServiceTests(SynchronousTestCase):
    """L{tap.makeService} on a L{MemoryReactorClock}: nothing really listens."""

    def setUp(self) -> None:
        self.patch(config_module, "ipv6Available", lambda: True)

    def build(self, **environ: str) -> tuple[Any, MemoryReactorClock]:
        reactor = MemoryReactorClock()
        config = configFrom({"USERLI_TOKEN": "t", **environ})
        return tap.makeService({"config": config}, reactor=reactor), reactor

    def test_default_listeners(self) -> None:
        """Socketmap, policy and HTTP listen on the Go program's ports; SASL is off."""
        service, reactor = self.build()
        service.startService()
        ports = sorted(port for port, *_ in reactor.tcpServers)
        self.assertEqual(ports, [10001, 10002, 10003])
        names = {child.name for child in IServiceCollection(service)}
        self.assertEqual(names, {"socketmap", "policy", "http"})
        self.successResultOf(service.stopService())

    def test_factories(self) -> None:
        """Each listener gets its own kind of factory."""
        service, reactor = self.build(SASL_LISTEN_ADDR=":10006")
        service.startService()
        factories = {port: factory for port, factory, *_ in reactor.tcpServers}
        self.assertIsInstance(factories[10001], SocketmapFactory)
        self.assertIsInstance(factories[10002], Site)
        self.assertEqual(
            type(factories[10003]).__name__,
            type(service.getServiceNamed("policy").factory).__name__,
        )
        self.assertIn(10006, factories)
        self.successResultOf(service.stopService())

    def test_addresses(self) -> None:
        """Configured addresses are used: interfaces, other ports, UNIX sockets."""
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "sasl")
        service, reactor = self.build(
            SOCKETMAP_LISTEN_ADDR="127.0.0.1:20001",
            POLICY_LISTEN_ADDR=":20003",
            METRICS_LISTEN_ADDR="tcp:20002:interface=127.0.0.1",
            SASL_LISTEN_ADDR=path + ".sock",
        )
        service.startService()
        tcp = {port: interface for port, _, _, interface in reactor.tcpServers}
        self.assertEqual(tcp, {20001: "127.0.0.1", 20002: "127.0.0.1", 20003: "::"})
        self.assertEqual([address for address, *_ in reactor.unixServers], [path + ".sock"])
        self.successResultOf(service.stopService())

    def test_memory_backends(self) -> None:
        """Without Redis, the lookup cache lives in memory; with TTL 0 there is none."""
        service, _ = self.build()
        lookups = service.getServiceNamed("socketmap").factory.lookups
        self.assertIsInstance(lookups._cache, MemoryCache)
        service, _ = self.build(LOOKUP_CACHE_TTL="0")
        lookups = service.getServiceNamed("socketmap").factory.lookups
        self.assertIsNone(lookups._cache)

    def test_redis_backend(self) -> None:
        """With C{REDIS_URL} the lookup cache is in Redis (built, not yet connected)."""
        service, _ = self.build(REDIS_URL="redis://redis:6379/0")
        lookups = service.getServiceNamed("socketmap").factory.lookups
        self.assertNotIsInstance(lookups._cache, MemoryCache)
        self.assertIsNotNone(lookups._cache)

    def test_redis_near_cache_tracked(self) -> None:
        """
        With Redis the near-cache listens to Redis's client tracking of the
        lookup cache's keys, and keeps no copy before tracking is established.
        """
        service, _ = self.build(REDIS_URL="redis://redis:6379/0")
        lookups = service.getServiceNamed("socketmap").factory.lookups
        cache = lookups._cache
        self.assertIsInstance(cache, NearCache)
        # The daemon's one registry, as the tls_policy map holds it.
        registry = lookups._others["tls_policy"].__self__._metrics.registry
        coherent = registry.get_sample_value("userli_postfix_adapter_near_cache_coherent")
        self.assertEqual(coherent, 0)
        tracker = service._redis._tracker
        self.assertIs(tracker.listener, cache)
        self.assertEqual(tracker.prefix, "userli:lookup:")

    def test_tls_policy_map(self) -> None:
        """
        The socketmap serves C{tls_policy} with the memory cache: a key that
        is no domain is C{NOTFOUND}, never C{PERM}; a domain is probed (here
        DNS cannot even start: C{NOTFOUND}, counted as a probe error).
        """
        service, _ = self.build(TLS_POLICY_NAMESERVERS="127.0.0.1:5353")
        lookups = service.getServiceNamed("socketmap").factory.lookups
        self.assertEqual(lookups.answer(b"tls_policy not..a.domain"), b"NOTFOUND ")
        d = defer.maybeDeferred(lookups.answer, b"tls_policy example.org")
        self.assertEqual(self.successResultOf(d), b"NOTFOUND ")
        policy = lookups._others["tls_policy"].__self__
        errors = policy._metrics.registry.get_sample_value(
            "userli_postfix_adapter_tls_policy_probe_total", {"result": "error"}
        )
        self.assertEqual(errors, 1)
        self.assertIsInstance(policy._cache, MemoryPolicyCache)

    def test_tls_policy_in_redis(self) -> None:
        """With C{REDIS_URL} the verdicts are kept in Redis."""
        service, _ = self.build(REDIS_URL="redis://redis:6379/0")
        policy = service.getServiceNamed("socketmap").factory.lookups._others["tls_policy"]
        self.assertIsInstance(policy.__self__._cache, RedisPolicyCache)

    def test_remote_domain_memory(self) -> None:
        """
        The remote-domain memory: in memory without Redis; with Redis in the
        lookup cache's near-cache (also when the lookup cache is off, so
        Redis still reports its changes); none with
        C{REMOTE_DOMAIN_CACHE_TTL=0}.  Lookups and the policy share it.
        """

        def parts(service: Any) -> tuple[Any, Any, Any]:
            lookups = service.getServiceNamed("socketmap").factory.lookups
            policy = service.getServiceNamed("policy").factory.policy
            self.assertIs(policy._remote, lookups._remote)
            return lookups._cache, lookups._remote, service._redis

        cache, remote, _ = parts(self.build()[0])
        self.assertIsInstance(remote._store, MemoryCache)
        self.assertIsNot(remote._store, cache)
        self.assertEqual(remote._ttl, 60.0)
        cache, remote, redis = parts(self.build(REDIS_URL="redis://redis:6379/0")[0])
        self.assertIs(remote._store, cache)
        cache, remote, redis = parts(
            self.build(REDIS_URL="redis://redis:6379/0", LOOKUP_CACHE_TTL="0")[0]
        )
        self.assertIsNone(cache)
        self.assertIsInstance(remote._store, NearCache)
        self.assertIs(redis._tracker.listener, remote._store)
        for environ in ({}, {"REDIS_URL": "redis://redis:6379/0"}):
            _, remote, _ = parts(self.build(REMOTE_DOMAIN_CACHE_TTL="0", **environ)[0])
            self.assertIsNone(remote)
        _, _, redis = parts(
            self.build(
                REDIS_URL="redis://redis:6379/0", LOOKUP_CACHE_TTL="0", REMOTE_DOMAIN_CACHE_TTL="0"
            )[0]
        )
        self.assertIsNone(redis._tracker)

    def test_stop_drains(self) -> None:
        """
        Stopping waits for a busy connection (bounded by the grace period) and
        completes once every connection is gone.
        """
        service, reactor = self.build()
        service.startService()
        factory = service.getServiceNamed("socketmap").factory
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        # Userli is unreachable on the memory reactor: the lookup hangs.
        protocol.dataReceived(netstring(b"domain example.org"))
        d = service.stopService()
        self.assertNoResult(d)
        reactor.advance(daemon.SHUTDOWN_GRACE)
        self.assertTrue(transport.disconnected)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(d)
        self.assertFalse(service.running)

    def test_log_observer(self) -> None:
        """The daemon's level-filtering observer is handed to twistd through the application."""
        service, _ = self.build(LOG_LEVEL="warn", LOG_FORMAT="json")
        application = Application("userli-postfix")
        service.setServiceParent(application)
        self.assertIsNotNone(application.getComponent(ILogObserver))

    def test_log_goes_where_twistd_says(self) -> None:
        """
        Under twistd, the observer handed to twistd writes where twistd's own
        options (here C{--logfile}) say, filtered by C{LOG_LEVEL}.
        """
        self.patch(os, "environ", {"USERLI_TOKEN": "t", "LOG_LEVEL": "warn"})
        previous = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "userli-postfix.log")
        options = tap.Options()
        options.parseOptions([])
        options.parent = {"logfile": path, "nodaemon": False}  # twistd's ServerOptions
        service = tap.makeService(options, reactor=MemoryReactorClock())
        application = Application("userli-postfix")
        service.setServiceParent(application)
        log = Logger(observer=application.getComponent(ILogObserver))
        log.info("not at warn")
        log.warn("Redis unreachable")
        with open(path) as f:
            text = f.read()
        self.assertIn("Redis unreachable", text)
        self.assertNotIn("not at warn", text)


class PluginTests(SynchronousTestCase):
    """The twistd plugin points at this module."""

    def test_plugin(self) -> None:
        """C{twistd userli-postfix} uses L{tap.Options} and L{tap.makeService}."""
        from twisted.plugins import userli_postfix as plugin

        maker = plugin.service_maker
        self.assertEqual(maker.tapname, "userli-postfix")
        self.assertIs(maker.options, tap.Options)
        self.assertIs(maker.makeService, tap.makeService)
