"""pldr_jax.training.peers without JAX: two real processes, each with a Watch over a key-value
store in files, process 1 reaching a stand-in coordination service (a TCP echo server in
process 0) through its Relay. A killed process ends the other with one line and status
75 (both directions), "bye" is not reported, "fail" is (after the grace), and the relay
holds the client's connection open once the coordinator is gone.
(tests/test_multidevice.py does it with pretrain.py and jax.distributed.)"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import child_script

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture
def pair(tmp_path):
  """Two watched processes, both 'ready'."""
  port = _free_port()
  env = dict(os.environ, PLDR_DEBUG="")
  procs = [subprocess.Popen([sys.executable, child_script("peer_process"), str(tmp_path), str(i),
                             str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
  for p in procs:
    assert p.stdout.readline().strip() == "ready", p.communicate(timeout=10)
  yield procs
  for p in procs:
    if p.poll() is None:
      p.kill()
    p.communicate()


def _ends(proc):
  t = time.monotonic()
  out, err = proc.communicate(timeout=30)
  return proc.returncode, err, time.monotonic() - t, out


@pytest.mark.slow  # two processes
@pytest.mark.parametrize("victim", [0, 1])
def test_a_killed_process_ends_the_other_with_one_line(pair, victim):
  pair[victim].send_signal(signal.SIGKILL)
  code, err, took, _ = _ends(pair[1 - victim])
  assert code == 75 and took < 5, (code, took, err)
  assert err.splitlines() == [
      f"error: process {victim} of 2 is gone ("
      + ("its connection closed" if victim else "the connection to it closed")
      + ": killed, crashed, or its host is down); this process stops too. RESUME HINT."], err


def test_the_relay_holds_the_clients_connection_once_the_coordinator_is_gone(tmp_path):
  """Process 1's watch reports; before it does (the watch is told only after a grace),
  its client's connection through the relay neither answers nor closes."""
  port = _free_port()
  from pldr_jax.training import peers
  lost = []
  server = socket.create_server(("127.0.0.1", port))
  relay = peers.Relay(f"127.0.0.1:{port}", on_lost=lambda: lost.append(time.monotonic()))
  client = socket.create_connection(("127.0.0.1", int(relay.address.split(":")[1])))
  conn, _ = server.accept()
  relay.armed = True
  client.sendall(b"ab")
  assert conn.recv(2) == b"ab"
  conn.sendall(b"cd")
  assert client.recv(2) == b"cd"
  server.close()  # the coordinator is gone: nothing answers on its port
  conn.close()
  deadline = time.monotonic() + 5
  while not lost and time.monotonic() < deadline:
    time.sleep(0.01)
  assert lost, "the relay did not report the lost coordinator"
  client.settimeout(0.5)
  with pytest.raises(socket.timeout):  # held: no EOF, no reset
    client.recv(1)
  client.close()


@pytest.mark.slow  # two processes
def test_bye_is_not_reported_fail_is(pair):
  pair[1].stdin.write("leave\n")
  pair[1].stdin.flush()
  assert pair[1].wait(timeout=10) == 0
  time.sleep(1.0)
  assert pair[0].poll() is None, pair[0].communicate()  # process 1 left: not lost


@pytest.mark.slow  # two processes
def test_a_peer_that_stops_on_its_error_is_reported_after_the_grace(pair):
  from pldr_jax.training import peers
  t = time.monotonic()
  pair[0].stdin.write("fail\n")
  pair[0].stdin.flush()
  code0, err0, _, _ = _ends(pair[0])
  assert code0 == 1 and err0.splitlines() == ["error: out of ideas"], err0
  code, err, _, _ = _ends(pair[1])
  assert code == 75 and time.monotonic() - t >= peers.GRACE_S, (code, err)
  assert err.splitlines() == ["error: process 0 of 2 stopped on an error (its own line is on "
                              "its console); this process stops too. RESUME HINT."], err


def test_looks_like_lost_peer_and_peer_timeout(monkeypatch):
  import argparse
  from pldr_jax.training import distributed, peers
  from pldr_jax import errors
  gloo = RuntimeError("UNKNOWN: Gloo all-reduce failed: [pair.cc:538] Read error: Connection "
                      "reset by peer")
  assert peers.looks_like_lost_peer(gloo)
  assert not peers.looks_like_lost_peer(ValueError("seq_len=65 is longer than max_len=64"))
  monkeypatch.delenv(distributed.ENV_PEER_TIMEOUT, raising=False)
  assert distributed.peer_timeout(argparse.Namespace()) == peers.DEFAULT_TIMEOUT_S
  assert distributed.peer_timeout(argparse.Namespace(peer_timeout=5.0)) == 5.0
  assert distributed.peer_timeout(None, {distributed.ENV_PEER_TIMEOUT: "0"}) == 0.0
  with pytest.raises(errors.ConfigError, match="PLDR_PEER_TIMEOUT"):
    distributed.peer_timeout(None, {distributed.ENV_PEER_TIMEOUT: "soon"})
  with pytest.raises(errors.ConfigError, match="peer_timeout"):
    distributed.peer_timeout(argparse.Namespace(peer_timeout=-1.0))
