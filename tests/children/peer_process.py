"""Child of tests/test_peers.py: one of two processes, each with a peers.Watch over a
key-value store in files. Process 0 runs a stand-in coordination service (a TCP echo
server); process 1 reaches it through a peers.Relay. Prints "ready", then reads commands
from stdin: "leave" (a clean exit) or "fail" (an error, reported to the peer).

argv: key-value folder, this process's index (0 or 1), the coordinator's port.
"""

import os, socket, sys, threading, time
from pldr_jax.training import peers
kv_dir, index, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
coordinator = f"127.0.0.1:{port}"

class KV:  # jax.distributed's key-value store, in files
  def key_value_set(self, key, value):
    path = os.path.join(kv_dir, key.replace("/", "_"))
    with open(path + ".tmp", "w") as f:
      f.write(value)
    os.replace(path + ".tmp", path)
  def blocking_key_value_get(self, key, timeout_ms):
    path = os.path.join(kv_dir, key.replace("/", "_"))
    deadline = time.monotonic() + timeout_ms / 1000
    while not os.path.exists(path):
      assert time.monotonic() < deadline, key
      time.sleep(0.02)
    return open(path).read()

def echo(conn):
  while data := conn.recv(4096):
    conn.sendall(data)

relay = client = None
if index == 0:  # the stand-in coordination service
  server = socket.create_server(("127.0.0.1", port))
  def serve():
    while True:
      conn, _ = server.accept()
      threading.Thread(target=echo, args=(conn,), daemon=True).start()
  threading.Thread(target=serve, daemon=True).start()
else:
  relay = peers.Relay(coordinator, on_lost=lambda: peers.current().coordinator_lost())
  while True:  # the client retries while the coordinator starts (until the watch
    try:        # is up, the relay passes closes on)
      client = socket.create_connection(("127.0.0.1", int(relay.address.split(":")[1])))
      client.sendall(b"ping")
      if client.recv(4) == b"ping":
        break
    except OSError:
      pass
    time.sleep(0.05)
peers.set_resume_hint(lambda: "RESUME HINT.")
watch = peers.Watch(index, 2, coordinator, timeout_s=5, client=KV(), relay=relay).start()
print("ready", flush=True)
for line in sys.stdin:
  if line.strip() == "leave":
    watch.leaving()
    os._exit(0)
  if line.strip() == "fail":
    watch.failing(RuntimeError("out of ideas"))
    os.write(2, b"error: out of ideas\n")
    os._exit(1)
time.sleep(60)
