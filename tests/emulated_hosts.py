"""Emulated hosts on one Linux machine: multi-host tests and benches without a cluster.

One machine is split into ``hosts`` emulated hosts of ``ranks_per_host`` ranks each:

* every host is a **network namespace** holding only ``lo`` and one interface
  :data:`IFACE` with an address in a private /24 the harness picks (no overlap
  with the machine's own routes); two hosts are joined by one veth pair, more
  by a bridge in an extra "switch" namespace. IPv6 is off inside, so the only
  addresses a rank can use are the ones created here;
* every host runs one **host process** inside its namespace and in fresh PID,
  IPC, UTS and mount namespaces (``ip netns exec NS unshare --pid --ipc --uts
  --fork --kill-child --mount-proc``), with its own hostname. It is PID 1 of
  its PID namespace and starts the host's ranks, which therefore share PID and
  IPC namespaces (UCX can use ``cma`` between them) but reach other hosts only
  over :data:`IFACE` (UCX sees them as remote and uses ``tcp``);
* ranks are host-major (host ``h`` holds global ranks ``[h*k, (h+1)*k)``) and
  join one torch.distributed **gloo** group over TCP whose master is rank 0 on
  host 0's address; ``GLOO_SOCKET_IFNAME`` and ``UCX_NET_DEVICES`` pin both
  gloo and UCX to :data:`IFACE`.

:meth:`EmulatedHosts.run` calls an importable ``fn(rank, world, *args)`` on
every rank and returns one :class:`RankOutcome` per rank (value or traceback,
exit status, last :func:`report_partial` value), like
``eplb_xfer._spawn.spawn_ranks``. Faults and shaping are :class:`Action` s
applied from outside when a rank signals a marker (:func:`signal_controller`,
optionally waiting for the controller's acknowledgement with
:func:`wait_ack`) or after a delay: ``kill_host`` (SIGKILL of the host's PID 1,
which makes the kernel kill every process of that host), ``link_down`` /
``link_up`` (``ip link set IFACE down/up`` on both ends), ``shape`` /
``unshape`` (``tc qdisc ... tbf rate R`` on every host's egress).

Cleanup happens on every path (success, failure, timeout, KeyboardInterrupt,
SIGTERM (turned into ``SystemExit`` while a topology exists, unless the program
set its own handler), interpreter exit via ``atexit``): host processes are
killed (which kills their ranks), namespaces (and with them the veths) deleted,
temporary files removed. Every process the harness starts also gets
``PR_SET_PDEATHSIG=SIGKILL``, so a controller that dies (even by SIGKILL) kills
its hosts; the namespaces and temporary directory of such a run are removed by
:func:`sweep_leftovers` (their names carry the controller's PID), which every
new :class:`EmulatedHosts` calls.
:meth:`EmulatedHosts.leftovers` lists anything of a run still present.

Needs root, ``ip`` (iproute2), ``unshare`` (util-linux) and, for shaping,
``tc``; :func:`available` says whether this machine can, and why not.

Example::

    ok, why = available()
    with EmulatedHosts(hosts=2, ranks_per_host=2) as eh:
        outcomes = eh.run(my_module.rank_fn, 42, timeout_s=60,
                          actions=[Action("kill_host", host=1, on="layer0")])
    assert eh.leftovers() == []
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import importlib
import importlib.util
import ipaddress
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

#: Prefix of every namespace this harness creates: ``{PREFIX}-{controller pid}-{run}-{role}``.
PREFIX = "eplbh"
#: The one network interface of every emulated host (same name on every host).
IFACE = "ehv0"
#: Environment of a rank: directory of the run (markers, results).
ENV_DIR = "EHOSTS_DIR"
#: Environment of a rank: its host index, and the number of hosts / ranks per host.
ENV_HOST = "EHOSTS_HOST"
ENV_HOSTS = "EHOSTS_HOSTS"
ENV_RANKS_PER_HOST = "EHOSTS_RANKS_PER_HOST"

_PR_SET_PDEATHSIG = 1
_HERE = Path(__file__).resolve().parent
_MODULE = Path(__file__).stem


class RankFailed(RuntimeError):
    """One or more ranks failed; the message holds their tracebacks and log tails."""


class HostsUnavailable(RuntimeError):
    """This machine cannot emulate hosts (see :func:`available`)."""


ActionKind = Literal["kill_host", "link_down", "link_up", "shape", "unshape"]


@dataclass(frozen=True)
class Action:
    """Something the controller does to the emulated hosts during a run.

    Triggered once: ``delay_s`` seconds after a rank called
    ``signal_controller(on)`` (``on``), or ``after_s`` seconds after the hosts
    were started. Once every action on a marker was applied, the controller
    writes the acknowledgement :func:`wait_ack` waits for.

    Attributes:
        kind: ``kill_host`` (SIGKILL every process of ``host``), ``link_down`` /
            ``link_up`` (the links of ``hosts``, default all), ``shape`` (``tc
            tbf`` at ``rate`` on the egress of ``hosts``, default all) / ``unshape``.
        on: marker name a rank signals.
        delay_s: seconds from the marker to the action (a fault at a moment
            inside what the rank does next).
        after_s: or seconds after start.
        host: the host ``kill_host`` kills.
        hosts: the hosts whose link ``link_*`` / ``shape`` / ``unshape`` act on.
        rate, burst, latency: ``tc ... tbf`` parameters of ``shape``.
    """

    kind: ActionKind
    on: str | None = None
    after_s: float | None = None
    delay_s: float = 0.0
    host: int = 1
    hosts: tuple[int, ...] | None = None
    rate: str = "1gbit"
    burst: str = "256kb"
    latency: str = "50ms"

    def __post_init__(self) -> None:
        if (self.on is None) == (self.after_s is None):
            raise ValueError(f"Action {self.kind}: give exactly one of on= or after_s=")
        if self.on is not None:
            _safe(self.on)


@dataclass
class RankOutcome:
    """What happened to one rank during :meth:`EmulatedHosts.run`.

    Attributes:
        rank, host: global rank and its host.
        ok: ``fn`` returned (``value`` holds its return value).
        value: ``fn``'s return value (None unless ``ok``).
        error: why not ``ok``: a traceback, "killed with host h", a timeout, or
            an exit status without a result (a crash).
        exit_code: the rank process's exit status (negative: killed by that
            signal); None if unknown (its host was killed, or the run timed out).
        partial: the last value the rank passed to :func:`report_partial`.
        killed_with_host: its host was killed by a ``kill_host`` action.
        log_tail: the end of the rank's stdout+stderr.
        exit_s: seconds from writing the result to the process's exit
            (interpreter and library teardown), when both happened.
    """

    rank: int
    host: int
    ok: bool
    value: Any = None
    error: str = ""
    exit_code: int | None = None
    partial: Any = None
    killed_with_host: bool = False
    log_tail: str = ""
    exit_s: float | None = None

    @property
    def exited_cleanly(self) -> bool:
        """The process exited by itself with status 0."""
        return self.exit_code == 0


# ----------------------------------------------------------------------------- rank side


def _run_dir() -> Path:
    d = os.environ.get(ENV_DIR)
    if not d:
        raise RuntimeError(f"{ENV_DIR} not set: not running under EmulatedHosts.run")
    return Path(d)


def signal_controller(name: str) -> None:
    """From a rank: triggers the :class:`Action` s waiting on marker ``name``."""
    _atomic_write(_run_dir() / f"signal-{_safe(name)}", str(os.getpid()).encode())


def wait_ack(name: str, timeout_s: float = 30.0) -> bool:
    """From a rank: waits until the actions on marker ``name`` were applied;
    False if that did not happen within ``timeout_s``."""
    path = _run_dir() / f"ack-{_safe(name)}"
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def signal_and_wait(name: str, timeout_s: float = 30.0) -> bool:
    """:func:`signal_controller` then :func:`wait_ack`."""
    signal_controller(name)
    return wait_ack(name, timeout_s)


def report_partial(value: Any) -> None:
    """From a rank: records ``value`` (picklable) as this rank's partial result,
    kept even if the rank later crashes, hangs or is killed."""
    rank = int(os.environ["RANK"])
    _atomic_write(_run_dir() / f"partial-{rank}.pkl", pickle.dumps(value))


def current_host() -> int:
    """From a rank: the index of the emulated host it runs on."""
    return int(os.environ[ENV_HOST])


# ----------------------------------------------------------------------------- helpers


def _safe(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"name: expected letters, digits, '-', '_' or '.', got {name!r}")
    return name


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _set_pdeathsig() -> None:
    """``preexec_fn``: the child gets SIGKILL when its parent thread exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _cmd(*args: str, check: bool = True, timeout: float = 30.0) -> str:
    """Runs a command; returns stdout. Raises with stderr on failure if ``check``."""
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ns_inode(link: str) -> int | None:
    """``/proc/PID/ns/X`` -> namespace inode (None if unreadable)."""
    try:
        target = os.readlink(link)  # "net:[4026532...]"
    except OSError:
        return None
    return int(target[target.index("[") + 1 : -1]) if "[" in target else None


def _netns_list() -> list[str]:
    out = _cmd("ip", "netns", "list", check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    out = _cmd("ip", "netns", "pids", ns, check=False)
    return [int(x) for x in out.split() if x.isdigit()]


def _kill_netns(ns: str) -> None:
    """SIGKILLs every process in netns ``ns`` and deletes it."""
    for _ in range(50):
        pids = _netns_pids(ns)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    _cmd("ip", "netns", "del", ns, check=False)


def _owner_dead(name: str, prefix: str) -> bool:
    """``name`` is ``{prefix}-{pid}-...`` and controller ``pid`` is gone."""
    parts = name.split("-")
    if len(parts) < 3 or parts[0] != prefix or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return name not in _LIVE_NAMESPACES and name not in _LIVE_DIRS
    return not _alive(pid)


def sweep_leftovers(prefix: str = PREFIX) -> list[str]:
    """Deletes namespaces (and their ``/etc/netns`` files) and temporary
    directories named ``{prefix}-{pid}-...`` whose controller ``pid`` is no
    longer alive (earlier crashed runs), killing any process still in those
    namespaces. Live runs (parallel test sessions) are left alone. Returns
    what was removed."""
    removed = []
    for ns in _netns_list():
        if _owner_dead(ns, prefix):
            _kill_netns(ns)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
            removed.append(ns)
    for d in Path(tempfile.gettempdir()).glob(f"{prefix}-*"):
        if d.is_dir() and _owner_dead(d.name, prefix):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


@functools.lru_cache(maxsize=2)
def available(shaping: bool = False) -> tuple[bool, str]:
    """Whether this machine can emulate hosts: ``(True, "")`` or ``(False, why)``.

    Checks: Linux, root, ``ip`` / ``unshare`` (and ``tc`` if ``shaping``), and
    that a namespace pair joined by a veth and a PID+IPC+UTS namespace can
    really be created (a probe, removed again).
    """
    if not sys.platform.startswith("linux"):
        return False, f"emulated hosts need Linux network namespaces (platform {sys.platform})"
    if os.geteuid() != 0:
        return False, "emulated hosts need root (network namespaces, veth pairs)"
    tools = ["ip", "unshare"] + (["tc"] if shaping else [])
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return False, f"emulated hosts need {', '.join(missing)} on PATH"
    probe = [f"{PREFIX}-{os.getpid()}-probe{random.randrange(1 << 16):04x}-{s}" for s in "ab"]
    try:
        for ns in probe:
            _cmd("ip", "netns", "add", ns)
        _cmd(
            "ip", "link", "add", IFACE, "netns", probe[0], "type", "veth",
            "peer", "name", IFACE, "netns", probe[1],
        )  # fmt: skip
        _cmd(
            "ip", "netns", "exec", probe[0], "unshare", "--pid", "--ipc", "--uts",
            "--fork", "--kill-child", "--mount-proc", "true",
        )  # fmt: skip
        if shaping:
            _cmd("ip", "-n", probe[0], "link", "set", IFACE, "up")
            _cmd("tc", "-n", probe[0], "qdisc", "add", "dev", IFACE, "root", "tbf",
                 "rate", "1gbit", "burst", "256kb", "latency", "50ms")  # fmt: skip
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return False, f"cannot create network/PID namespaces here: {e}"
    finally:
        for ns in probe:
            _cmd("ip", "netns", "del", ns, check=False)
    return True, ""


def _used_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks of the machine's addresses and routes (all tables)."""
    nets: list[ipaddress.IPv4Network] = []
    kinds = {"local", "broadcast", "unicast", "multicast", "anycast", "unreachable",
             "blackhole", "prohibit", "throw", "nat"}  # fmt: skip
    routes = _cmd("ip", "-4", "route", "show", "table", "all", check=False).splitlines()
    for line in routes:
        tok = line.split()
        if not tok:
            continue
        dest = tok[1] if tok[0] in kinds and len(tok) > 1 else tok[0]
        if dest == "default":
            continue
        with contextlib.suppress(ValueError):
            nets.append(ipaddress.IPv4Network(dest, strict=False))
    for line in _cmd("ip", "-4", "-o", "addr", check=False).splitlines():
        tok = line.split()
        if "inet" in tok:
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.IPv4Network(tok[tok.index("inet") + 1], strict=False))
    return nets


def pick_subnet(rng: random.Random | None = None) -> ipaddress.IPv4Network:
    """A random /24 in 10.128.0.0/9 overlapping none of the machine's networks."""
    rng = rng or random.Random()
    used = _used_networks()
    for _ in range(1000):
        net = ipaddress.IPv4Network(f"10.{rng.randrange(128, 255)}.{rng.randrange(256)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise HostsUnavailable("no free private /24 found in 10.128.0.0/9")


_LIVE_NAMESPACES: set[str] = set()
_LIVE_DIRS: set[str] = set()


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    """SIGTERM handler while a topology exists: unwinds (so ``finally`` and
    ``atexit`` clean up) instead of dying on the spot."""
    raise SystemExit(128 + signum)


# ----------------------------------------------------------------------------- controller


@dataclass
class _Host:
    index: int
    netns: str
    hostname: str
    address: str
    proc: subprocess.Popen[bytes] | None = None
    init_pid: int | None = None
    killed: bool = False
    log: Path | None = None


@dataclass
class _Job:
    """What every rank of a run loads (pickled; ``args`` pickled separately so a
    function defined in a script's ``__main__`` can be resolved first)."""

    module: str
    qualname: str
    file: str | None
    args: bytes
    sys_path: list[str]
    world: int
    master_addr: str
    master_port: int
    pg_timeout_s: float
    destroy_group: bool
    env: dict[str, str] = field(default_factory=dict)


class EmulatedHosts:
    """``hosts`` emulated hosts of ``ranks_per_host`` ranks each (see the module doc).

    Use as a context manager (or :meth:`start` / :meth:`close`). One topology
    can serve several :meth:`run` s. Not thread-safe.

    Args:
        hosts: number of emulated hosts (>= 1; a bridge joins more than two).
        ranks_per_host: ranks (processes) per host.
        prefix: namespace name prefix (the sweeper only touches its own prefix).
        python: interpreter for host and rank processes.
        mtu: MTU of the host interfaces.
    """

    def __init__(
        self,
        hosts: int = 2,
        ranks_per_host: int = 2,
        *,
        prefix: str = PREFIX,
        python: str = sys.executable,
        mtu: int = 1500,
    ) -> None:
        if not 1 <= hosts <= 250 or ranks_per_host < 1:
            raise ValueError(
                f"hosts, ranks_per_host: expected 1..250 and >= 1, got {hosts}, {ranks_per_host}"
            )
        if "-" in prefix or not prefix:
            raise ValueError(f"prefix: expected a non-empty name without '-', got {prefix!r}")
        self.num_hosts = hosts
        self.ranks_per_host = ranks_per_host
        self.prefix = prefix
        self.python = python
        self.mtu = mtu
        self.run_id = f"{random.randrange(1 << 24):06x}"
        self.subnet: ipaddress.IPv4Network | None = None
        self.hosts: list[_Host] = []
        self._switch: str | None = None
        self._namespaces: list[str] = []
        self._net_inodes: set[int] = set()
        self._pid_inodes: set[int] = set()
        self._started_pids: set[int] = set()
        self._tmp: Path | None = None
        self._runs = 0
        self._started = False
        self._closed = False
        self._shaped: dict[int, str] = {}
        self._sigterm_installed = False

    # -- properties -------------------------------------------------------------------
    @property
    def world(self) -> int:
        """Total number of ranks."""
        return self.num_hosts * self.ranks_per_host

    @property
    def node_of_rank(self) -> list[int]:
        """Host index of every global rank (host-major)."""
        return [r // self.ranks_per_host for r in range(self.world)]

    @property
    def addresses(self) -> list[str]:
        """The address of every host's :data:`IFACE`."""
        return [h.address for h in self.hosts]

    @property
    def shaped(self) -> dict[int, str]:
        """Host -> tbf rate for hosts whose egress is shaped now."""
        return dict(self._shaped)

    def host_of_rank(self, rank: int) -> int:
        """Host index of global ``rank``."""
        return rank // self.ranks_per_host

    # -- lifecycle --------------------------------------------------------------------
    def __enter__(self) -> EmulatedHosts:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _name(self, role: str) -> str:
        return f"{self.prefix}-{os.getpid()}-{self.run_id}-{role}"

    def start(self) -> None:
        """Creates the namespaces, links and addresses. Idempotent."""
        if self._started:
            return
        ok, why = available()
        if not ok:
            raise HostsUnavailable(why)
        sweep_leftovers(self.prefix)
        self._started = True
        atexit.register(self.close)
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        ):
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
            self._sigterm_installed = True
        try:
            self._tmp = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-{os.getpid()}-{self.run_id}-"))
            _LIVE_DIRS.add(self._tmp.name)
            self.subnet = pick_subnet()
            base = self.subnet.network_address
            for h in range(self.num_hosts):
                self.hosts.append(
                    _Host(
                        index=h,
                        netns=self._name(f"h{h}"),
                        hostname=f"eh{self.run_id}-h{h:02d}",
                        address=str(base + 1 + h),
                    )
                )
            for host in self.hosts:
                self._add_netns(host.netns)
            if self.num_hosts == 2:
                a, b = self.hosts
                _cmd("ip", "link", "add", IFACE, "netns", a.netns, "type", "veth",
                     "peer", "name", IFACE, "netns", b.netns)  # fmt: skip
            elif self.num_hosts > 2:
                self._switch = self._name("sw")
                self._add_netns(self._switch)
                sw = self._switch
                _cmd("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
                _cmd("ip", "-n", sw, "link", "set", "br0", "up")
                for host in self.hosts:
                    port = f"p{host.index}"
                    _cmd("ip", "link", "add", IFACE, "netns", host.netns, "type", "veth",
                         "peer", "name", port, "netns", sw)  # fmt: skip
                    _cmd("ip", "-n", sw, "link", "set", port, "master", "br0", "up")
            else:  # one host: a dummy interface carries the address
                _cmd("ip", "-n", self.hosts[0].netns, "link", "add", IFACE, "type", "dummy")
            hosts_file = "127.0.0.1 localhost\n" + "".join(
                f"{h.address} {h.hostname}\n" for h in self.hosts
            )
            for host in self.hosts:
                ns = host.netns
                # `ip netns exec` bind-mounts /etc/netns/NS/* over /etc: every
                # host resolves every host name to its address (gloo, c10d).
                etc = Path("/etc/netns") / ns
                etc.mkdir(parents=True, exist_ok=True)
                (etc / "hosts").write_text(hosts_file)
                _cmd("ip", "-n", ns, "link", "set", IFACE, "mtu", str(self.mtu))
                _cmd("ip", "-n", ns, "addr", "add", f"{host.address}/24", "dev", IFACE)
                _cmd("ip", "-n", ns, "link", "set", IFACE, "up")
        except BaseException:
            self.close()
            raise

    def _add_netns(self, ns: str) -> None:
        _cmd("ip", "netns", "add", ns)
        self._namespaces.append(ns)
        _LIVE_NAMESPACES.add(ns)
        self._net_inodes.add(os.stat(f"/run/netns/{ns}").st_ino)
        _cmd("ip", "-n", ns, "link", "set", "lo", "up")
        # Only the addresses created here: no IPv6 link-local addresses.
        _cmd("ip", "netns", "exec", ns, "sh", "-c",
             "for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 "
             "/proc/sys/net/ipv6/conf/default/disable_ipv6; "
             "do [ -w $f ] && echo 1 > $f; done; true")  # fmt: skip

    def close(self) -> None:
        """Kills every host (and so every rank), deletes the namespaces (and the
        links in them) and the temporary files. Idempotent; also runs at exit."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        for host in self.hosts:
            self._kill_host_procs(host)
        for ns in reversed(self._namespaces):
            _kill_netns(ns)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
            _LIVE_NAMESPACES.discard(ns)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            _LIVE_DIRS.discard(self._tmp.name)
        if self._sigterm_installed and signal.getsignal(signal.SIGTERM) is _exit_on_sigterm:
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def leftovers(self) -> list[str]:
        """Anything of this topology still present: namespaces, processes in
        its network or PID namespaces, processes it started, temporary files.
        Empty after :meth:`close`."""
        out = [f"netns {ns} exists" for ns in _netns_list() if ns in self._namespaces]
        out += [
            f"/etc/netns/{ns} exists"
            for ns in self._namespaces
            if (Path("/etc/netns") / ns).exists()
        ]
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            net = _ns_inode(f"{d}/ns/net")
            pid_ns = _ns_inode(f"{d}/ns/pid")
            if net in self._net_inodes or pid_ns in self._pid_inodes:
                comm = ""
                with contextlib.suppress(OSError):
                    comm = (d / "comm").read_text().strip()
                out.append(f"process {d.name} ({comm}) is still in an emulated host")
        out += [f"process {p} still exists" for p in sorted(self._started_pids) if _alive(p)]
        if self._tmp is not None and self._tmp.exists():
            out.append(f"temporary directory {self._tmp} exists")
        return out

    # -- link control -----------------------------------------------------------------
    def _link_ends(self, hosts: Iterable[int] | None) -> list[tuple[str, str]]:
        """(netns, interface) of both ends of the given hosts' links."""
        chosen = range(self.num_hosts) if hosts is None else hosts
        ends = []
        for h in chosen:
            ends.append((self.hosts[h].netns, IFACE))
            if self._switch is not None:
                ends.append((self._switch, f"p{h}"))
        if self.num_hosts == 2:  # one veth pair: both ends belong to the link
            ends = [(self.hosts[h].netns, IFACE) for h in range(2)]
        return ends

    def link_down(self, hosts: Iterable[int] | None = None) -> None:
        """Takes the links of ``hosts`` (default: all) down, at both ends."""
        for ns, dev in self._link_ends(hosts):
            _cmd("ip", "-n", ns, "link", "set", dev, "down")

    def link_up(self, hosts: Iterable[int] | None = None) -> None:
        """Brings the links of ``hosts`` (default: all) back up."""
        for ns, dev in self._link_ends(hosts):
            _cmd("ip", "-n", ns, "link", "set", dev, "up")

    def shape(
        self,
        rate: str = "1gbit",
        *,
        burst: str = "256kb",
        latency: str = "50ms",
        hosts: Iterable[int] | None = None,
    ) -> None:
        """Limits every chosen host's egress (both directions of a 2-host link)
        with ``tc qdisc replace dev IFACE root tbf rate R burst B latency L``."""
        if shutil.which("tc") is None:
            raise HostsUnavailable("shaping needs tc (iproute2)")
        for h in range(self.num_hosts) if hosts is None else hosts:
            _cmd("tc", "-n", self.hosts[h].netns, "qdisc", "replace", "dev", IFACE, "root",
                 "tbf", "rate", rate, "burst", burst, "latency", latency)  # fmt: skip
            self._shaped[h] = rate

    def unshape(self, hosts: Iterable[int] | None = None) -> None:
        """Removes the shaping of the chosen hosts (default: all)."""
        for h in range(self.num_hosts) if hosts is None else hosts:
            _cmd("tc", "-n", self.hosts[h].netns, "qdisc", "del", "dev", IFACE, "root",
                 check=False)  # fmt: skip
            self._shaped.pop(h, None)

    def qdisc_stats(self, host: int) -> str:
        """``tc -s qdisc show dev IFACE`` of one host (bytes sent, drops)."""
        return _cmd("tc", "-s", "-n", self.hosts[host].netns, "qdisc", "show", "dev", IFACE)

    # -- processes --------------------------------------------------------------------
    def _init_pid(self, host: _Host, wait_s: float = 5.0) -> int | None:
        """Root-namespace PID of the host's PID 1 (the child ``unshare`` forked)."""
        if host.init_pid is not None or host.proc is None:
            return host.init_pid
        pid = host.proc.pid
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                if kids:
                    host.init_pid = int(kids[0])
                    self._started_pids.add(host.init_pid)
                    ino = _ns_inode(f"/proc/{host.init_pid}/ns/pid")
                    if ino is not None:
                        self._pid_inodes.add(ino)
                    return host.init_pid
            if host.proc.poll() is not None:
                return None
            time.sleep(0.005)
        return None

    def kill_host(self, h: int, wait_s: float = 10.0) -> None:
        """SIGKILLs host ``h``'s PID 1 during a run: the kernel then kills every
        process of that host (its ranks). Returns once they are all gone:
        ``unshare`` exits only after PID 1 was reaped, and PID 1's exit waits
        for every other process of its PID namespace. (``os.kill`` returning
        is not enough: a rank could still run for a few milliseconds, see an
        acknowledgement and carry on.)"""
        host = self.hosts[h]
        pid = self._init_pid(host)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        host.killed = True
        if host.proc is not None:
            try:
                host.proc.wait(wait_s)
            except subprocess.TimeoutExpired as e:
                raise RuntimeError(f"host {h} did not die within {wait_s}s of SIGKILL") from e

    def _kill_host_procs(self, host: _Host) -> None:
        if host.proc is None:
            return
        if host.proc.poll() is None:
            pid = self._init_pid(host, wait_s=0.5)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            host.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            host.proc.wait(10)
        host.proc = None

    def _apply(self, action: Action) -> None:
        if action.kind == "kill_host":
            self.kill_host(action.host)
        elif action.kind == "link_down":
            self.link_down(action.hosts)
        elif action.kind == "link_up":
            self.link_up(action.hosts)
        elif action.kind == "shape":
            self.shape(action.rate, burst=action.burst, latency=action.latency, hosts=action.hosts)
        elif action.kind == "unshape":
            self.unshape(action.hosts)
        else:  # pragma: no cover - Literal
            raise ValueError(f"action: unknown kind {action.kind!r}")

    def rank_env(self) -> dict[str, str]:
        """Environment every rank gets (besides RANK etc.): gloo and UCX pinned
        to :data:`IFACE`, one thread per rank."""
        return {
            "GLOO_SOCKET_IFNAME": IFACE,
            "TP_SOCKET_IFNAME": IFACE,
            "UCX_NET_DEVICES": IFACE,
            "OMP_NUM_THREADS": "1",
            ENV_HOSTS: str(self.num_hosts),
            ENV_RANKS_PER_HOST: str(self.ranks_per_host),
        }

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        timeout_s: float = 120.0,
        env: dict[str, str] | None = None,
        actions: Sequence[Action] = (),
        check: bool = False,
        destroy_group: bool = True,
        pg_timeout_s: float = 60.0,
    ) -> list[RankOutcome]:
        """Runs ``fn(rank, world, *args)`` on every rank of every host.

        ``fn`` must be importable (module level; a script's ``__main__`` works
        too). Each rank joins the gloo group (``pg_timeout_s``) first. Returns
        one :class:`RankOutcome` per rank, rank order. With ``check``, raises
        :class:`RankFailed` if any rank did not return. ``destroy_group=False``
        skips ``destroy_process_group`` (after faults it may block). After
        ``timeout_s`` every host is killed and the missing ranks reported.
        """
        if self._closed:
            raise RuntimeError("EmulatedHosts is closed")
        self.start()
        assert self._tmp is not None
        self._runs += 1
        run_dir = self._tmp / f"run{self._runs}"
        run_dir.mkdir()
        module = fn.__module__
        mod = sys.modules.get(module)
        job = _Job(
            module=module,
            qualname=fn.__qualname__,
            file=getattr(mod, "__file__", None),
            args=pickle.dumps(args),
            sys_path=[p for p in sys.path if p],
            world=self.world,
            master_addr=self.hosts[0].address,
            master_port=random.randrange(20000, 30000),
            pg_timeout_s=pg_timeout_s,
            destroy_group=destroy_group,
            env={**self.rank_env(), **(env or {})},
        )
        (run_dir / "job.pkl").write_bytes(pickle.dumps(job))
        deadline_wall = time.time() + timeout_s
        for host in self.hosts:
            host.killed = False
            host.init_pid = None
            host.log = run_dir / f"host-{host.index}.log"
            spec = {"hostname": host.hostname, "index": host.index, "deadline": deadline_wall,
                    "ranks": list(range(host.index * self.ranks_per_host,
                                        (host.index + 1) * self.ranks_per_host))}  # fmt: skip
            (run_dir / f"host-{host.index}.pkl").write_bytes(pickle.dumps(spec))
        pending = list(enumerate(actions))
        seen: dict[str, float] = {}  # marker -> when it was first seen
        timed_out = False
        try:
            for host in self.hosts:
                self._launch(host, run_dir)
            t0 = time.monotonic()
            deadline = t0 + timeout_s + 10.0
            while any(h.proc is not None and h.proc.poll() is None for h in self.hosts):
                now = time.monotonic()
                if now > deadline:
                    timed_out = True
                    break
                for item in list(pending):
                    _i, a = item
                    if a.on is not None:
                        if a.on not in seen and (run_dir / f"signal-{_safe(a.on)}").exists():
                            seen[a.on] = now
                        fired = a.on in seen and now - seen[a.on] >= a.delay_s
                    else:
                        fired = now - t0 >= (a.after_s or 0.0)
                    if fired:
                        self._apply(a)
                        pending.remove(item)
                        if a.on is not None and not any(b.on == a.on for _j, b in pending):
                            _atomic_write(run_dir / f"ack-{_safe(a.on)}", b"1")
                time.sleep(0.001 if seen else 0.005)
        finally:
            for host in self.hosts:
                self._kill_host_procs(host)
        outcomes = self._collect(run_dir, timed_out, timeout_s)
        if check:
            bad = [o for o in outcomes if not o.ok]
            if bad:
                raise RankFailed(
                    "\n".join(f"--- rank {o.rank} (host {o.host}) ---\n{o.error}" for o in bad)
                )
        return outcomes

    def _launch(self, host: _Host, run_dir: Path) -> None:
        boot = (
            f"import sys; sys.path.insert(0, {str(_HERE)!r}); "
            f"import {_MODULE} as m; m._host_main({str(run_dir)!r}, {host.index})"
        )
        cmd = [
            "ip", "netns", "exec", host.netns,
            "unshare", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc",
            self.python, "-c", boot,
        ]  # fmt: skip
        assert host.log is not None
        with open(host.log, "wb") as log:
            host.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_set_pdeathsig,
            )
        self._started_pids.add(host.proc.pid)
        self._init_pid(host)

    def _collect(self, run_dir: Path, timed_out: bool, timeout_s: float) -> list[RankOutcome]:
        outcomes = []
        for rank in range(self.world):
            h = rank // self.ranks_per_host
            host = self.hosts[h]
            o = RankOutcome(rank=rank, host=h, ok=False)
            log = run_dir / f"rank-{rank}.log"
            if log.exists():
                o.log_tail = log.read_bytes()[-4000:].decode(errors="replace")
            partial = run_dir / f"partial-{rank}.pkl"
            if partial.exists():
                with contextlib.suppress(Exception):
                    o.partial = pickle.loads(partial.read_bytes())
            exit_file = run_dir / f"exit-{rank}"
            if exit_file.exists():
                o.exit_code = int(exit_file.read_text())
            result = run_dir / f"result-{rank}.pkl"
            if result.exists() and exit_file.exists():
                o.exit_s = exit_file.stat().st_mtime - result.stat().st_mtime
            if result.exists():
                ok, value = pickle.loads(result.read_bytes())
                o.ok = bool(ok)
                o.value = value if ok else None
                o.error = "" if ok else str(value)
            elif host.killed:
                o.killed_with_host = True
                o.error = f"killed with host {h}"
            elif timed_out or (run_dir / f"deadline-{rank}").exists() or o.exit_code is None:
                o.error = f"rank {rank} produced no result within {timeout_s:.0f}s (killed)"
            else:
                o.error = f"rank {rank} exited with status {o.exit_code} without a result"
            if not o.ok and o.log_tail:
                o.error += f"\n[rank {rank} output]\n{o.log_tail}"
            if not o.ok and host.log is not None and host.log.exists():
                tail = host.log.read_bytes()[-2000:].decode(errors="replace").strip()
                if tail:
                    o.error += f"\n[host {h} output]\n{tail}"
            outcomes.append(o)
        return outcomes


# ----------------------------------------------------------------------------- inside a host


def _sethostname(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    raw = name.encode()
    if libc.sethostname(raw, len(raw)) != 0:
        raise OSError(ctypes.get_errno(), f"sethostname({name!r})")


def _host_main(run_dir_s: str, index: int) -> None:
    """PID 1 of an emulated host: sets the hostname, starts the host's ranks,
    reaps every child (it is the namespace's init), records each rank's exit
    status, kills the ranks at the run's deadline."""
    run_dir = Path(run_dir_s)
    spec = pickle.loads((run_dir / f"host-{index}.pkl").read_bytes())
    job: _Job = pickle.loads((run_dir / "job.pkl").read_bytes())
    _sethostname(spec["hostname"])
    children: dict[int, int] = {}
    for rank in spec["ranks"]:
        env = {
            **os.environ,
            **job.env,
            ENV_DIR: str(run_dir),
            ENV_HOST: str(index),
            "RANK": str(rank),
            "WORLD_SIZE": str(job.world),
            "LOCAL_RANK": str(rank - spec["ranks"][0]),
            "MASTER_ADDR": job.master_addr,
            "MASTER_PORT": str(job.master_port),
        }
        boot = (
            f"import sys; sys.path.insert(0, {str(_HERE)!r}); "
            f"import {_MODULE} as m; sys.exit(m._rank_main({run_dir_s!r}, {rank}))"
        )
        with open(run_dir / f"rank-{rank}.log", "wb") as log:
            p = subprocess.Popen(
                [sys.executable, "-c", boot],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_set_pdeathsig,
            )
        children[p.pid] = rank
    killed = False
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            if not killed and time.time() > spec["deadline"]:
                for child, rank in children.items():
                    _atomic_write(run_dir / f"deadline-{rank}", b"1")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                killed = True
            time.sleep(0.01)
            continue
        rank = children.pop(pid, None)
        if rank is not None:
            code = os.waitstatus_to_exitcode(status)
            _atomic_write(run_dir / f"exit-{rank}", str(code).encode())


def _load_fn(job: _Job) -> Callable[..., Any]:
    mod: ModuleType
    if job.module == "__main__":
        if not job.file:
            raise RuntimeError("fn: defined in an interactive __main__; define it in a module")
        spec = importlib.util.spec_from_file_location("__ehosts_main__", job.file)
        if spec is None or spec.loader is None:
            raise RuntimeError(f"fn: cannot load {job.file}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["__ehosts_main__"] = mod
        spec.loader.exec_module(mod)
        sys.modules["__main__"] = mod  # so pickled args naming __main__.X resolve
    else:
        mod = importlib.import_module(job.module)
    obj: Any = mod
    for part in job.qualname.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[no-any-return]


def _rank_main(run_dir_s: str, rank: int) -> int:
    """One rank: joins the gloo group, runs ``fn``, writes its result."""
    run_dir = Path(run_dir_s)
    job: _Job = pickle.loads((run_dir / "job.pkl").read_bytes())
    sys.path[:0] = [p for p in job.sys_path if p not in sys.path]
    result: tuple[bool, Any]
    group_up = False
    try:
        fn = _load_fn(job)
        args = pickle.loads(job.args)
        import datetime

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{job.master_addr}:{job.master_port}",
            rank=rank,
            world_size=job.world,
            timeout=datetime.timedelta(seconds=job.pg_timeout_s),
        )
        group_up = True
        result = (True, fn(rank, job.world, *args))
    except BaseException as e:  # report everything, including SystemExit
        result = (False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    try:
        data = pickle.dumps(result)
    except Exception as e:
        data = pickle.dumps((False, f"result not picklable: {type(e).__name__}: {e}"))
    _atomic_write(run_dir / f"result-{rank}.pkl", data)
    sys.stdout.flush()
    if group_up and job.destroy_group:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0 if result[0] else 1


__all__ = [
    "IFACE",
    "PREFIX",
    "Action",
    "EmulatedHosts",
    "HostsUnavailable",
    "RankFailed",
    "RankOutcome",
    "available",
    "current_host",
    "pick_subnet",
    "report_partial",
    "signal_and_wait",
    "signal_controller",
    "sweep_leftovers",
    "wait_ack",
]
