#!/usr/bin/env python3
"""Core supervision benchmark: model-supervisor vs supervisord 4.3 vs circus 0.19.

    python bench/core_bench.py [--quick] [--out FILE] [--rows ROW,...] [--supervisors NAME,...]

Prints one JSON document to stdout (progress goes to stderr). All three supervisors run on
the same machine, in the same run, with the same work: `sleep` children, one program each.

* ours:        `python -m supervisor serve --conf-dir D --state-dir S --host 127.0.0.1 --port FREE`
               (sys.executable, from the repository root; a free port rather than 0 since the API
               is served), one TOML declaration per program;
* supervisord: `supervisor==4.3.0` in its own venv `bench/.peers/supervisord-venv` (its import
               name is also `supervisor`: it is never imported here), `supervisord -n -c conf`;
* circus:      `circus==0.19.0` in its own venv `bench/.peers/circus-venv`, `circusd conf.ini`.

The venvs are created (`python -m venv` + pip) on first run; bench/.peers/ is gitignored.
circus 0.19.0 installs and runs on Python 3.11 without a patch: pip resolves its pyzmq and
tornado requirements to current releases (validated: pyzmq 27.3.0, tornado 6.6.1), which are
pinned in PEER_PACKAGES so that a later run uses what was validated. Two circus quirks are
worked around, see Circus.daemon and the notes in the output.

Methodology (identical for the three):

* the daemon's children are read from /proc/<daemon>/task/*/children (what psutil's
  children() would return, without a scan of all of /proc per poll; psutil is the fallback
  when the kernel lacks CONFIG_PROC_CHILDREN). A child "runs" once it has exec'd its command.
* this process makes itself a child subreaper (PR_SET_CHILD_SUBREAPER), so anything a
  daemon leaves behind is re-parented to us, can be found, killed and reaped. A zombie counts
  as gone.
* every daemon is stopped in a `finally`: SIGTERM, then SIGKILL of its process group and of
  every pid (checked against its start time) seen under it, then a sweep of our own children.

Rows: restart_ms, cold_start_100_ms, cold_start_300_ms, stop_all_100_ms, idle_cpu_percent,
rss_mib, term_ignoring_stop_ms, grandchild_survives_stop, term_at_startup_children_left.
See ROW_DOCS and TARGETS below, and bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, free_port

PEERS_DIR = REPO / "bench" / ".peers"
SLEEP = shutil.which("sleep") or "/bin/sleep"
SH = "/bin/sh" if os.path.exists("/bin/sh") else (shutil.which("sh") or "sh")

OURS, SUPERVISORD, CIRCUS = "model-supervisor", "supervisord", "circus"
ALL_SUPERVISORS = (OURS, SUPERVISORD, CIRCUS)

#: What gets pip-installed into each peer venv. pyzmq/tornado: what pip resolved for circus
#: 0.19.0 on Python 3.11 when this script was validated, pinned for reproducibility.
PEER_PACKAGES = {
    SUPERVISORD: ["supervisor==4.3.0"],
    CIRCUS: ["circus==0.19.0", "pyzmq==27.3.0", "tornado==6.6.1"],
}
PEER_VENVS = {SUPERVISORD: PEERS_DIR / "supervisord-venv", CIRCUS: PEERS_DIR / "circus-venv"}

#: Seconds between "every child runs" and the SIGTERM in the stop rows: stopping is measured on
#: a daemon that has finished starting (term_at_startup is the row for the other case). Plus a
#: random 0-1 s, so that the SIGTERM lands at a random phase of a 1 s poll loop (supervisord
#: only notices a signal when its poll() times out; a fixed settle would always hit the same
#: phase and make its stop time look constant).
SETTLE_BEFORE_STOP = 1.0


def settle_before_stop() -> None:
    time.sleep(SETTLE_BEFORE_STOP + random.uniform(0.0, 1.0))


#: circus' own default for `[circus] check_delay` when read from an ini file (config.py).
CIRCUS_DEFAULT_CHECK_DELAY = 5.0
CIRCUS_FAST_CHECK_DELAY = 0.1

ROW_DOCS = {
    "restart_ms": "SIGKILL the only child; ms until a new child pid appears under the daemon (1 ms polls); "
    "zero restart delay configured",
    "cold_start_100_ms": "ms from launching the daemon until 100 programs each have a running child (10 ms polls)",
    "cold_start_300_ms": "ms from launching the daemon until 300 programs each have a running child (10 ms polls)",
    "stop_all_100_ms": "100 running; SIGTERM to the daemon; ms until every child is gone and the daemon exited",
    "idle_cpu_percent": "200 idle instances: daemon user+system CPU (all its threads, not the children) / wall, "
    "% of one core",
    "rss_mib": "RSS of the daemon process alone at the end of the idle window, MiB",
    "term_ignoring_stop_ms": "one child that ignores SIGTERM, stop timeout 2 s; SIGTERM to the daemon; "
    "ms until the child is gone",
    "grandchild_survives_stop": "default settings; the child forks a grandchild then execs; SIGTERM to the daemon, "
    "wait 3 s: is the grandchild still alive?",
    "term_at_startup_children_left": "1 program; SIGTERM to the daemon as soon as its first child runs (2 ms "
    "polls); children still running 3 s later (daemon_exited says whether it "
    "exited within 15 s)",
}
TARGETS = {
    "restart_ms": "median < 10 ms",
    "cold_start_100_ms": "(no target; 300 instances under 1 s)",
    "cold_start_300_ms": "median < 1000 ms",
    "stop_all_100_ms": "median < 100 ms (children gone and daemon exited)",
    "idle_cpu_percent": "<= supervisord",
    "rss_mib": "< 64 MiB",
    "term_ignoring_stop_ms": "child gone within 2020 ms (every sample)",
    "grandchild_survives_stop": "false (no grandchild ever survives)",
    "term_at_startup_children_left": "0 in every sample, and the daemon exits",
}
ROW_ORDER = list(ROW_DOCS)


def log(msg: str) -> None:
    print(f"[core_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------------------------
# /proc helpers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stat:
    pid: int
    comm: str
    state: str
    ppid: int
    starttime: int

    @property
    def dead(self) -> bool:
        return self.state in ("Z", "X")


def read_stat(pid: int) -> Stat | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    try:
        lp, rp = text.index("("), text.rindex(")")
        rest = text[rp + 2 :].split()
        return Stat(pid, text[lp + 1 : rp], rest[0], int(rest[1]), int(rest[19]))
    except (ValueError, IndexError):
        return None


def alive(pid: int, starttime: int | None = None) -> bool:
    """Exists, is not a zombie and (if given) is the same process (pid reuse)."""
    st = read_stat(pid)
    if st is None or st.dead:
        return False
    return starttime is None or st.starttime == starttime


def read_cmdline(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def thread_stats(pid: int) -> dict[int, tuple[str, int, int]]:
    """tid -> (thread name, context switches, CPU ns from schedstat) for every live thread."""
    out = {}
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            base = f"/proc/{pid}/task/{tid}"
            try:
                with open(f"{base}/comm") as f:
                    name = f.read().strip()
                switches = 0
                with open(f"{base}/status") as f:
                    for line in f:
                        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                            switches += int(line.split()[1])
                with open(f"{base}/schedstat") as f:
                    ns = int(f.read().split()[0])
            except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
                continue
            out[int(tid)] = (f"{name} (main)" if int(tid) == pid else name, switches, ns)
    return out


def ignores_sigterm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return False


_HAVE_CHILDREN_FILE = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def child_pids(pid: int) -> set[int]:
    """Direct children of `pid` (zombies included), from every thread's children file."""
    if not _HAVE_CHILDREN_FILE:
        import psutil

        try:
            return {c.pid for c in psutil.Process(pid).children()}
        except psutil.Error:
            return set()
    out: set[int] = set()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                data = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out.update(int(x) for x in data.split())
    return out


def descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in child_pids(todo.pop()):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def make_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


#: pids of daemons we run through subprocess.Popen: never waitpid() them behind its back.
_POPEN_PIDS: set[int] = set()


def sweep_orphans(kill: bool = True) -> list[str]:
    """Kill (optionally) and reap every child of ours that is not a running daemon's Popen.

    As subreaper we inherit whatever a daemon leaves behind. Returns a description of the
    live processes that were found (and killed).
    """
    found = []
    me = os.getpid()
    for _ in range(50):
        leftovers = [p for p in child_pids(me) if p not in _POPEN_PIDS]
        if not leftovers:
            break
        for pid in leftovers:
            st = read_stat(pid)
            if st is None:
                continue
            if not st.dead and kill:
                found.append(f"{pid} ({st.comm})")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        if not kill:
            break
        time.sleep(0.02)
    return found


def pctl(samples: list[float], q: float) -> float:
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[int(q) - 1]


def summary(samples: list[float], digits: int = 1, **extra) -> dict:
    return {
        "median": round(statistics.median(samples), digits),
        "p95": round(pctl(samples, 95), digits),
        "min": round(min(samples), digits),
        "max": round(max(samples), digits),
        "n": len(samples),
        "samples": [round(s, digits) for s in samples],
        **extra,
    }


# --------------------------------------------------------------------------------------------
# Peer installation
# --------------------------------------------------------------------------------------------


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _installed_versions(venv: Path) -> dict[str, str]:
    out = subprocess.run(
        [str(_venv_python(venv)), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if out.returncode != 0:
        return {}
    return {p["name"].lower(): p["version"] for p in json.loads(out.stdout)}


def ensure_peer(name: str) -> dict[str, str]:
    """Create the peer's venv and install its packages if needed; return its package versions."""
    venv = PEER_VENVS[name]
    wanted = {spec.split("==")[0].lower(): spec.split("==")[1] for spec in PEER_PACKAGES[name]}
    if _venv_python(venv).exists():
        have = _installed_versions(venv)
        if all(have.get(k) == v for k, v in wanted.items()):
            return have
    log(f"setting up {name} in {venv} ({' '.join(PEER_PACKAGES[name])})")
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    if not _venv_python(venv).exists():
        # The base interpreter, not ours: a venv of a venv would see nothing of ours anyway,
        # but say so explicitly.
        base = getattr(sys, "_base_executable", sys.executable)
        r = subprocess.run([base, "-m", "venv", str(venv)], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise BenchError(f"creating {venv} failed:\n{r.stderr}")
    r = subprocess.run(
        [
            str(_venv_python(venv)),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            *PEER_PACKAGES[name],
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise BenchError(
            f"pip install {' '.join(PEER_PACKAGES[name])} into {venv} failed:\n{r.stderr[-3000:]}"
        )
    have = _installed_versions(venv)
    bad = {k: have.get(k) for k, v in wanted.items() if have.get(k) != v}
    if bad:
        raise BenchError(f"{venv}: wrong versions after install: {bad}")
    return have


# --------------------------------------------------------------------------------------------
# The three supervisors
# --------------------------------------------------------------------------------------------


@dataclass
class Program:
    name: str
    argv: list[str]
    #: True: auto-restart with zero delay and `stop_timeout`; False: the supervisor's defaults.
    tuned: bool = True
    stop_timeout: float = 2.0


class Daemon:
    """One running supervisor daemon, its temp dir and every pid seen under it."""

    def __init__(
        self, label: str, workdir: Path, argv: list[str], cwd: Path, env: dict | None = None
    ) -> None:
        self.label = label
        self.workdir = workdir
        self.argv = argv
        self.cwd = cwd
        self.env = env
        self.popen: subprocess.Popen | None = None
        self.t_launch = 0.0
        self.seen: dict[int, int] = {}  # pid -> starttime, for the cleanup
        self.output = workdir / "daemon-output.log"
        self._own_cmdline: bytes | None = None
        self.grace = 15.0  # how long stop() waits after its SIGTERM before SIGKILL

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> Daemon:
        with open(self.output, "wb") as out:
            self.t_launch = time.perf_counter()
            self.popen = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _POPEN_PIDS.add(self.popen.pid)
        return self

    def exited(self) -> bool:
        return self.popen is not None and self.popen.poll() is not None

    def children(self) -> set[int]:
        kids = child_pids(self.pid)
        for pid in kids:
            if pid not in self.seen:
                st = read_stat(pid)
                if st is not None:
                    self.seen[pid] = st.starttime
        return kids

    def execd(self, pid: int) -> bool:
        """A forked child has the daemon's command line until it execs its own."""
        if self._own_cmdline is None:
            self._own_cmdline = read_cmdline(self.pid)
        mine = read_cmdline(pid)
        return mine is not None and mine != self._own_cmdline

    def remember(self, pid: int) -> None:
        st = read_stat(pid)
        if st is not None:
            self.seen[pid] = st.starttime

    def running(self, pred=None, cache: dict[int, bool] | None = None) -> set[int]:
        """Live children that have exec'd their command (comm is not the daemon's python).

        `pred(pid)` may add a condition. `cache` remembers pids already confirmed.
        """
        ok = set()
        for pid in self.children():
            if cache is not None and cache.get(pid):
                if alive(pid, self.seen.get(pid)):
                    ok.add(pid)
                continue
            st = read_stat(pid)
            if st is None or st.dead or not self.execd(pid):
                continue
            if pred is not None and not pred(pid):
                continue
            ok.add(pid)
            if cache is not None:
                cache[pid] = True
        return ok

    def wait_running(self, n: int, timeout: float = 120.0, pred=None, interval: float = 0.01) -> set[int]:
        cache: dict[int, bool] = {}
        deadline = time.perf_counter() + timeout
        while True:
            now = self.running(pred, cache)
            if len(now) >= n:
                return now
            if self.exited():
                raise BenchError(
                    f"{self.label} exited with {self.popen.returncode} before {n} children ran "
                    f"({len(now)} did){self.tail()}"
                )
            if time.perf_counter() > deadline:
                raise BenchError(
                    f"{self.label}: only {len(now)}/{n} children running after {timeout:g} s{self.tail()}"
                )
            time.sleep(interval)

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            text = self.output.read_text(errors="replace").splitlines()[-lines:]
            return "\n  daemon output (tail):\n    " + "\n    ".join(text)
        return ""

    def stop(self, grace: float | None = None) -> list[str]:
        """SIGTERM, wait, SIGKILL the group and every pid seen; returns what had to be killed."""
        grace = self.grace if grace is None else grace
        killed = []
        if self.popen is None:
            return killed
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                killed.append(f"{self.label} daemon {self.pid} (no exit {grace:g} s after SIGTERM)")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        _POPEN_PIDS.discard(self.pid)
        for pid, start in self.seen.items():
            if alive(pid, start):
                killed.append(f"{self.label} child {pid}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        killed += [f"orphan {x}" for x in sweep_orphans()]
        return killed


class Supervisor:
    label = "?"

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch

    def new_workdir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{self.label}-", dir=self.scratch))

    def daemon(self, programs: list[Program], **opts) -> Daemon:
        raise NotImplementedError


def _toml(value) -> str:
    return json.dumps(value)  # a JSON string / list of strings / number is valid TOML here


class Ours(Supervisor):
    label = OURS

    def daemon(self, programs: list[Program], **opts) -> Daemon:
        work = self.new_workdir()
        conf, state = work / "conf.d", work / "state"
        conf.mkdir()
        for p in programs:
            lines = [f"name = {_toml(p.name)}", 'backend = "process"', f"command = {_toml(p.argv)}"]
            if p.tuned:
                lines += [
                    "",
                    "[restart]",
                    "initial_delay = 0.0",
                    "jitter = 0.0",
                    "max_retries = 0",
                    "",
                    "[stop]",
                    f"timeout = {float(p.stop_timeout)}",
                ]
            (conf / f"{p.name}.toml").write_text("\n".join(lines) + "\n")
        # A free port rather than `--port 0`: once the API is served, Sanic may read 0 as "its
        # default" (8000) and collide with anything else on the machine.
        argv = [
            sys.executable,
            "-m",
            "supervisor",
            "serve",
            "--conf-dir",
            str(conf),
            "--state-dir",
            str(state),
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_SUPERVISOR_")}
        return Daemon(self.label, work, argv, REPO, env)


class Supervisord(Supervisor):
    label = SUPERVISORD

    def daemon(self, programs: list[Program], **opts) -> Daemon:
        work = self.new_workdir()
        (work / "childlogs").mkdir()
        lines = [
            "[unix_http_server]",
            f"file = {work / 'supervisor.sock'}",
            "",
            "[supervisord]",
            f"logfile = {work / 'supervisord.log'}",
            f"pidfile = {work / 'supervisord.pid'}",
            f"childlogdir = {work / 'childlogs'}",
            "nodaemon = true",
            "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "",
            "[supervisorctl]",
            f"serverurl = unix://{work / 'supervisor.sock'}",
            "",
        ]
        for p in programs:
            cmd = shlex.join(p.argv).replace("%", "%%")
            lines += [f"[program:{p.name}]", f"command = {cmd}"]
            if p.tuned:
                lines += [
                    "autorestart = true",
                    "startsecs = 0",
                    "startretries = 1000",
                    f"stopwaitsecs = {p.stop_timeout:g}",
                ]
            lines.append("")
        conf = work / "supervisord.conf"
        conf.write_text("\n".join(lines))
        exe = PEER_VENVS[SUPERVISORD] / "bin" / "supervisord"
        return Daemon(self.label, work, [str(exe), "-n", "-c", str(conf)], work)


class Circus(Supervisor):
    label = CIRCUS

    def daemon(self, programs: list[Program], check_delay: float | None = None, **opts) -> Daemon:
        work = self.new_workdir()
        lines = [
            "[circus]",
            f"endpoint = tcp://127.0.0.1:{free_port()}",
            f"pubsub_endpoint = tcp://127.0.0.1:{free_port()}",
            # No `statsd = false`/`httpd = false`: circus 0.19 reads those with bool("false"),
            # i.e. True, and would start circusd-stats as a 101st child. Both default to off.
        ]
        if check_delay is not None:
            lines.append(f"check_delay = {check_delay:g}")
        lines.append("")
        for p in programs:
            lines += [f"[watcher:{p.name}]", f"cmd = {shlex.join(p.argv)}", "numprocesses = 1"]
            if p.tuned:
                lines += ["respawn = true", f"graceful_timeout = {p.stop_timeout:g}"]
            lines.append("")
        conf = work / "circus.ini"
        conf.write_text("\n".join(lines))
        exe = PEER_VENVS[CIRCUS] / "bin" / "circusd"
        return Daemon(self.label, work, [str(exe), str(conf)], work)


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, quick: bool, scratch: Path) -> None:
        self.quick = quick
        self.scratch = scratch
        self.notes: list[str] = []
        self.anomalies: list[str] = []
        self.helpers = scratch / "helpers"
        self.helpers.mkdir()
        self.ignore_term = self.helpers / "ignore_term.py"
        self.ignore_term.write_text(
            "import signal\nimport time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(100000)\n"
        )
        self.grandchild = self.helpers / "grandchild.sh"
        self.grandchild.write_text(f"{SLEEP} 100000 &\nexec {SLEEP} 100001\n")

    # -- plumbing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self, sup: Supervisor, programs: list[Program], **opts):
        d = sup.daemon(programs, **opts)
        try:
            d.start()
            yield d
        finally:
            killed = d.stop()
            if killed:
                msg = f"{d.label}: cleanup had to SIGKILL: {', '.join(killed[:10])}" + (
                    f" (+{len(killed) - 10} more)" if len(killed) > 10 else ""
                )
                log(msg)
                self.anomalies.append(msg)
            shutil.rmtree(d.workdir, ignore_errors=True)

    def sleepers(self, n: int) -> list[Program]:
        return [Program(f"p{i:03d}", [SLEEP, "100000"]) for i in range(1, n + 1)]

    # -- rows ----------------------------------------------------------------------------------
    def restart(self, sup: Supervisor, samples: int, spread: float = 1.0, **opts) -> dict:
        """`spread`: the pause before each kill is uniform over [0.1, 0.1 + spread] s, so the kill
        lands at a random phase of a supervisor's poll loop (1 s: supervisord's; circus' default
        check_delay is 5 s). Without it, a kill shortly after each restart would always see the
        same phase."""
        out: list[float] = []
        with self.running(sup, self.sleepers(1), **opts) as d:
            d.wait_running(1, timeout=60)
            for i in range(samples):
                time.sleep(random.uniform(0.1, 0.1 + spread))
                target = next(iter(d.wait_running(1, timeout=60)))
                before = d.children()
                t0 = time.perf_counter()
                os.kill(target, signal.SIGKILL)
                deadline = t0 + 30
                while True:
                    new = d.children() - before
                    if new:
                        out.append((time.perf_counter() - t0) * 1000)
                        break
                    if d.exited():
                        raise BenchError(f"{d.label} exited during the restart test{d.tail()}")
                    if time.perf_counter() > deadline:
                        raise BenchError(f"{d.label}: no new child 30 s after SIGKILL of {target}{d.tail()}")
                    time.sleep(0.001)
            # Let the last restart finish its exec before the daemon is stopped: circus 0.19 hangs
            # (does not exit on SIGTERM) when the signal lands between a respawn's fork and exec.
            d.wait_running(1, timeout=60)
        return summary(out)

    def cold_start(self, sup: Supervisor, n: int) -> tuple[float, dict]:
        with self.running(sup, self.sleepers(n)) as d:
            d.wait_running(n, timeout=120, interval=0.01)
            ms = (time.perf_counter() - d.t_launch) * 1000
            # Not measured: let the daemon finish starting before it is stopped (circus 0.19 may
            # ignore a SIGTERM that arrives while it is still spawning).
            time.sleep(0.5)
        return ms, {}

    def stop_all(self, sup: Supervisor, n: int) -> tuple[float, dict]:
        with self.running(sup, self.sleepers(n)) as d:
            d.wait_running(n, timeout=120)
            settle_before_stop()
            kids = [(pid, d.seen[pid]) for pid in sorted(d.children()) if alive(pid)]
            if len(kids) != n:
                raise BenchError(
                    f"{d.label}: {len(kids)} children, expected {n}: "
                    f"{[read_cmdline(p) for p, _ in kids][:5]}..."
                )
            t0 = time.perf_counter()
            os.kill(d.pid, signal.SIGTERM)
            t_kids = t_daemon = None
            deadline = t0 + 60
            while t_kids is None or t_daemon is None:
                now = time.perf_counter()
                if t_kids is None:
                    # Only re-check from the first one still alive: a poll costs a few reads,
                    # not 100, so the poller does not compete with the daemon for the CPU.
                    while kids and not alive(*kids[-1]):
                        kids.pop()
                    if not kids:
                        t_kids = now
                if t_daemon is None and d.exited():
                    t_daemon = now
                if now > deadline:
                    raise BenchError(
                        f"{d.label}: stop-all not done after 60 s ({len(kids)} children left, "
                        f"daemon exited: {d.exited()}){d.tail()}"
                    )
                time.sleep(0.001)
            rc = d.popen.returncode
        ms = (max(t_kids, t_daemon) - t0) * 1000
        return ms, {
            "children_gone_ms": round((t_kids - t0) * 1000, 1),
            "daemon_exit_ms": round((t_daemon - t0) * 1000, 1),
            "exit_code": rc,
        }

    def idle(self, sup: Supervisor, n: int, window: float, settle: float) -> dict:
        import psutil

        with self.running(sup, self.sleepers(n)) as d:
            before = d.wait_running(n, timeout=120)
            time.sleep(settle)
            proc = psutil.Process(d.pid)
            ts0 = thread_stats(d.pid)
            c0, w0 = proc.cpu_times(), time.perf_counter()
            time.sleep(window)
            c1, w1 = proc.cpu_times(), time.perf_counter()
            ts1 = thread_stats(d.pid)
            rss = proc.memory_info().rss
            threads = proc.num_threads()
            after = d.running()
        wall = w1 - w0
        cpu = max(0.0, (c1.user + c1.system - c0.user - c0.system) / wall * 100)
        # Diagnostics: per-thread wake-ups (context switches) per second and ns-resolution CPU
        # (psutil's user+system have 10 ms resolution); threads that exited in the window are
        # missing from these two, not from cpu_percent.
        wake: dict[str, float] = {}
        ns = 0
        for tid, (name, sw, run) in ts1.items():
            sw0, run0 = (ts0[tid][1], ts0[tid][2]) if tid in ts0 else (0, 0)
            wake[name] = wake.get(name, 0.0) + (sw - sw0) / wall
            ns += run - run0
        extra = {
            "window_s": round(wall, 2),
            "threads": threads,
            "cpu_percent_schedstat": round(ns / 1e9 / wall * 100, 3),
            "wakeups_per_s": round(sum(wake.values()), 1),
            "wakeups_per_s_by_thread": {
                k: round(v, 1) for k, v in sorted(wake.items(), key=lambda kv: -kv[1])
            },
        }
        if after != before:
            msg = (
                f"{sup.label}: the set of running children changed during the idle window "
                f"({len(before - after)} gone, {len(after - before)} new)"
            )
            self.anomalies.append(msg)
            extra["children_changed"] = True
        return {"cpu_percent": round(cpu, 3), "rss_mib": round(rss / 2**20, 1), **extra}

    def term_ignoring(self, sup: Supervisor) -> tuple[float, dict]:
        prog = Program("p001", [sys.executable, "-I", str(self.ignore_term)], tuned=True, stop_timeout=2.0)
        with self.running(sup, [prog]) as d:
            child = next(iter(d.wait_running(1, timeout=60, pred=ignores_sigterm, interval=0.005)))
            start = d.seen[child]
            settle_before_stop()
            t0 = time.perf_counter()
            os.kill(d.pid, signal.SIGTERM)
            t_child = t_daemon = None
            deadline = t0 + 60
            while t_child is None or t_daemon is None:
                now = time.perf_counter()
                if t_child is None and not alive(child, start):
                    t_child = now
                if t_daemon is None and d.exited():
                    t_daemon = now
                if now > deadline:
                    raise BenchError(
                        f"{d.label}: TERM-ignoring child {child} still there 60 s after SIGTERM "
                        f"(daemon exited: {d.exited()}){d.tail()}"
                    )
                time.sleep(0.001)
        return (t_child - t0) * 1000, {"daemon_exit_ms": round((t_daemon - t0) * 1000, 1)}

    def grandchild_survives(self, sup: Supervisor) -> dict:
        prog = Program("p001", [SH, str(self.grandchild)], tuned=False)
        with self.running(sup, [prog]) as d:
            found: list[tuple[int, int]] = []

            def has_grandchild(pid: int) -> bool:
                st = read_stat(pid)
                if st is None or st.comm != "sleep":  # the child has exec'd `sleep 100001`
                    return False
                for g in descendants(pid):
                    gs = read_stat(g)
                    if gs is not None and gs.comm == "sleep" and not gs.dead:
                        found.append((g, gs.starttime))
                        d.seen[g] = gs.starttime
                        return True
                return False

            child = next(iter(d.wait_running(1, timeout=60, pred=has_grandchild, interval=0.005)))
            gpid, gstart = found[-1]
            settle_before_stop()
            t0 = time.perf_counter()
            os.kill(d.pid, signal.SIGTERM)
            try:
                d.popen.wait(60)
            except subprocess.TimeoutExpired:
                raise BenchError(f"{d.label} did not exit 60 s after SIGTERM{d.tail()}") from None
            exit_ms = (time.perf_counter() - t0) * 1000
            child_alive = alive(child, d.seen.get(child))
            time.sleep(3.0)
            survived = alive(gpid, gstart)
            child_alive_3s = alive(child, d.seen.get(child))
            if survived:
                os.kill(gpid, signal.SIGKILL)
                deadline = time.perf_counter() + 2.0
                while alive(gpid, gstart) and time.perf_counter() < deadline:
                    time.sleep(0.005)
                d.seen.pop(gpid, None)  # killed on purpose: not a cleanup anomaly
            if child_alive_3s:  # the daemon exited without stopping its own child: a bug, not a default
                self.anomalies.append(
                    f"{d.label}: exited on SIGTERM ({exit_ms:.0f} ms) but its child {child} "
                    "was still running 3 s later"
                )
            # d.stop() (leaving the block) kills and reaps whatever is left, the child included.
        return {
            "survived": survived,
            "daemon_exit_ms": round(exit_ms, 1),
            "child_alive_after_exit": child_alive,
            "child_alive_after_3s": child_alive_3s,
        }

    def term_at_startup(self, sup: Supervisor, n: int) -> tuple[float, dict]:
        with self.running(sup, self.sleepers(n)) as d:
            d.wait_running(1, timeout=60, interval=0.002)
            t0 = time.perf_counter()
            os.kill(d.pid, signal.SIGTERM)
            try:
                d.popen.wait(15)
                exit_ms = round((time.perf_counter() - t0) * 1000, 1)
            except subprocess.TimeoutExpired:
                exit_ms = None
            time.sleep(max(0.0, t0 + 3.0 - time.perf_counter()))
            d.children()  # record late spawns too
            left = sorted(p for p, start in d.seen.items() if alive(p, start))
            if left:
                what = "exited" if exit_ms is not None else "did not exit within 15 s"
                self.anomalies.append(
                    f"term_at_startup / {d.label}: {len(left)} child(ren) still running 3 s "
                    f"after a SIGTERM at start-up; the daemon {what} "
                    f"(exit code {d.popen.returncode})"
                )
            d.grace = 3.0  # a daemon that ignored the TERM need not be waited for long again
            rc = d.popen.returncode
        return float(len(left)), {
            "daemon_exited": exit_ms is not None,
            "daemon_exit_ms": exit_ms,
            "exit_code": rc,
        }


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def machine_info(peer_versions: dict[str, dict[str, str]], load_at_start: list[float]) -> dict:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def output(cmd: list[str]) -> str:
        with contextlib.suppress(OSError):
            return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()
        return ""

    ours_version = output([sys.executable, "-m", "supervisor", "--version"])
    commit = output(["git", "rev-parse", "--short", "HEAD"])
    # Read-only: --no-optional-locks keeps `status` from refreshing the index under others' feet.
    dirty = output(["git", "--no-optional-locks", "status", "--porcelain", "--", "supervisor"])
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "mem_mib": mem,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "model_supervisor": {
            "version": ours_version.removeprefix("model-supervisor ").strip(),
            "commit": commit + ("+dirty" if dirty else ""),
        },
        "supervisord": peer_versions.get(SUPERVISORD, {}).get("supervisor"),
        "circus": {k: peer_versions.get(CIRCUS, {}).get(k) for k in ("circus", "pyzmq", "tornado", "psutil")},
        "loadavg_at_start": load_at_start,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "nofile_soft_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "children_source": "/proc/PID/task/*/children" if _HAVE_CHILDREN_FILE else "psutil children()",
    }


def _ratio(a, b):
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def _key_value(cell):
    """The comparable number(s) of one cell: {median, p95} or a scalar."""
    if isinstance(cell, dict):
        if "error" in cell:
            return None
        if "median" in cell:
            return {"median": cell["median"], "p95": cell["p95"]}
        if "value" in cell:
            return cell["value"]
    return cell


def ratio_of(ours, peer):
    a, b = _key_value(ours), _key_value(peer)
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _ratio(a[k], b[k]) for k in ("median", "p95")}
    return _ratio(a, b)


def target_met(row: str, cells: dict):
    ours = _key_value(cells.get(OURS))
    if ours is None:
        return None
    med = ours["median"] if isinstance(ours, dict) else ours
    maxv = cells[OURS].get("max", med) if isinstance(cells.get(OURS), dict) else med
    if row == "restart_ms":
        return med < 10
    if row == "cold_start_300_ms":
        return med < 1000
    if row == "stop_all_100_ms":
        return med < 100
    if row == "idle_cpu_percent":
        sd = _key_value(cells.get(SUPERVISORD))
        return None if sd is None else med <= sd
    if row == "rss_mib":
        return med < 64
    if row == "term_ignoring_stop_ms":
        return maxv <= 2020
    if row == "grandchild_survives_stop":
        return med is False
    if row == "term_at_startup_children_left":
        cell = cells[OURS]
        return cell.get("max", med) == 0 and all(x.get("daemon_exited") for x in cell.get("detail", []))
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples, 5 s idle window (about 3 minutes)")
    ap.add_argument("--out", type=Path, help="also write the JSON document to FILE")
    ap.add_argument("--rows", help=f"comma-separated subset of: {','.join(ROW_ORDER)}")
    ap.add_argument("--supervisors", help=f"comma-separated subset of: {','.join(ALL_SUPERVISORS)}")
    args = ap.parse_args(argv)

    rows = ROW_ORDER if not args.rows else [r.strip() for r in args.rows.split(",") if r.strip()]
    rows = sorted(set(rows), key=lambda r: ROW_ORDER.index(r) if r in ROW_ORDER else -1)
    for r in rows:
        if r not in ROW_DOCS:
            ap.error(f"unknown row {r!r}")
    wanted = (
        ALL_SUPERVISORS if not args.supervisors else tuple(s.strip() for s in args.supervisors.split(","))
    )
    for s in wanted:
        if s not in ALL_SUPERVISORS:
            ap.error(f"unknown supervisor {s!r}")
    if sys.platform != "linux":
        print("core_bench: Linux only (/proc, pidfds, subreaper)", file=sys.stderr)
        return 2
    try:
        import psutil  # noqa: F401
    except ImportError:
        print("core_bench: needs psutil in this interpreter (pip install psutil)", file=sys.stderr)
        return 2

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8192:
        new = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    subreaper = make_subreaper()

    quick = args.quick
    n_restart = 5 if quick else 20
    n_rep = 1 if quick else 5
    idle_window = 5.0 if quick else 30.0
    idle_settle = 1.0 if quick else 3.0

    t_begin = time.perf_counter()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    if load_at_start[0] > 0.5 * (os.cpu_count() or 1):
        log(
            f"warning: load average {load_at_start} on {os.cpu_count()} CPUs: other work will skew the numbers"
        )
    peer_versions: dict[str, dict[str, str]] = {}
    notes: list[str] = []
    setup_errors: dict[str, str] = {}
    for peer in (SUPERVISORD, CIRCUS):
        if peer not in wanted:
            continue
        try:
            peer_versions[peer] = ensure_peer(peer)
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            setup_errors[peer] = str(exc)
            log(f"ERROR: {peer} is not available: {exc}")
            notes.append(f"{peer} could not be set up: {str(exc)[:500]}")

    scratch = Path(tempfile.mkdtemp(prefix="core_bench-"))
    bench = Bench(quick, scratch)
    sups = {OURS: Ours(scratch), SUPERVISORD: Supervisord(scratch), CIRCUS: Circus(scratch)}
    active = [s for s in wanted if s not in setup_errors]
    results: dict[str, dict] = {r: {} for r in rows}

    def attempt(row: str, label: str, fn):
        log(f"{row}: {label} ...")
        try:
            value = fn()
        except BenchError as exc:
            log(f"ERROR in {row} / {label}: {exc}")
            lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
            bench.anomalies.append(
                f"{row} / {label}: {lines[0]}" + (f" [...] {lines[-1]}" if len(lines) > 1 else "")
            )
            return {"error": str(exc).split("\n")[0]}
        except Exception as exc:
            log(f"ERROR in {row} / {label}: {exc!r}\n{traceback.format_exc()}")
            bench.anomalies.append(f"{row} / {label}: {exc!r}")
            return {"error": repr(exc)}
        log(f"{row}: {label} -> {json.dumps(value)[:300]}")
        return value

    def repeated(fn, n: int):
        def run():
            vals, extras = [], []
            for _ in range(n):
                v, extra = fn()
                vals.append(v)
                extras.append(extra)
            out = summary(vals)
            if any(extras):
                out["detail"] = extras
            return out

        return run

    def jobs(row: str, s: str) -> list[tuple[str, str, object]]:
        """(result key, label, measurement) for one row and one supervisor."""
        sup = sups[s]
        fast_key = f"circus_check_delay_{CIRCUS_FAST_CHECK_DELAY:g}"
        if row == "restart_ms" and s == CIRCUS:
            return [
                (
                    CIRCUS,
                    f"circus check_delay={CIRCUS_DEFAULT_CHECK_DELAY:g} (default)",
                    functools.partial(bench.restart, sup, n_restart, spread=CIRCUS_DEFAULT_CHECK_DELAY),
                ),
                (
                    fast_key,
                    f"circus check_delay={CIRCUS_FAST_CHECK_DELAY:g}",
                    functools.partial(bench.restart, sup, n_restart, check_delay=CIRCUS_FAST_CHECK_DELAY),
                ),
            ]
        fn = {
            "restart_ms": functools.partial(bench.restart, sup, n_restart),
            "cold_start_100_ms": repeated(functools.partial(bench.cold_start, sup, 100), n_rep),
            "cold_start_300_ms": repeated(functools.partial(bench.cold_start, sup, 300), n_rep),
            "stop_all_100_ms": repeated(functools.partial(bench.stop_all, sup, 100), n_rep),
            "term_ignoring_stop_ms": repeated(functools.partial(bench.term_ignoring, sup), n_rep),
            "grandchild_survives_stop": functools.partial(bench.grandchild_survives, sup),
            "term_at_startup_children_left": repeated(
                functools.partial(bench.term_at_startup, sup, 1), n_rep
            ),
            "_idle": functools.partial(bench.idle, sup, 200, idle_window, idle_settle),
        }[row]
        return [(s, s, fn)]

    idle_rows = ("idle_cpu_percent", "rss_mib")
    try:
        for row in rows:
            if row in idle_rows:  # one 200-instance idle run per supervisor feeds both rows
                if "_idle" not in results:
                    results["_idle"] = {
                        s: attempt("idle (idle_cpu_percent, rss_mib)", s, jobs("_idle", s)[0][2])
                        for s in active
                    }
                for s, cell in results["_idle"].items():
                    if "error" in cell:
                        results[row][s] = cell
                    else:
                        key = "cpu_percent" if row == "idle_cpu_percent" else "rss_mib"
                        results[row][s] = {
                            "value": cell[key],
                            **{k: v for k, v in cell.items() if k not in ("cpu_percent", "rss_mib")},
                        }
                continue
            for s in active:
                for key, label, fn in jobs(row, s):
                    cell = attempt(row, label, fn)
                    if row == "grandchild_survives_stop" and "survived" in cell:
                        cell = {"value": cell.pop("survived"), **cell}
                    if row == "restart_ms" and s == CIRCUS:
                        cell["check_delay_s"] = (
                            CIRCUS_DEFAULT_CHECK_DELAY if key == CIRCUS else CIRCUS_FAST_CHECK_DELAY
                        )
                    results[row][key] = cell
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        bench.anomalies.append("interrupted before the end: partial results")
    finally:
        left = sweep_orphans()
        if left:
            bench.anomalies.append(f"processes left behind at the end, killed: {left}")
        shutil.rmtree(scratch, ignore_errors=True)
    results.pop("_idle", None)

    out_rows = {}
    for row in rows:
        cells = results.get(row, {})
        entry: dict = {"what": ROW_DOCS[row]}
        for s in ALL_SUPERVISORS:
            if s in cells:
                entry[s] = cells[s]
            elif s in setup_errors:
                entry[s] = {"error": "not installed (see notes)"}
        for k, v in cells.items():
            if k not in entry:
                entry[k] = v
        if OURS in cells:
            for s in (SUPERVISORD, CIRCUS):
                if s in cells:
                    entry[f"ratio_vs_{s}"] = ratio_of(cells[OURS], cells[s])
            fast = f"circus_check_delay_{CIRCUS_FAST_CHECK_DELAY:g}"
            if fast in cells:
                entry[f"ratio_vs_{fast}"] = ratio_of(cells[OURS], cells[fast])
            if row == "idle_cpu_percent":  # psutil's 10 ms ticks can read 0.0 over a short window
                for s in (SUPERVISORD, CIRCUS):
                    if s in cells and "error" not in cells[OURS] and "error" not in cells[s]:
                        entry[f"ratio_vs_{s}_schedstat"] = _ratio(
                            cells[OURS]["cpu_percent_schedstat"], cells[s]["cpu_percent_schedstat"]
                        )
        entry["target"] = TARGETS[row]
        entry["target_met"] = target_met(row, cells)
        out_rows[row] = entry

    notes += [
        (
            "ratios are model-supervisor / peer, on the median (and p95 where there are samples): lower is better "
            "for every row; null where a ratio means nothing (booleans, a zero or a missing peer value)"
        ),
        (
            "children are read from /proc/PID/task/*/children (same set as psutil children(), cheaper per poll); "
            "a child counts as running once it has exec'd its command; a zombie counts as gone"
        ),
        (
            "the benchmark process is a child subreaper, so whatever a daemon leaves behind is re-parented to it "
            "and killed/reaped at the end (see grandchild_survives_stop)"
        ),
        (
            f"restart: 1 program, {n_restart} samples; before each SIGKILL a random pause uniform over 0.1-1.1 s "
            f"(0.1-{0.1 + CIRCUS_DEFAULT_CHECK_DELAY:g} s for circus at its default check_delay) so kills land at a "
            "random phase of each supervisor's poll period; zero restart "
            "delay: ours initial_delay=0 jitter=0 max_retries=0; supervisord autorestart=true startsecs=0 "
            "startretries=1000; circus respawn=true"
        ),
        (
            f"circus runs with its default check_delay ({CIRCUS_DEFAULT_CHECK_DELAY:g} s from an ini file) in every "
            f"row except restart_ms' circus_check_delay_{CIRCUS_FAST_CHECK_DELAY:g} variant"
        ),
        (
            "stop timeouts: ours [stop] timeout=2, supervisord stopwaitsecs=2, circus graceful_timeout=2, except "
            "grandchild_survives_stop where every supervisor runs its defaults"
        ),
        (
            "child output: each supervisor's default (ours: per-instance log file in its state dir; supervisord: "
            "AUTO child log files through pipes; circus: its default streams)"
        ),
        (
            f"cold start, stop-all, TERM-ignoring and term-at-startup rows: {n_rep} fresh daemon(s) each; idle: "
            f"200 instances, {idle_settle:g} s settle then a {idle_window:g} s window"
        ),
        (
            f"stop_all_100_ms, term_ignoring_stop_ms and grandchild_survives_stop send the SIGTERM "
            f"{SETTLE_BEFORE_STOP:g}-{SETTLE_BEFORE_STOP + 1:g} s (uniform) after every child runs (a daemon done "
            "starting; the random part spreads the signal over the phase of a 1 s poll loop); "
            "term_at_startup_children_left sends it as soon as the first child runs"
        ),
        "stop_all_100_ms = max(all children gone, daemon exited); detail has both",
        (
            "target_met uses the median, except term_ignoring_stop_ms and term_at_startup_children_left "
            "(every sample)"
        ),
        (
            "circus 0.19 quirks worked around: `statsd = false` in [circus] is read as bool('false') == True and "
            "starts circusd-stats as an extra child, so the key is left out (default off); circusd ignores a "
            "SIGTERM that arrives while it is still spawning (right after a respawn fork or at the end of start-up) "
            "and does not exit, so the bench lets spawning finish before it stops circus outside a measurement"
        ),
        (
            f"workload: {SLEEP} 100000 (TERM-ignoring: {sys.executable} -I ignore_term.py; grandchild: "
            f"{SH} grandchild.sh = '{SLEEP} 100000 & exec {SLEEP} 100001')"
        ),
    ]
    if max(load_at_start[0], os.getloadavg()[0]) > 0.5 * (os.cpu_count() or 1):
        notes.append(
            f"WARNING: the machine was busy with other work (1-min load average {load_at_start[0]} at the "
            f"start, {os.getloadavg()[0]:.2f} at the end, {os.cpu_count()} CPUs): numbers are skewed upwards"
        )
    if not subreaper:
        notes.append("WARNING: PR_SET_CHILD_SUBREAPER failed; orphans go to init and cannot be reaped here")
    doc = {
        "benchmark": "core_bench",
        "mode": "quick" if quick else "full",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": round(time.perf_counter() - t_begin, 1),
        "machine": machine_info(peer_versions, load_at_start),
        "rows": out_rows,
        "anomalies": bench.anomalies,
        "notes": notes,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        log(f"wrote {args.out}")
    log(f"done in {doc['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
