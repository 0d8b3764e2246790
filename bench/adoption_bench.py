"""Surviving the supervisor's own death (issue 10): adoption time, and a kill soak.

    python bench/adoption_bench.py                    # both parts, the issue's sizes
    python bench/adoption_bench.py --quick            # 5 SIGKILLs, 1,000 random kills
    python bench/adoption_bench.py --parts adopt      # only the adoption timing

Prints one JSON document on stdout (progress on stderr).

* `adopt_100`: 100 instances RUNNING (half with an HTTP health check), SIGKILL `serve`, start
  it again: seconds until the API answers with all 100 RUNNING on the *same* pids (adopted).
* `soak`: 100 instances (sleepers, and demo servers with an in-group and a setsid grandchild),
  N supervisor SIGKILLs interleaved with M random SIGKILLs of children and grandchildren.
  After each supervisor restart and at the end it counts, from /proc and the run marks:
  lost (an enabled instance not RUNNING in time), duplicated (an instance with processes of
  two runs), orphaned (a marked process outside every instance's current run), and after the
  final SIGTERM anything of ours still alive. It samples the supervisor's RSS and open fds
  after each restart settles.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import REPO, call, free_port
from supervisor.adapters.marks import MARK_ENV, scope_of

PY = sys.executable
DEMO = REPO / "examples" / "backends" / "demo_server.py"
FAST = {"initial_delay": 0.0, "jitter": 0.0, "max_retries": 0, "min_uptime": 0.5}


def progress(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def write(conf: Path, name: str, body: str) -> None:
    (conf / f"{name}.toml").write_text(body)


def decl(name: str, command: list[str], http: bool) -> str:
    lines = [
        f'name = "{name}"',
        'backend = "process"',
        f"command = {json.dumps(command)}",
        "[restart]",
        *(f"{k} = {json.dumps(v)}" for k, v in FAST.items()),
    ]
    if http:
        lines += ["[health]", 'type = "http"', 'path = "/health"', "start_interval = 0.05", "interval = 2.0"]
    return "\n".join(lines) + "\n"


class Serve:
    def __init__(self, conf: Path, state: Path, port_range: str) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_SUPERVISOR_")}
        env["MODEL_SUPERVISOR_PORT_RANGE"] = port_range
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [
                PY,
                "-m",
                "supervisor",
                "serve",
                "--conf-dir",
                str(conf),
                "--state-dir",
                str(state),
                "--port",
                str(self.port),
                "--log-level",
                "WARNING",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.base = f"http://127.0.0.1:{self.port}"

    def status(self) -> dict[str, dict] | None:
        try:
            return {i["instance_id"]: i for i in call(self.base, "GET", "/api/v1/models/status", timeout=5)}
        except (OSError, ValueError):
            return None

    def wait_running(self, count: int, timeout: float) -> dict[str, dict] | None:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            st = self.status()
            if st is not None and len(st) == count and all(i["state"] == "RUNNING" for i in st.values()):
                return st
            time.sleep(0.01)
        return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def rss_mib_and_fds(self) -> tuple[float, int]:
        with open(f"/proc/{self.proc.pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return round(rss / 1024, 1), len(os.listdir(f"/proc/{self.proc.pid}/fd"))


def marked(state: Path) -> dict[int, tuple[str, str]]:
    """pid -> (run token, instance id) of live processes carrying this scope's mark."""
    prefix = f"{MARK_ENV}={scope_of(state)}:".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                for item in f.read().split(b"\0"):
                    if item.startswith(prefix):
                        token, _, instance = item[len(prefix) :].decode().partition(":")
                        found[int(entry)] = (token, instance)
        except (OSError, IndexError):
            continue
    return found


def audit(state: Path) -> tuple[int, int]:
    """(duplicated instances, orphaned processes) right now."""
    tokens = {}
    for path in (state / "run").glob("*.json"):
        try:
            rec = json.loads(path.read_text())
            tokens[rec["instance"]] = rec["token"]
        except (OSError, ValueError, KeyError):
            continue
    runs: dict[str, set[str]] = {}
    orphans = 0
    for _pid, (token, instance) in marked(state).items():
        runs.setdefault(instance, set()).add(token)
        if tokens.get(instance) != token:
            orphans += 1
    return sum(1 for seen in runs.values() if len(seen) > 1), orphans


def kill_all_marked(state: Path) -> int:
    pids = list(marked(state))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def adopt_100(root: Path, port_range: str) -> dict:
    conf, state = root / "conf.d", root / "state"
    conf.mkdir()
    for n in range(100):
        http = n % 2 == 0
        cmd = [PY, str(DEMO), "--port", "{port}"] if http else ["sleep", "100000"]
        write(conf, f"m{n:03d}", decl(f"m{n:03d}", cmd, http))
    first = Serve(conf, state, port_range)
    try:
        before = first.wait_running(100, 120)
        if before is None:
            raise SystemExit("100 instances did not become RUNNING")
        first.kill()
        second = Serve(conf, state, port_range)
        after = second.wait_running(100, 60)
        seconds = time.perf_counter() - second.started
        same = after is not None and all(after[i]["pid"] == before[i]["pid"] for i in before)
        second.terminate()
        return {
            "instances": 100,
            "seconds_to_all_adopted_and_running": round(seconds, 3),
            "same_pids": same,
            "target_s": 1.0,
        }
    finally:
        kill_all_marked(state)


def soak(root: Path, port_range: str, restarts: int, kills: int, rng: random.Random) -> dict:
    conf, state = root / "conf.d", root / "state"
    conf.mkdir()
    count = 100
    for n in range(count):
        kind = n % 4
        if kind == 0:
            cmd, http = ["sleep", "100000"], False
        elif kind == 1:
            cmd, http = [PY, str(DEMO), "--port", "{port}"], True
        elif kind == 2:
            cmd, http = [PY, str(DEMO), "--port", "{port}", "--spawn-grandchild"], True
        else:
            cmd, http = [PY, str(DEMO), "--port", "{port}", "--spawn-grandchild", "--grandchild-setsid"], True
        write(conf, f"s{n:03d}", decl(f"s{n:03d}", cmd, http))
    lost = duplicated = orphaned = 0
    samples = []
    per_round = max(1, kills // max(1, restarts))
    done = 0
    began = time.perf_counter()
    current = Serve(conf, state, port_range)
    try:
        for r in range(restarts):
            if current.wait_running(count, 120) is None:
                lost += sum(1 for i in (current.status() or {}).values() if i["state"] != "RUNNING") or 1
            samples.append(current.rss_mib_and_fds())
            for _ in range(min(per_round, kills - done)):
                victims = list(marked(state))
                if victims:
                    try:
                        os.kill(rng.choice(victims), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                done += 1
                time.sleep(rng.uniform(0.0, 0.01))
            time.sleep(rng.uniform(0.0, 0.2))
            current.kill()
            current = Serve(conf, state, port_range)
            if current.wait_running(count, 120) is None:
                st = current.status() or {}
                lost += sum(1 for i in st.values() if i["state"] != "RUNNING") + (count - len(st))
            d, o = audit(state)
            duplicated += d
            orphaned += o
            progress(
                f"soak round {r + 1}/{restarts}: {done} kills, dup {duplicated}, orphans {orphaned}, lost {lost}"
            )
        samples.append(current.rss_mib_and_fds())
        current.terminate()
        left = len(marked(state))
    finally:
        current.kill()
        kill_all_marked(state)
    return {
        "instances": count,
        "supervisor_sigkills": restarts,
        "random_kills": done,
        "seconds": round(time.perf_counter() - began, 1),
        "lost": lost,
        "duplicated": duplicated,
        "orphaned": orphaned,
        "left_after_stop": left,
        "rss_mib_first_last_max": [samples[0][0], samples[-1][0], max(s[0] for s in samples)],
        "open_fds_first_last_max": [samples[0][1], samples[-1][1], max(s[1] for s in samples)],
        "target": "0 lost / 0 duplicated / 0 orphaned",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default="adopt,soak")
    parser.add_argument("--restarts", type=int, default=50)
    parser.add_argument("--kills", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=10)
    args = parser.parse_args()
    if args.quick:
        args.restarts, args.kills = 5, 1_000
    low = 30000 + random.Random(os.getpid()).randrange(0, 20000)
    port_range = f"{low}-{low + 499}"
    out: dict = {"bench": "adoption", "machine_cpus": os.cpu_count()}
    with TemporaryDirectory(prefix="msup-adopt-") as tmp:
        root = Path(tmp)
        if "adopt" in args.parts:
            (root / "a").mkdir()
            progress("adopt_100 ...")
            out["adopt_100"] = adopt_100(root / "a", port_range)
        if "soak" in args.parts:
            (root / "s").mkdir()
            progress("soak ...")
            out["soak"] = soak(root / "s", port_range, args.restarts, args.kills, random.Random(args.seed))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
