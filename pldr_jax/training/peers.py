"""A multi-process run that loses a process: one line and a bounded exit, not a C++ abort.

Left to itself, jax.distributed meets a lost process with an abort: a process whose
coordinator (process 0) dies aborts at once (its error-polling RPC fails), process 0
when gloo's next collective fails or after the coordination service's heartbeat
timeout (100 s), each with a screenful of gRPC lines and a stack trace and nothing
about what to do. `Watch` (started by `pldr_jax.training.distributed.initialize`) replaces
that with one line on stderr and exit status 75 (`LOST_PEER_STATUS`, EX_TEMPFAIL):

    error: process 1 of 2 is gone (its connection closed: killed, crashed, or its host
    is down); this process stops too. The last intact checkpoint is step 8 in
    runs/x/checkpoints. To resume, start every process again, on every host, with the
    command it was started with (this one: .venv/bin/python experiments/pretrain.py ...)

(one line; the part after "stops too." is the entry point's `set_resume_hint`).

How a loss is found, and how soon (the bound):

* Liveness connections: every process k > 0 holds one TCP connection to process 0
  (its port goes through jax.distributed's key-value store). A process that dies
  (kill -9, a crash, the OOM killer) has it closed by its kernel: the other end reads
  EOF at once, so survivors exit within about a second. A host that vanishes, or a
  network that drops, is found by TCP keep-alive within `timeout_s`
  (`--peer_timeout`, default 30 s). Process 0 tells the others which process it lost
  before it exits, so every survivor names the same one.
* The coordinator's channel: processes k > 0 reach the coordination service through
  `Relay`, a byte-for-byte TCP relay in the process itself. When process 0 dies the
  relay keeps the jax client's connection open instead of passing the close on, so
  the client does not abort before the watch has spoken (jax's heartbeat timeout is
  kept above `timeout_s`).
* A process that stops on its own error sends "fail" first (`Watch.failing`); the
  others report it after `GRACE_S`, unless they are stopping on an error of their own
  (an error every process meets is then one line from each, not two).
* A normal exit sends "bye" first (`Watch.leaving`); a peer lost after that is not
  reported, and the exit status stays 0.

Everything the watch says goes through `os.write(2, ...)` and ends in `os._exit`, from
a daemon thread, before the C++ runtime would abort; C++ logging is silenced at that
moment so nothing else reaches the console. `PLDR_DEBUG=1` / `--debug` keeps C++ logs.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time
from typing import Callable

__all__ = ["LOST_PEER_STATUS", "DEFAULT_TIMEOUT_S", "GRACE_S", "Relay", "Watch", "current",
           "set_resume_hint", "looks_like_lost_peer"]

LOST_PEER_STATUS = 75  # EX_TEMPFAIL: start again (resume) once every process is back
DEFAULT_TIMEOUT_S = 30.0
GRACE_S = 2.0  # a peer's own error: time for this process's error (if any) to come first
_RELAY_GRACE_S = 0.5  # the coordinator gone: time for process 0's last word to arrive
_PORT_KEY = "pldr_jax/peers/port"

_current: "Watch | None" = None


def current() -> "Watch | None":
  """The watch of this process (None: one process, or the watch is off)."""
  return _current


def set_resume_hint(hint: Callable[[], str]) -> None:
  """What the lost-peer line says after 'this process stops too.': called when a peer is
  lost (so it can name the newest checkpoint then). Kept until a watch starts."""
  global _hint
  _hint = hint


def _default_hint() -> str:
  return ("To resume, start every process again, on every host, with the command it was "
          "started with.")


_hint: Callable[[], str] = _default_hint

# Text of errors that a lost peer causes in this process's own calls (gloo collectives,
# the coordination service's barriers and key-value store).
_SYMPTOMS = ("gloo", "connection reset", "connection closed", "connection refused",
             "broken pipe", "socket closed", "unavailable", "deadline_exceeded",
             "deadline exceeded", "barrier", "coordination service", "heartbeat")


def looks_like_lost_peer(exc: BaseException) -> bool:
  """Whether an exception could be the symptom of a lost process (then the watch, not
  the exception, has the last word)."""
  seen, text = set(), ""
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    text += f" {type(exc).__name__}: {exc}"
    exc = exc.__cause__ or exc.__context__
  text = text.lower()
  return any(s in text for s in _SYMPTOMS)


def _thread(target, *args, name: str) -> threading.Thread:
  t = threading.Thread(target=target, args=args, daemon=True, name=f"pldr_jax.training.peers.{name}")
  t.start()
  return t


def _split(address: str) -> tuple[str, int]:
  host, port = address.rsplit(":", 1)
  return host.strip("[]"), int(port)


def _keepalive(sock: socket.socket, timeout_s: float) -> None:
  """TCP keep-alive probes (and a limit on unacknowledged data) that give up within
  about `timeout_s` on a peer host that no longer answers."""
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
  idle = max(1, int(timeout_s / 3))
  interval = max(1, int(timeout_s / 6))
  for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", 3),
                      ("TCP_USER_TIMEOUT", int(timeout_s * 1000))):
    if hasattr(socket, name):
      try:
        sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
      except OSError:
        pass
  if hasattr(socket, "TCP_KEEPALIVE") and sys.platform == "darwin":  # macOS: idle time
    try:
      sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPALIVE, idle)
    except OSError:
      pass


def _reachable(address: tuple[str, int], timeout_s: float = 2.0) -> bool:
  try:
    with socket.create_connection(address, timeout=timeout_s):
      return True
  except OSError:
    return False


# ---------------------------------------------------------------- the coordinator's channel

class Relay:
  """A TCP relay on 127.0.0.1 that the jax client of a process k > 0 connects through
  to the coordination service (`target`, HOST:PORT).

  Before `armed` it passes everything on, closes included (the client retries while
  process 0 starts). Once armed, a connection the coordinator closes is checked with a
  fresh connection: a coordinator that still answers is a normal reconnect (the close is
  passed on); one that does not is gone: the client's side is held open (so its RPCs
  wait instead of failing into an abort) and `on_lost()` is called.
  """

  def __init__(self, target: str, on_lost: Callable[[], None]):
    self.target = _split(target)
    self.on_lost = on_lost
    self.armed = False
    self._held: list[socket.socket] = []
    self._server = socket.create_server(("127.0.0.1", 0))
    self.address = f"127.0.0.1:{self._server.getsockname()[1]}"
    _thread(self._accept, name="relay")

  def _accept(self):
    while True:
      try:
        down, _ = self._server.accept()
      except OSError:
        return
      _thread(self._serve, down, name="relay.conn")

  def _serve(self, down: socket.socket):
    try:
      up = socket.create_connection(self.target, timeout=10)
      up.settimeout(None)
    except OSError:
      if self.armed:
        self._coordinator_gone(down)
      else:
        down.close()
      return
    for s in (up, down):
      s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _thread(self._pump, up, down, True, name="relay.down")
    self._pump(down, up, False)

  def _pump(self, src: socket.socket, dst: socket.socket, from_coordinator: bool):
    try:
      while data := src.recv(1 << 16):
        dst.sendall(data)
    except OSError:
      pass
    if from_coordinator and self.armed and not _reachable(self.target):
      src.close()
      self._coordinator_gone(dst)
      return
    for s in (src, dst):
      try:
        s.close()
      except OSError:
        pass

  def _coordinator_gone(self, down: socket.socket):
    self._held.append(down)  # open: the client's calls wait, they do not fail
    self.on_lost()


# ---------------------------------------------------------------- the watch

class Watch:
  """Liveness connections between process 0 and every other process (see the module
  docstring); `start()` once jax.distributed is up."""

  def __init__(self, index: int, count: int, coordinator: str, *, timeout_s: float,
               client=None, relay: Relay | None = None):
    self.index, self.count = index, count
    self.coordinator = _split(coordinator)
    self.timeout_s = float(timeout_s)
    self.client = client
    self.relay = relay
    self._lock = threading.Lock()
    self._conns: dict[int, socket.socket] = {}  # process 0: peer -> socket; others: {0: ...}
    self._said: dict[int, str] = {}  # peer -> "bye" / "fail" it sent
    self._gone_after_bye: set[int] = set()
    self._reported = False
    self._leaving = None  # None, "bye" (normal exit) or "fail" (own error)
    self._server = None

  # -- start-up

  def start(self, connect_timeout_s: float = 120.0) -> "Watch":
    global _current
    if self.index == 0:
      self._server = _listen()
      self.client.key_value_set(_PORT_KEY, str(self._server.getsockname()[1]))
      deadline = time.monotonic() + connect_timeout_s
      self._server.settimeout(1.0)
      while len(self._conns) < self.count - 1 and time.monotonic() < deadline:
        try:
          sock, _ = self._server.accept()
        except socket.timeout:
          continue
        sock.settimeout(10)
        peer = int(_readline(sock).split()[1])  # "hello <k>"
        sock.settimeout(None)
        _keepalive(sock, self.timeout_s)
        self._conns[peer] = sock
      for peer, sock in self._conns.items():
        _thread(self._read, peer, sock, name=f"watch.{peer}")
    else:
      port = int(self.client.blocking_key_value_get(_PORT_KEY, int(connect_timeout_s * 1000)))
      sock = socket.create_connection((self.coordinator[0], port), timeout=connect_timeout_s)
      sock.settimeout(None)
      _keepalive(sock, self.timeout_s)
      sock.sendall(f"hello {self.index}\n".encode())
      self._conns[0] = sock
      _thread(self._read, 0, sock, name="watch.0")
    if self.relay is not None:
      self.relay.armed = True
    _current = self
    # An entry point that calls neither leaving() nor failing(): an uncaught exception
    # is a failure, an interpreter exit otherwise a normal one (this atexit handler runs
    # before jax's, which waits in the shutdown barrier).
    hook = sys.excepthook

    def excepthook(kind, value, tb):
      self.failing(value)
      hook(kind, value, tb)

    sys.excepthook = excepthook
    atexit.register(self.leaving)
    return self

  def _read(self, peer: int, sock: socket.socket):
    buf = b""
    try:
      while data := sock.recv(4096):
        buf += data
        while b"\n" in buf:
          line, buf = buf.split(b"\n", 1)
          self._message(peer, line.decode(errors="replace").split())
    except OSError:
      pass
    said = self._said.get(peer)
    if said == "bye":
      self._gone_after_bye.add(peer)
      if self._leaving == "bye":  # both done: a shutdown barrier would wait for nothing
        _exit_quietly(0)
      return
    if said == "fail":
      return  # reported through its message
    self._peer_lost(peer, "its connection closed: killed, crashed, or its host is down"
                    if peer != 0 or self.index == 0 else
                    "the connection to it closed: killed, crashed, or its host is down")

  def _message(self, sender: int, words: list[str]):
    if not words:
      return
    if words[0] in ("bye", "fail") and len(words) == 1:
      self._said[sender] = words[0]
      if words[0] == "fail":
        self._peer_failed(sender)
    elif words[0] in ("lost", "fail") and len(words) == 2 and words[1].isdigit():
      peer = int(words[1])  # process 0 passes on what it found
      if words[0] == "lost":
        self._peer_lost(peer, "found by process 0")
      else:
        self._peer_failed(peer)

  def coordinator_lost(self):
    """The relay found the coordinator gone: process 0 (unless its last word names
    another process: it may arrive a moment later on the liveness connection)."""
    def later():
      time.sleep(_RELAY_GRACE_S)
      if self._said.get(0) == "fail":
        return  # process 0 stopped on its own error: reported as such
      self._peer_lost(0, "the coordination service stopped answering: killed, crashed, "
                         "or its host is down")
    _thread(later, name="relay.lost")

  # -- what this process does

  def leaving(self):
    """A normal exit is next: the peers will not report this process."""
    with self._lock:
      if self._leaving == "fail":
        return
      self._leaving = "bye"
    self._send_all("bye")
    if self._gone_after_bye:  # jax's shutdown barrier would wait for a process that left
      _exit_quietly(0)

  def failing(self, exc: BaseException | None = None):
    """This process stops on an error (its own line follows). An error that may be a
    lost peer's symptom first waits (up to the bound) for the watch to name the peer."""
    if exc is not None and looks_like_lost_peer(exc):
      deadline = time.monotonic() + self.timeout_s + GRACE_S + 1
      while time.monotonic() < deadline:
        time.sleep(0.05)  # the watch thread ends the process when it knows
    with self._lock:
      if self._leaving is None:
        self._leaving = "fail"
    self._send_all("fail")

  def _send_all(self, text: str):
    for sock in list(self._conns.values()):
      try:
        sock.settimeout(2.0)
        sock.sendall(f"{text}\n".encode())
      except OSError:
        pass

  # -- reports

  def _peer_failed(self, peer: int):
    def later():
      time.sleep(GRACE_S)
      if self._leaving == "fail":
        return  # this process is stopping on an error of its own: it says so itself
      self._report(peer, f"process {peer} of {self.count} stopped on an error (its own "
                         "line is on its console)", relay="fail")
    _thread(later, name="watch.failed")

  def _peer_lost(self, peer: int, why: str):
    self._report(peer, f"process {peer} of {self.count} is gone ({why})", relay="lost")

  def _report(self, peer: int, what: str, relay: str):
    with self._lock:
      if self._reported:
        return
      if self._leaving == "bye":
        _exit_quietly(0)  # this process had finished: nothing to resume here
      if self._leaving == "fail":
        return  # this process is stopping on its own error: its own line says so
      self._reported = True
    _quiet_cpp_logs()
    if self.index == 0:  # every survivor names the same process
      for other, sock in list(self._conns.items()):
        if other != peer:
          try:
            sock.settimeout(2.0)
            sock.sendall(f"{relay} {peer}\n".encode())
          except OSError:
            pass
    try:
      hint = _hint()
    except Exception as e:  # noqa: BLE001 - the line must come out
      hint = f"{_default_hint()} ({type(e).__name__} while reading the checkpoints: {e})"
    line = f"error: {what}; this process stops too. {hint}".replace("\n", " ")
    _flush_stdout()
    try:
      os.write(2, (line + "\n").encode())
    except OSError:
      pass
    os._exit(LOST_PEER_STATUS)


def _listen() -> socket.socket:
  """A listening socket on every interface (IPv6 and IPv4 where possible)."""
  if socket.has_dualstack_ipv6():
    try:
      return socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    except OSError:
      pass
  return socket.create_server(("", 0))


def _readline(sock: socket.socket) -> str:
  buf = b""
  while not buf.endswith(b"\n"):
    data = sock.recv(1)
    if not data:
      raise ConnectionError("a peer closed its liveness connection during start-up")
    buf += data
  return buf.decode().strip()


def _quiet_cpp_logs():
  """No more C++ log lines (the coordination service's and gloo's view of the loss)."""
  if os.environ.get("PLDR_DEBUG", "").strip().lower() not in ("", "0", "false", "no"):
    return
  if "jax" not in sys.modules:  # no C++ runtime loaded: nothing to silence
    return
  try:
    from jax._src.lib import utils
    utils.absl_set_min_log_level(4)  # above FATAL: nothing
  except Exception:  # noqa: BLE001 - an older or newer jaxlib: the line still comes out
    pass


def _flush_stdout(timeout_s: float = 1.0):
  """Flush Python's stdout from a helper thread (the main thread may hold its lock)."""
  def flush():
    try:
      sys.stdout.flush()
    except Exception:  # noqa: BLE001
      pass
  t = threading.Thread(target=flush, daemon=True)
  t.start()
  t.join(timeout_s)


def _exit_quietly(status: int):
  _quiet_cpp_logs()
  _flush_stdout()
  try:
    sys.stderr.flush()
  except Exception:  # noqa: BLE001
    pass
  os._exit(status)
