"""
The benchmark suite: one command that builds what it needs, starts a fake
Userli (fixed latency) and a real redis-server, runs every scenario against
the daemon (one process and worker processes) and against its peers, and
prints a table.

    benchmarks/run            # the full run (about 12 minutes)
    benchmarks/run --quick    # a smoke run (about 2 minutes)
    benchmarks/run --soak 600 # memory over a 10-minute mixed load
    benchmarks/run --postfix [--yardstick DIR]
                              # mail through a real Postfix (as root), see
                              # benchmarks/postfix.py

Everything listens on 127.0.0.1 only.  The load generator (loadgen.c) runs
each connection like a Postfix process: one request, wait for the reply,
the next.  Its own ceiling is measured in the same run against a trivial C
responder, and the bare Twisted NetstringReceiver is shown as the floor of
what a Twisted server costs.  podop (from PyPI, installed into a scratch
virtualenv) is the peer: a Python socketmap-to-HTTP proxy.

The table goes to stdout and, with the raw results, to
benchmarks/results/ (RESULTS-<time>.md and .json).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.compare import alternate, change

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUILD = HERE / "build"
RESULTS = HERE / "results"

TOKEN = "benchmark-token"
DOMAIN = "example.org"

# Postfix attributes of an END-OF-MESSAGE policy request, as smtpd sends them.
POLICY_TEMPLATE = (
    "request=smtpd_access_policy\\nprotocol_state=END-OF-MESSAGE\\nprotocol_name=ESMTP\\n"
    "helo_name=client.example\\nqueue_id=4ABC123DEF\\nsender={sender}\\n"
    "recipient=user1@example.org\\nrecipient_count=1\\nclient_address=192.0.2.10\\n"
    "client_name=client.example\\nreverse_client_name=client.example\\n"
    "instance=1f2e.6a3b4c5d.1a2b3.0\\nsasl_method=\\nsasl_username=\\nsasl_sender=\\n"
    "size=4321\\nccert_subject=\\nccert_issuer=\\nccert_fingerprint=\\nencryption_protocol=\\n"
    "encryption_cipher=\\nencryption_keysize=0\\netrn_domain=\\nstress=\\n"
    "server_address=192.0.2.1\\nserver_port=25\\npolicy_context="
)


@dataclass(frozen=True)
class Scenario:
    """What one run sends."""

    name: str
    title: str
    protocol: str
    requests: list[str]
    unique: bool = False


def scenarios() -> dict[str, Scenario]:
    """Every scenario of the issue, plus SASL PLAIN logins."""
    hot = [f"mailbox user{i}@{DOMAIN}" for i in range(10)]
    plain = [base64.b64encode(f"\0user{i}@{DOMAIN}\0secret".encode()).decode() for i in range(100)]
    return {
        s.name: s
        for s in (
            Scenario("hot", "socketmap, 10 hot keys (cached)", "socketmap", hot),
            Scenario(
                "cold",
                "socketmap, unique keys (every one a miss)",
                "socketmap",
                # {n} becomes a number unique in the run, after a per-run tag.
                [f"mailbox user{{n}}@{DOMAIN}"],
                unique=True,
            ),
            Scenario(
                "quota",
                "policy END-OF-MESSAGE, quota set",
                "policy",
                [POLICY_TEMPLATE.format(sender=f"quota{i}@{DOMAIN}") for i in range(100)],
            ),
            Scenario(
                "unlimited",
                "policy END-OF-MESSAGE, unlimited",
                "policy",
                [POLICY_TEMPLATE.format(sender=f"unlimited{i}@{DOMAIN}") for i in range(100)],
            ),
            Scenario("sasl", "SASL PLAIN logins (each one asks the API)", "sasl", plain),
        )
    }


@dataclass
class Result:
    """One load-generator run."""

    target: str
    scenario: str
    conns: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_per_1000: float | None
    rss_mb: float | None
    replies: dict[str, int]
    errors: int
    loadgen_cpu_s: float
    seconds: float
    processes: list[dict[str, Any]] = field(default_factory=list)


class Processes:
    """Every process the benchmark started, stopped (by pid) at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> Any:
        log = open(self.directory / f"{name}.log", "ab")
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.directory,
        )
        log.close()
        self.started.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process in self.started:
            self.started.remove(process)

    def stopAll(self) -> None:
        for process in list(self.started):
            self.stop(process, timeout=5.0)


def compared(targets: set[str], args: argparse.Namespace) -> list[tuple[str, Path]]:
    """The daemon (one process) and the yardstick's, if any, in C{--rounds} rounds."""
    pairs = [("daemon", ROOT)] if "daemon" in targets else []
    if args.yardstick is not None:
        pairs.append(("yardstick", args.yardstick))
    return alternate(pairs, args.rounds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Any, what: str, deadline: float = 60.0) -> None:
    give_up = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > give_up:
            raise SystemExit(f"benchmark: gave up waiting for {what}")
        time.sleep(0.05)


def accepts(address: str | tuple[str, int]) -> bool:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(1)
        try:
            s.connect(address)
        except OSError:
            return False
        return True


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def build() -> dict[str, Path]:
    """Compile the C tools with the machine's compiler."""
    BUILD.mkdir(exist_ok=True)
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise SystemExit("benchmark: a C compiler (gcc or cc) is needed")
    tools = {}
    for name in ("loadgen", "responder", "fakeuserli"):
        source = HERE / f"{name}.c"
        binary = BUILD / name
        if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
            subprocess.run([compiler, "-O2", "-Wall", "-o", str(binary), str(source)], check=True)
        tools[name] = binary
    return tools


def podop_python() -> Path | None:
    """A scratch virtualenv with podop from PyPI; None when it cannot be had."""
    venv = BUILD / "podop-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    check = subprocess.run([str(python), "-c", "import podop"], capture_output=True)
    if check.returncode != 0:
        print("benchmark: installing podop from PyPI into a scratch virtualenv", flush=True)
        install = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "podop"], capture_output=True
        )
        if install.returncode != 0:
            print("benchmark: podop could not be installed; it is left out", flush=True)
            return None
    return python


class Bench:
    """One benchmark session: the backends, the targets, the runs."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tools = build()
        self.work = Path(tempfile.mkdtemp(prefix="userli-postfix-bench-"))
        self.processes = Processes(self.work)
        self.results: list[Result] = []
        self.run_counter = 0
        self.scenarios = scenarios()

    # Backends

    def start_backends(self) -> None:
        self.redis_port = free_port()
        self.redis = self.processes.start(
            "redis",
            [
                "redis-server",
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.work),
            ],
        )
        wait_until(lambda: accepts(("127.0.0.1", self.redis_port)), "redis-server")
        self.userli_port = free_port()
        self.userli = self.processes.start(
            "fakeuserli",
            [
                str(self.tools["fakeuserli"]),
                "--port",
                str(self.userli_port),
                "--latency",
                str(self.args.latency),
                "--token",
                TOKEN,
                "--allow-anonymous",
            ],
        )
        wait_until(lambda: accepts(("127.0.0.1", self.userli_port)), "the fake Userli")

    def flush_redis(self) -> None:
        with socket.create_connection(("127.0.0.1", self.redis_port)) as s:
            s.sendall(b"*1\r\n$8\r\nFLUSHALL\r\n")
            s.recv(100)

    # Targets: each is a context that yields (addresses by protocol, pids)

    def daemon(
        self, workers: int, root: Path = ROOT, env: dict[str, str] | None = None
    ) -> Iterator[tuple[dict[str, Any], list[int]]]:
        """
        The daemon of the checkout at C{root} (this one, or a yardstick's),
        with C{env} added to its settings.
        """
        ports = {name: free_port() for name in ("socketmap", "policy", "sasl", "metrics")}
        extra = env or {}
        env = dict(os.environ)
        env.update(
            {
                "PYTHONPATH": os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(
                    os.pathsep
                ),
                "USERLI_TOKEN": TOKEN,
                "USERLI_BASE_URL": f"http://127.0.0.1:{self.userli_port}",
                "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "SOCKETMAP_LISTEN_ADDR": f"127.0.0.1:{ports['socketmap']}",
                "POLICY_LISTEN_ADDR": f"127.0.0.1:{ports['policy']}",
                "SASL_LISTEN_ADDR": f"127.0.0.1:{ports['sasl']}",
                "METRICS_LISTEN_ADDR": f"127.0.0.1:{ports['metrics']}",
                "WORKERS": str(workers),
                **extra,
            }
        )
        self.run_counter += 1
        name = f"daemon-{workers}-{self.run_counter}"
        log = self.work / f"{name}.log"
        process = self.processes.start(
            name,
            [
                sys.executable,
                "-c",
                "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
                "-n",
                "--pidfile=",
                "userli-postfix",
            ],
            env=env,
        )

        def up() -> bool:
            if process.poll() is not None:
                raise SystemExit(f"benchmark: the daemon exited:\n{log.read_text()[-3000:]}")
            text = log.read_text() if log.exists() else ""
            return text.count("socketmap listening on") >= workers

        wait_until(up, f"the daemon with {workers} worker(s)")
        wait_until(lambda: accepts(("127.0.0.1", ports["metrics"])), "the daemon's metrics port")
        try:
            pids = [process.pid, *children(process.pid)]
            addresses = {p: f"tcp:127.0.0.1:{ports[p]}" for p in ("socketmap", "policy", "sasl")}
            yield addresses, pids
        finally:
            self.processes.stop(process)

    def podop(self) -> Iterator[tuple[dict[str, Any], list[int]]]:
        python = podop_python()
        if python is None:
            return
        path = self.work / "podop.sock"
        base = f"http://127.0.0.1:{self.userli_port}/api/postfix"
        maps = ("alias", "domain", "mailbox", "senders")
        tables = [(m, "url", f"{base}/{m}/\u00a7") for m in maps]
        code = (
            "import warnings; warnings.simplefilter('ignore'); "
            "from podop import run_server; "
            f"run_server(0, 'postfix', {str(path)!r}, {tables!r})"
        )
        process = self.processes.start("podop", [str(python), "-c", code])
        wait_until(lambda: path.exists() and accepts(str(path)), "podop")
        try:
            yield {"socketmap": f"unix:{path}"}, [process.pid]
        finally:
            self.processes.stop(process)
            path.unlink(missing_ok=True)

    def responder(self) -> Iterator[tuple[dict[str, Any], list[int]]]:
        addresses: dict[str, Any] = {}
        pids = []
        started = []
        for protocol in ("socketmap", "policy", "sasl"):
            port = free_port()
            process = self.processes.start(
                f"responder-{protocol}",
                [str(self.tools["responder"]), "--port", str(port), "--protocol", protocol],
            )
            wait_until(lambda port=port: accepts(("127.0.0.1", port)), "the trivial responder")
            addresses[protocol] = f"tcp:127.0.0.1:{port}"
            pids.append(process.pid)
            started.append(process)
        try:
            yield addresses, pids
        finally:
            for process in started:
                self.processes.stop(process)

    def bare_twisted(self) -> Iterator[tuple[dict[str, Any], list[int]]]:
        port = free_port()
        process = self.processes.start(
            "bare-twisted", [sys.executable, str(HERE / "bare_twisted.py"), str(port)]
        )
        wait_until(lambda: accepts(("127.0.0.1", port)), "the bare Twisted responder")
        try:
            yield {"socketmap": f"tcp:127.0.0.1:{port}"}, [process.pid]
        finally:
            self.processes.stop(process)

    # Runs

    def load(
        self, target: str, scenario: Scenario, address: str, conns: int, pids: list[int]
    ) -> Result:
        self.run_counter += 1
        requests = self.work / f"{scenario.name}.requests"
        requests.write_text("\n".join(scenario.requests) + "\n")
        if scenario.protocol == "policy":
            self.flush_redis()
        command = [
            str(self.tools["loadgen"]),
            "--connect",
            address,
            "--protocol",
            scenario.protocol,
            "--requests",
            str(requests),
            "--conns",
            str(conns),
            "--duration",
            str(self.args.duration),
            "--warmup",
            str(self.args.warmup),
            "--pids",
            ",".join(str(p) for p in pids),
            # Unique keys stay unique across runs and targets.
            "--tag",
            f"r{os.getpid()}x{self.run_counter}x",
        ]
        if conns >= 100 and self.args.loadgen_procs > 1:
            command += ["--procs", str(self.args.loadgen_procs)]
        output = subprocess.run(command, capture_output=True, check=True, text=True).stdout
        raw = json.loads(output)
        cpu = sum(p["cpu_s"] for p in raw["processes"] if p["cpu_s"] >= 0)
        rss = max((p["rss_kb"] for p in raw["processes"]), default=0) / 1024
        result = Result(
            target=target,
            scenario=scenario.name,
            conns=conns,
            rps=raw["rps"],
            p50_ms=raw["p50_ms"],
            p99_ms=raw["p99_ms"],
            cpu_per_1000=cpu / raw["requests"] * 1000 if raw["requests"] else None,
            rss_mb=rss or None,
            replies={k: v for k, v in raw["replies"].items() if v},
            errors=raw["errors"],
            loadgen_cpu_s=raw["loadgen_cpu_s"],
            seconds=raw["seconds"],
            processes=raw["processes"],
        )
        self.results.append(result)
        print(format_row(result), flush=True)
        return result

    def run_target(
        self,
        target: str,
        context: Iterator[tuple[dict[str, Any], list[int]]],
        names: list[str],
        connections: list[int],
    ) -> None:
        for addresses, pids in context:
            for name in names:
                scenario = self.scenarios[name]
                if scenario.protocol not in addresses:
                    continue
                for conns in connections:
                    self.load(target, scenario, addresses[scenario.protocol], conns, pids)

    def run(self) -> None:
        args = self.args
        names = [n for n in args.scenarios.split(",") if n]
        connections = [int(c) for c in args.connections.split(",")]
        print(header(), flush=True)
        self.start_backends()
        targets = set(args.targets.split(","))
        if args.no_podop:
            targets.discard("podop")
        try:
            for target, root in compared(targets, args):
                self.run_target(target, self.daemon(1, root=root), names, connections)
            if "workers" in targets and args.workers > 1:
                self.run_target(
                    f"daemon x{args.workers}", self.daemon(args.workers), names, connections
                )
            if "podop" in targets:
                socketmap = [n for n in names if self.scenarios[n].protocol == "socketmap"]
                self.run_target("podop", self.podop(), socketmap, connections)
            ceiling = [c for c in connections if c >= 50] or connections[-1:]
            if "bare" in targets and "hot" in names:
                self.run_target("bare Twisted", self.bare_twisted(), ["hot"], ceiling)
            if "responder" in targets:
                self.run_target(
                    "trivial responder",
                    self.responder(),
                    [n for n in names if n in ("hot", "quota", "sasl")],
                    ceiling,
                )
        finally:
            self.processes.stopAll()
        report = render(self.results, args)
        print()
        print(report)
        RESULTS.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (RESULTS / f"RESULTS-{stamp}.md").write_text(report)
        (RESULTS / f"RESULTS-{stamp}.json").write_text(
            json.dumps([asdict(r) for r in self.results], indent=1)
        )
        print(f"\nwritten to {RESULTS / f'RESULTS-{stamp}.md'}")
        shutil.rmtree(self.work, ignore_errors=True)

    def postfix(self, messages: int) -> None:
        """The end-to-end scenario through a real Postfix (see L{benchmarks.postfix})."""
        from benchmarks import postfix

        print(postfix.HEADER, flush=True)
        self.start_backends()
        try:
            phases = postfix.PostfixScenario(self, messages).run(compared({"daemon"}, self.args))
        finally:
            self.processes.stopAll()
        report = postfix.render(phases, self.args.latency)
        print()
        print(report)
        RESULTS.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (RESULTS / f"POSTFIX-{stamp}.md").write_text(report)
        (RESULTS / f"POSTFIX-{stamp}.json").write_text(
            json.dumps([asdict(p) for p in phases], indent=1)
        )
        print(f"\nwritten to {RESULTS / f'POSTFIX-{stamp}.md'}")
        shutil.rmtree(self.work, ignore_errors=True)

    def soak(self, seconds: int) -> None:
        """Mixed load for C{seconds}; RSS of every daemon process every 30 s."""
        self.start_backends()
        try:
            for addresses, pids in self.daemon(self.args.workers):
                samples: list[str] = []
                hot, cold = self.scenarios["hot"], self.scenarios["cold"]
                quota, sasl = self.scenarios["quota"], self.scenarios["sasl"]
                started = time.monotonic()
                rounds = 0
                while time.monotonic() - started < seconds:
                    for scenario, conns in ((hot, 100), (cold, 50), (quota, 50), (sasl, 20)):
                        self.load("soak", scenario, addresses[scenario.protocol], conns, pids)
                    rounds += 1
                    rss = [
                        int(line.split()[1]) / 1024
                        for pid in pids
                        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith("VmRSS:")
                    ]
                    samples.append(
                        f"{time.monotonic() - started:6.0f} s  "
                        + "  ".join(f"{r:5.1f} MB" for r in rss)
                    )
                    print("RSS after round", rounds, samples[-1], flush=True)
                report = "\n".join(
                    [
                        f"Soak: {seconds} s of mixed load on the daemon "
                        f"({self.args.workers} process(es)); RSS per process after each round",
                        "",
                        *samples,
                    ]
                )
                print(report)
                RESULTS.mkdir(exist_ok=True)
                stamp = time.strftime("%Y%m%d-%H%M%S")
                (RESULTS / f"SOAK-{stamp}.txt").write_text(report + "\n")
        finally:
            self.processes.stopAll()
            shutil.rmtree(self.work, ignore_errors=True)


COLUMNS = (
    "target",
    "scenario",
    "conns",
    "req/s",
    "p50 ms",
    "p99 ms",
    "CPU-s/1000",
    "RSS MB",
    "generator CPU",
)


def header() -> str:
    return "| " + " | ".join(COLUMNS) + " | replies |\n|" + "---|" * (len(COLUMNS) + 1)


def format_row(r: Result) -> str:
    cpu = f"{r.cpu_per_1000:.3f}" if r.cpu_per_1000 is not None else "-"
    rss = f"{r.rss_mb:.0f}" if r.rss_mb else "-"
    total = sum(r.replies.values()) or 1
    replies = ", ".join(f"{k} {v * 100 / total:.0f}%" for k, v in r.replies.items())
    if r.errors:
        replies += f", {r.errors} connection errors"
    return (
        f"| {r.target} | {r.scenario} | {r.conns} | {r.rps:,.0f} | {r.p50_ms:.2f} | "
        f"{r.p99_ms:.2f} | {cpu} | {rss} | {r.loadgen_cpu_s * 100 / r.seconds:.0f}% | {replies} |"
    )


def series(
    results: list[Result], target: str, scenario: str, conns: int, attribute: str
) -> list[float]:
    """One figure of every run of C{target} in C{scenario} at C{conns} connections."""
    return [
        getattr(r, attribute)
        for r in results
        if (r.target, r.scenario, r.conns) == (target, scenario, conns) and getattr(r, attribute)
    ]


def render(results: list[Result], args: argparse.Namespace) -> str:
    """The Markdown report: the table, the ratios, the generator's ceiling."""
    titles = {s.name: s.title for s in scenarios().values()}
    lines = [
        "## Benchmark results",
        "",
        f"Fake Userli latency {args.latency * 1000:g} ms, local redis-server, "
        f"{args.duration:g} s per run after {args.warmup:g} s of warm-up, "
        f"{os.cpu_count()} CPU cores shared by everything; CPU-s/1000 is the CPU time of "
        "all the target's processes per 1000 requests, RSS the largest process's peak, "
        "generator CPU the load generator's share of one core during the run.",
        "",
        "Scenarios: " + "; ".join(f"`{name}` = {title}" for name, title in titles.items()),
        "",
        header(),
        *[format_row(r) for r in results],
    ]
    by_key = {(r.target, r.scenario, r.conns): r for r in results}
    ratios = []
    for r in results:
        if r.target.startswith("daemon"):
            peer = by_key.get(("podop", r.scenario, r.conns))
            if peer and peer.rps:
                ratios.append(
                    f"| {r.target} | {r.scenario} | {r.conns} | {r.rps / peer.rps:.1f}x | "
                    f"{peer.p99_ms / r.p99_ms if r.p99_ms else 0:.1f}x |"
                )
    if ratios:
        lines += [
            "",
            "Against podop (the same fake Userli; podop has no cache and opens a new HTTP "
            "connection per lookup):",
            "",
            "| target | scenario | conns | req/s vs podop | podop p99 / ours |",
            "|---|---|---|---|---|",
            *ratios,
        ]
    pairs = sorted({(r.scenario, r.conns) for r in results if r.target == "yardstick"})
    if pairs:
        lines += [
            "",
            f"Against the yardstick (another checkout's daemon, same session, "
            f"{args.rounds} round(s) in alternating order; medians):",
            "",
        ]
        for name, conns in pairs:
            ours = series(results, "daemon", name, conns, "cpu_per_1000")
            theirs = series(results, "yardstick", name, conns, "cpu_per_1000")
            if ours and theirs:
                rates = (
                    series(results, "daemon", name, conns, "rps"),
                    series(results, "yardstick", name, conns, "rps"),
                )
                lines.append(
                    f"- {name}, {conns} connections: CPU per request {change(ours, theirs)}, "
                    f"req/s {change(*rates)}"
                )
    ceiling = [r for r in results if r.target == "trivial responder"]
    if ceiling:
        lines += ["", "Load generator ceiling (against the trivial responder):", ""]
        for r in ceiling:
            protocol = scenarios()[r.scenario].protocol
            best = max(
                (
                    x.rps
                    for x in results
                    if x.target.startswith("daemon")
                    and scenarios()[x.scenario].protocol == protocol
                ),
                default=0,
            )
            times = f", {r.rps / best:.1f}x the daemon's best {protocol} rate" if best else ""
            lines.append(
                f"- {protocol}, {r.conns} connections: {r.rps:,.0f} req/s{times}; "
                f"the generator used {r.loadgen_cpu_s:.1f} CPU-s in the {args.duration:g} s"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs, fewer connections")
    parser.add_argument("--duration", type=float, help="seconds measured per run (10; quick: 3)")
    parser.add_argument("--warmup", type=float, help="seconds before measuring (2; quick: 1)")
    parser.add_argument("--connections", help="concurrent connections (1,10,50,200; quick: 10,50)")
    parser.add_argument(
        "--scenarios",
        default="hot,cold,quota,unlimited,sasl",
        help="which of hot, cold (socketmap), quota, unlimited (policy) and sasl to run",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes to compare")
    parser.add_argument("--latency", type=float, default=0.005, help="fake Userli latency, s")
    parser.add_argument(
        "--loadgen-procs",
        type=int,
        default=1,
        help="load generator processes at 100 connections and more (one is plenty on 2 cores)",
    )
    parser.add_argument(
        "--targets",
        default="daemon,workers,podop,bare,responder",
        help="what to run against: daemon (one process), workers, podop, bare (Twisted), "
        "responder (the generator's ceiling)",
    )
    parser.add_argument("--no-podop", action="store_true", help="leave the podop peer out")
    parser.add_argument("--soak", type=int, metavar="SECONDS", help="memory soak instead")
    parser.add_argument(
        "--postfix", action="store_true", help="mail through a real Postfix instead (as root)"
    )
    parser.add_argument(
        "--messages", type=int, default=200, help="messages per mix measured by --postfix"
    )
    parser.add_argument(
        "--yardstick",
        type=Path,
        metavar="DIR",
        help="also run the daemon of this checkout (e.g. a git worktree of an older commit) "
        "as 'yardstick' (one process), in the same session, for a fair comparison",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --yardstick: run the daemon and the yardstick this many times each, "
        "in alternating order, and compare the medians",
    )
    args = parser.parse_args()
    defaults = (3.0, 1.0, "10,50") if args.quick else (10.0, 2.0, "1,10,50,200")
    for name, default in zip(("duration", "warmup", "connections"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    for program in ("redis-server",):
        if shutil.which(program) is None:
            raise SystemExit(f"benchmark: {program} is needed (apt-get install redis-server)")
    bench = Bench(args)
    try:
        if args.soak:
            bench.soak(args.soak)
        elif args.postfix:
            bench.postfix(args.messages)
        else:
            bench.run()
    except KeyboardInterrupt:
        bench.processes.stopAll()
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
