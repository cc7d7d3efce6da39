"""What every entry point of experiments/ and benchmarks/ shares: one line per known error.

    if __name__ == "__main__":
      cli.main(main)                 # main(argv) -> exit status

A known error (every `PldrError`, a gin typo, a missing or unwritable file or
folder, a full disk, Ctrl-C outside the training loop) prints one line on
stderr, `error: <the problem and what to do>`, and exits non-zero (1, or 130
for Ctrl-C). Anything else is a bug and keeps its traceback. `--debug`
anywhere on the command line (it is taken out before the script parses its
arguments) or `PLDR_DEBUG=1` shows every traceback and every log line.

While a script runs, the log records and thread tracebacks that a full disk
sets off in Orbax, TensorStore and asyncio (one per background write, and
"Event loop is closed" at shutdown) are dropped: the one line says it all. An
exit on an error skips the interpreter's shutdown (`os._exit` after flushing),
where those background threads would print again.

The helpers the scripts call before any work:
  parse_gin          gin files (named when missing, with the closest one) and
                     bindings; a typo gets the closest valid name (difflib)
  check_run_folder   a folder the script writes: not a file, writable (found
                     at start, not minutes later inside a library)
  check_output_file  the same for a single output file

This module imports no JAX, so a script fails fast, before any compile.
"""

from __future__ import annotations

import difflib
import errno
import inspect
import logging
import os
import re
import sys
import tempfile
import threading
import tokenize
from pathlib import Path
from typing import Callable, Sequence

from pldr_jax import errors

__all__ = ["main", "run", "describe", "disk_full_message", "parse_gin", "check_run_folder",
           "check_output_file", "debug_enabled", "DEBUG_ENV"]

DEBUG_ENV = "PLDR_DEBUG"
DEBUG_FLAG = "--debug"
REPO = Path(__file__).resolve().parents[1]
INTERRUPTED = 130  # the shell's status for a process stopped by SIGINT

# gin's additions to an error raised inside a configurable (lines after the message).
_GIN_CONTEXT = re.compile(r"^\s*In (call to configurable|bindings string|file) ")
_NOISE = ("No space left on device", "os_error_code='28'", "Event loop is closed")


def debug_enabled(argv: Sequence[str] = ()) -> bool:
  """--debug among the arguments, or PLDR_DEBUG set to anything but '', '0' or 'false'."""
  env = os.environ.get(DEBUG_ENV, "").strip().lower()
  return DEBUG_FLAG in argv or env not in ("", "0", "false", "no")


# ---------------------------------------------------------------- running a script

def run(fn: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
  """fn(argv) with every known error turned into one line on stderr; the exit status.

  argv: the script's arguments (default sys.argv[1:]); `--debug` is removed before
  fn sees them. SystemExit (argparse's usage errors, `raise SystemExit(msg)`)
  passes through unchanged.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = debug_enabled(argv)
  argv = [a for a in argv if a != DEBUG_FLAG]
  if debug:
    return _status(fn(argv))
  quiet = _QuietDiskFull()
  try:
    with quiet:
      return _status(fn(argv))
  except KeyboardInterrupt:
    _say("interrupted (Ctrl-C) before anything was saved; the run folder is as it was "
         "(checkpoints are written whole or not at all). Run the same command again to "
         "start or resume.")
    return INTERRUPTED
  except Exception as e:  # noqa: BLE001 - known ones become a line, the rest is re-raised
    line = describe(e)
    if line is None:
      if quiet.dropped:
        _say(f"({quiet.dropped} log line(s) about a full disk were hidden; {DEBUG_FLAG} "
             "shows them)")
      raise
    _say(f"{line} (run with {DEBUG_FLAG} for the traceback)")
    return 1


def main(fn: Callable[[list[str]], int | None]) -> None:
  """The `__main__` of a script: run(fn) on sys.argv, then exit with its status.

  A non-zero status exits at once after flushing (os._exit): no interpreter shutdown,
  where Orbax's and asyncio's background threads would print their own failures.
  """
  code = run(fn)
  if code:
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except Exception:  # noqa: BLE001 - a closed or full stream: nothing more to say
        pass
    os._exit(code)
  sys.exit(code)


def _status(code) -> int:
  return 0 if code is None else int(code)


def _say(line: str) -> None:
  print(f"error: {line}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- one line per error

def disk_full_message(exc: BaseException) -> str | None:
  """One line for a 'No space left on device' anywhere in the exception chain, else None."""
  chain, seen = [], set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    chain.append(exc)
    exc = exc.__cause__ or exc.__context__
  if not any((isinstance(e, OSError) and e.errno == errno.ENOSPC)
             or "No space left on device" in str(e) for e in chain):
    return None
  where = next((w for e in chain for w in (getattr(e, "filename", None),
                                           getattr(e, "path", None), _written(str(e))) if w),
               None)
  where = f" writing {where}" if where else ""
  return (f"error: disk full (No space left on device){where}. Free some space and run "
          "the same command again: it resumes from the newest finished checkpoint.")


def _written(text: str) -> str | None:
  """The folder a TensorStore/Orbax write error names (above Orbax's temporary folders)."""
  m = re.search(r'(?:local file|Failed writing:) "([^"]+)"', text)
  if not m:
    return None
  parts = Path(m.group(1)).parts
  keep = next((i for i, p in enumerate(parts) if p.endswith(".orbax-checkpoint-tmp")), None)
  return str(Path(*parts[:keep])) if keep else m.group(1)


def _flat(message: str) -> str:
  """A message on one line: gin's 'In call to configurable ...' context dropped."""
  lines = []
  for line in str(message).splitlines():
    if _GIN_CONTEXT.match(line):
      break
    if line.strip():
      lines.append(line.strip())
  return " ".join(lines)


_OS_HINTS = {
    errno.ENOENT: "check the path",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "choose a folder on a writable file system",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "give a file, not a folder",
    errno.EEXIST: "remove it or choose another path",
}


def describe(exc: BaseException) -> str | None:
  """The one line (without 'error: ') for a known error; None for anything else."""
  full = disk_full_message(exc)
  if full is not None:
    return full.removeprefix("error: ")
  if isinstance(exc, errors.PldrError):
    return _flat(str(exc)) or type(exc).__name__
  if isinstance(exc, OSError) and exc.errno in _OS_HINTS and exc.filename:
    return f"{exc.strerror or exc}: {exc.filename} ({_OS_HINTS[exc.errno]})"
  if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)) and \
      exc.errno is None and str(exc):
    return _flat(str(exc))  # raised with a message of ours: it names the path
  return None


# ---------------------------------------------------------------- gin

def gin_file(name: str | os.PathLike, search: Sequence[str | os.PathLike] = (REPO,)) -> str:
  """The absolute path of a gin file given relative to the cwd or to a search folder."""
  p = Path(name)
  for cand in [p] + [Path(d) / p for d in search if not p.is_absolute()]:
    if cand.is_file():
      return str(cand.resolve())
  folder = p.parent if p.parent.is_dir() else REPO / "experiments" / "configs"
  known = sorted(str(q if p.parent.is_dir() else q.relative_to(REPO))
                 for q in folder.glob("*.gin")) if folder.is_dir() else []
  close = difflib.get_close_matches(str(p), known, n=1, cutoff=0.5)
  hint = f"; did you mean {close[0]}?" if close else (
      f"; the configs are in {REPO / 'experiments' / 'configs'}")
  raise errors.ConfigError(f"gin file not found: {name}{hint}")


def parse_gin(files: Sequence[str], bindings: Sequence[str] = (),
              search: Sequence[str | os.PathLike] = (REPO,)) -> list[str]:
  """gin.parse_config_files_and_bindings with errors that name the file, the binding and
  the closest valid name; returns the gin files as absolute paths. Earlier bindings
  are cleared first (a script parses once; a test may call it again)."""
  import gin
  paths = [gin_file(f, search) for f in files]
  gin.clear_config()
  try:
    gin.parse_config_files_and_bindings(paths, list(bindings))
  except Exception as e:  # noqa: BLE001 - gin parsing the user's text: all of it is config
    raise errors.ConfigError(_gin_message(e, bindings, paths)) from e
  return paths


def _gin_message(e: BaseException, bindings: Sequence[str] = (), files: Sequence[str] = ()
                 ) -> str:
  text = str(e)
  if isinstance(e, tokenize.TokenError):
    where = ", ".join(list(files) + (["the --gin_param values"] if bindings else []))
    return f"gin: {e.args[0]} (an unclosed bracket or quote in {where}?)"
  if isinstance(e, SyntaxError):
    loc = e.args[1] if len(e.args) > 1 else None
    what = str(e.args[0] if e.args else e).rstrip(".")
    filename, line = getattr(loc, "filename", None), getattr(loc, "line_num", None)
    if filename:
      return f"gin: {what} (in {filename}, line {line}: {getattr(loc, 'line_content', '')!r})"
    lines = "\n".join(bindings).splitlines()
    binding = lines[line - 1] if isinstance(line, int) and 0 < line <= len(lines) else None
    return f"gin: {what} in --gin_param {binding!r}" if binding else f"gin: {what}"
  first, rest = (text.splitlines() or [""])[0], text.splitlines()[1:]
  where = ""
  for line in rest:
    m = re.match(r'\s*In file "?(.*?)"?, line (\d+)', line)
    if m:
      where = _gin_where(m.group(1), m.group(2))
    elif re.match(r"\s*In bindings string line (\d+)", line):
      binding = next((r.strip() for r in rest if r.startswith("    ")), "")
      where = f" (in --gin_param {binding})" if binding else " (in a --gin_param)"
  m = re.match(r"Configurable '(.+?)' doesn't have a parameter named '(.+?)'", first)
  if m:
    return f"gin: {first.rstrip('.')}{_close(m.group(2), _parameters(m.group(1)))}{where}"
  m = re.match(r"No configurable matching '(.+?)'", first)
  if m:
    return f"gin: {first.rstrip('.')}{_close(m.group(1), _configurables())}{where}"
  return f"gin: {first}{where}"


def _gin_where(filename, line) -> str:
  return f" (in {filename}, line {line})" if filename else ""


def _close(name: str, valid: Sequence[str]) -> str:
  close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
  return f"; did you mean '{close[0]}'?" if close else (
      f"; valid: {', '.join(sorted(valid))}" if valid and len(valid) <= 40 else "")


def _parameters(configurable: str) -> list[str]:
  from gin import config as gin_config
  try:
    wrapped = gin_config._REGISTRY.get_match(configurable).wrapped  # noqa: SLF001
    return [p for p in inspect.signature(wrapped).parameters if p not in ("self", "cls")]
  except Exception:  # noqa: BLE001 - no suggestion then
    return []


def _configurables() -> list[str]:
  from gin import config as gin_config
  try:
    return sorted({c.name for _, c in gin_config._REGISTRY.items()})  # noqa: SLF001
  except Exception:  # noqa: BLE001
    return []


# ---------------------------------------------------------------- folders and files

def _remote(path) -> bool:
  return "://" in str(path)  # object storage (gs://...): checked by the storage layer


def check_run_folder(path: str | os.PathLike, what: str = "--workdir") -> Path:
  """Make sure `path` is (or can become) a folder this process can write into.

  Creates it if missing and writes and removes a probe file. Raises ConfigError
  naming `what` (the flag or gin field that gave the path) and what to do; a full
  disk is reported as such. Object-storage paths are returned unchecked.
  """
  if _remote(path):
    return Path(path)
  p = Path(path)
  for part in [p] + list(p.parents):
    if part.exists() and not part.is_dir():
      where = "" if part == p else f" ({part} is a file)"
      raise errors.ConfigError(f"{what} {path} is not a folder{where}: give a folder path "
                               "(it is created if missing)")
  try:
    p.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=p, prefix=".write_check_"):
      pass
  except OSError as e:
    if e.errno == errno.ENOSPC:
      raise
    reason = e.strerror or str(e)
    raise errors.ConfigError(f"cannot write to {what} {path} ({reason}): choose a folder you "
                             "can write to, or fix its permissions") from e
  return p


def check_output_file(path: str | os.PathLike, what: str = "--out") -> Path:
  """An output file's path: not a folder, in a folder that can be written (created)."""
  if _remote(path):
    return Path(path)
  p = Path(path)
  if p.is_dir():
    raise errors.ConfigError(f"{what} {path} is a folder: give a file name")
  check_run_folder(p.parent if str(p.parent) else Path("."), f"{what}'s folder")
  return p


# ---------------------------------------------------------------- the noise of a full disk

def _is_noise(exc: BaseException | None, text: str = "") -> bool:
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    text += f" {exc}"
    exc = exc.__cause__ or exc.__context__
  return any(n in text for n in _NOISE)


class _NoiseFilter(logging.Filter):
  def __init__(self, owner: "_QuietDiskFull"):
    super().__init__()
    self.owner = owner

  def filter(self, record: logging.LogRecord) -> bool:
    try:
      text = record.getMessage()
    except Exception:  # noqa: BLE001 - a bad format string is not ours to judge
      return True
    exc = record.exc_info[1] if record.exc_info else None
    if _is_noise(exc, text):
      self.owner.dropped += 1
      return False
    return True


class _QuietDiskFull:
  """While entered: drop the log records and thread tracebacks of a full disk."""

  # Orbax logs through absl ("absl") or the root logger; asyncio's task errors through "asyncio".
  LOGGERS = ("", "absl", "asyncio", "concurrent.futures")

  def __init__(self):
    self.dropped = 0
    self._filter = _NoiseFilter(self)
    self._hooks = None

  def __enter__(self):
    for name in self.LOGGERS:
      logging.getLogger(name).addFilter(self._filter)
    old_thread, old_unraisable = threading.excepthook, sys.unraisablehook

    def thread_hook(args):
      if _is_noise(args.exc_value):
        self.dropped += 1
      else:
        old_thread(args)

    def unraisable_hook(args):
      if _is_noise(args.exc_value, str(args.err_msg or "")):
        self.dropped += 1
      else:
        old_unraisable(args)

    self._hooks = (old_thread, old_unraisable)
    threading.excepthook, sys.unraisablehook = thread_hook, unraisable_hook
    return self

  def __exit__(self, *exc):
    for name in self.LOGGERS:
      logging.getLogger(name).removeFilter(self._filter)
    threading.excepthook, sys.unraisablehook = self._hooks
    return False
