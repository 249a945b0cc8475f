"""`dsv3` command line: one module per subcommand (info, demo, train, generate, chat, plan, convert + export), each
with `register(subparsers)`, and the one error boundary: a project error or an OS error becomes one paragraph on stderr
(exit 2 for bad input, 1 for a failure), with the traceback only under `--debug` or DSV3_DEBUG=1."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
import traceback

COMMANDS = ("info", "demo", "train", "generate", "chat", "plan", "convert")  # modules of dsv3_jax.cli
COMPILING = ("demo", "train", "generate", "chat")  # commands whose programs the persistent compilation cache keeps
CACHE_ENV = "DSV3_COMPILATION_CACHE"  # a directory, or 0/off to disable; default ~/.cache/dsv3-jax/xla
CACHE_MIN_S_ENV = "DSV3_COMPILATION_CACHE_MIN_S"  # keep programs that took at least this long to compile (0.5 s)
_OFF = ("0", "off", "false", "no", "none")


def enable_compilation_cache(directory: str | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache so a repeated CLI run (or a notebook that calls this) loads its
    train-step / generate programs from disk instead of compiling them again; returns the directory, or None when
    disabled (DSV3_COMPILATION_CACHE=0). The directory is `directory`, else $DSV3_COMPILATION_CACHE, else
    $JAX_COMPILATION_CACHE_DIR, else ~/.cache/dsv3-jax/xla. JAX keys each entry on the optimised program, the
    compile options, the jax/XLA version and the device, so a changed config never gets a stale program."""
    setting = os.environ.get(CACHE_ENV, "").strip()
    if directory is None and setting.lower() in _OFF:
        return None
    directory = directory or setting or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "dsv3-jax", "xla")
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ.get(CACHE_MIN_S_ENV, "0.5")))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in JAX/Flax")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also DSV3_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"dsv3_jax.cli.{name}").register(sub)
    return parser


_OS_HINTS = {
    errno.EACCES: "permission denied: check the path's permissions or choose another path",
    errno.EPERM: "operation not permitted: check the path's permissions or choose another path",
    errno.EROFS: "the file system is read-only: choose an output on a writable one",
    errno.ENOSPC: "the disk is full: free some space or choose another output",
    errno.EDQUOT: "the disk quota is exhausted: free some space or choose another output",
    errno.EFBIG: "the file is larger than the file-size limit (ulimit -f) or the file system allows",
    errno.ENOTDIR: "a component of the path is a file, not a directory",
    errno.EISDIR: "the path is a directory, a file was expected",
    errno.ENOENT: "no such file or directory",
    errno.EEXIST: "the path already exists",
    errno.ENAMETOOLONG: "the path is too long",
    errno.EMFILE: "too many open files (ulimit -n)",
}


def _report(error: BaseException) -> int:
    """One paragraph on stderr for a user-facing error; its exit code (2 bad input, 1 failure)."""
    from dsv3_jax.errors import Dsv3Error

    if isinstance(error, Dsv3Error):
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    code = getattr(error, "errno", None)
    where = getattr(error, "filename", None)
    what = f"{where}: " if where else ""
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    name = errno.errorcode.get(code, type(error).__name__) if code is not None else type(error).__name__
    hint = _OS_HINTS.get(code)
    print(f"error: {what}{text} ({name}{': ' + hint if hint else ''})", file=sys.stderr)
    return 1


class _OneLine(logging.Filter):
    """Drops the traceback of a library's log record (orbax logs one per failed writer thread; the failure itself
    reaches the main thread and is reported once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _quiet_shutdown_noise() -> None:
    """After a failed background save, orbax's writer callbacks hit a closed asyncio loop and print one
    `RuntimeError: Event loop is closed` traceback each (hundreds); drop exactly those, keep every other."""
    def noise(exc: BaseException | None) -> bool:
        return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"

    previous_hook, previous_unraisable = sys.excepthook, sys.unraisablehook
    sys.excepthook = lambda t, e, tb: None if noise(e) else previous_hook(t, e, tb)
    sys.unraisablehook = lambda u: None if noise(u.exc_value) else previous_unraisable(u)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dsv3_jax.errors import Dsv3Error

    debug = args.debug or os.environ.get("DSV3_DEBUG") == "1"
    if not debug:
        logging.getLogger("absl").addFilter(_OneLine())
        _quiet_shutdown_noise()
    try:
        if args.command in COMPILING:
            enable_compilation_cache()
        return args.func(args)
    except (Dsv3Error, OSError) as e:
        if debug:
            traceback.print_exc()
        return _report(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
