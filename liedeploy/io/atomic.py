"""All-or-nothing outputs: private staging, checked output paths, a commit point, cleanup.

Every output of liedeploy (a merged file, a sharded model with its index, an adapter, an export)
is written into a private staging folder beside OUT (``.NAME.liedeploy-PID-<random>``, mode 0700:
nobody else can swap a symlink into it) and published by renames only when all of it was
written. For several files, the file that readers open first (an index, a graph) is renamed
last: it is the commit point. Until it moves a reader sees the complete old output; after, the
complete new one; files the new output no longer uses are removed after the commit.

The staging folder keeps a journal (the files already moved out, the files to remove after the
commit), so a run killed at any moment (SIGKILL included) leaves nothing that the next run
towards the same OUT does not clean: stale staging folders of dead processes are removed and
files they published but no index references are deleted. SIGTERM and SIGHUP clean up as SIGINT
does (see :func:`terminate_on_signals`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import stat
import tempfile
from typing import Callable, Iterable, Iterator, Optional, Sequence

from liedeploy.errors import LieError, OutputPathError

__all__ = [
    "Staging",
    "atomic_path",
    "check_output_path",
    "safe_file_name",
    "terminate_on_signals",
    "Terminated",
    "clean_stale",
    "kill_point",
]

_STAGE_RX = re.compile(r"^\.(?P<name>.+)\.liedeploy-(?P<pid>\d+)-[0-9a-z_]+$")
_JOURNAL = ".journal.json"
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


def safe_file_name(name: str, what: str = "name") -> str:
    """Reduce a name that came from a file (task name, shard name) to a plain file name.

    Path separators, ``..``, leading dots and characters outside ``[A-Za-z0-9._+-]`` are
    replaced by ``_``, so the result can never leave the folder it is joined to.
    """
    if not isinstance(name, str) or not name:
        raise LieError(f"{what} must be a non-empty string, got {name!r}")
    base = _SAFE.sub("_", name.replace("\\", "/").replace("/", "_"))
    return (base.lstrip(".") or "_")[:200]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def check_output_path(out: str, inputs: Iterable[str] = (), *, allow_dir: bool = False) -> str:
    """Refuse an OUT that is an input, a special file, a folder, or a symlink to one of those.

    Returns the absolute path. Checked before anything is written.
    """
    out = os.fspath(out)
    path = os.path.abspath(out)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise OutputPathError(f"{out}: the output folder {parent} does not exist")
    try:
        st = os.stat(path)  # follows a symlink: what a write would reach
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputPathError(f"{out}: cannot be used as output ({exc.strerror or exc})") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode) and not allow_dir:
            raise OutputPathError(f"{out}: is a directory; name an output file")
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
            raise OutputPathError(f"{out}: is {_kind(st.st_mode)}; the output must be a regular file")
        for src in inputs:
            try:
                same = os.path.samefile(path, os.fspath(src))
            except OSError:
                continue
            if same:
                raise OutputPathError(
                    f"{out}: is the input {src}; write the output elsewhere (inputs are never modified)"
                )
    return path


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _referenced(folder: str) -> set:
    """Absolute paths of files referenced by any index or ONNX manifest in ``folder`` (best effort)."""
    refs = set()
    for f in os.listdir(folder):
        if f.endswith(".index.json"):
            with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
                with open(os.path.join(folder, f)) as fh:
                    for shard in json.load(fh).get("weight_map", {}).values():
                        refs.add(os.path.abspath(os.path.join(folder, str(shard))))
    return refs


def clean_stale(folder: str, name: Optional[str] = None) -> list:
    """Remove staging folders of dead liedeploy processes in ``folder`` (for OUT ``name``, or all).

    Files such a run had already published are removed too unless an index in ``folder`` uses
    them; so are the files it meant to remove after its commit. Returns what was removed.
    """
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        m = _STAGE_RX.match(entry)
        if not m or (name is not None and m.group("name") != name) or _pid_alive(int(m.group("pid"))):
            continue
        stage = os.path.join(folder, entry)
        journal = {}
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(stage, _JOURNAL)) as fh:
                journal = json.load(fh)
        refs = _referenced(folder)
        for rel in list(journal.get("published", [])) + list(journal.get("obsolete", [])):
            target = os.path.abspath(os.path.join(folder, os.path.basename(str(rel))))
            if target not in refs and os.path.isfile(target):
                with contextlib.suppress(OSError):
                    os.unlink(target)
                    removed.append(target)
        shutil.rmtree(stage, ignore_errors=True)
        removed.append(stage)
    return removed


class Staging:
    """A private folder beside ``out`` in which a whole output is written, then published.

    Example:
        >>> with Staging("out/model.safetensors.index.json") as st:
        ...     p = st.path("model-00001.safetensors"); ...  # write files there
        ...     st.publish(["model-00001.safetensors"], last="model.safetensors.index.json",
        ...                obsolete=["old-shard.safetensors"])

    Leaving the block without :meth:`publish` (an exception, a signal) removes everything.
    """

    def __init__(self, out: str, *, inputs: Sequence[str] = (), allow_dir: bool = False):
        self.out = check_output_path(out, inputs, allow_dir=allow_dir)
        self.folder = os.path.dirname(self.out)
        self.name = os.path.basename(self.out)
        clean_stale(self.folder, self.name)
        self.dir = tempfile.mkdtemp(prefix=f".{self.name}.liedeploy-{os.getpid()}-", dir=self.folder)
        self._journal = {"published": [], "obsolete": []}
        self.published: list = []

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def path(self, name: str) -> str:
        """Where to write the output file ``name`` (a plain file name) while staging."""
        if os.path.basename(name) != name or name in ("", ".", "..", _JOURNAL):
            raise LieError(f"{name!r} is not a plain file name")
        return os.path.join(self.dir, name)

    def _write_journal(self) -> None:
        tmp = os.path.join(self.dir, _JOURNAL + ".new")
        with open(tmp, "w") as f:
            json.dump(self._journal, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.dir, _JOURNAL))

    def publish(self, names: Sequence[str], *, last: Optional[str] = None, obsolete: Sequence[str] = (),
                hook: Optional[Callable[[str], None]] = None) -> list:
        """Move ``names`` (then ``last``, the commit point) from staging into the output folder.

        ``obsolete``: file names in the output folder that the new output replaces and that are
        removed after the commit (when no index still refers to them). ``hook(step)`` is called
        between steps (tests use it to stop a run at every point).
        """
        mask = os.umask(0)
        os.umask(mask)
        order = [n for n in names if n != last] + ([last] if last else [])
        for n in order:  # data first, on disk, before anything points at it
            p = self.path(n)
            os.chmod(p, 0o666 & ~mask)
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        self._journal["obsolete"] = [os.path.basename(o) for o in obsolete if os.path.basename(o) not in order]
        self._journal["published"] = [n for n in order if n != last]
        self._write_journal()
        for i, n in enumerate(order, 1):
            if hook:
                hook(f"publish:{i}")
            os.replace(self.path(n), os.path.join(self.folder, n))
            self.published.append(os.path.join(self.folder, n))
        if hook:
            hook("committed")
        with contextlib.suppress(OSError):
            fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        refs = _referenced(self.folder)
        for o in self._journal["obsolete"]:
            target = os.path.abspath(os.path.join(self.folder, o))
            if target not in refs:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(target)
        return self.published

    def staged_files(self) -> list:
        """Plain files written into the staging folder so far (the journal excluded)."""
        return sorted(n for n in os.listdir(self.dir) if not n.startswith(_JOURNAL) and os.path.isfile(self.path(n)))

    def publish_all(self, *, last: Optional[str] = None, obsolete: Sequence[str] = ()) -> list:
        """:meth:`publish` every staged file, ``last`` (default: OUT's own name if staged) last."""
        names = self.staged_files()
        if last is None and self.name in names:
            last = self.name
        return self.publish(names, last=last, obsolete=obsolete, hook=kill_point)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "", *, inputs: Sequence[str] = ()) -> Iterator[str]:
    """Yield a private temporary path for ``path``; on success it is renamed onto ``path``.

    On any exception (signals included, see :func:`terminate_on_signals`) nothing is left and
    ``path`` is as it was. ``inputs``: files that ``path`` must not be.
    """
    stage = Staging(path, inputs=inputs)
    try:
        yield stage.path(stage.name)
        stage.publish([stage.name], last=stage.name)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise LieError(f"{path}: no space left on the device; nothing was written") from None
        raise
    finally:
        stage.close()


def kill_point(step: str) -> None:
    """Test hook: SIGKILL this process at ``step`` when ``LIEDEPLOY_TEST_KILL_AT`` names it.

    Steps: ``tensor:N`` (after the N-th merged or converted tensor is written), ``publish:I``
    (before the I-th file is moved into place), ``committed`` (after the last one). Tests use it to stop a
    run deterministically at every point; ``STEP=15`` sends that signal instead (SIGTERM here).
    Unset, it costs one dictionary lookup.
    """
    want = os.environ.get("LIEDEPLOY_TEST_KILL_AT")
    if not want:
        return
    for item in want.split(","):
        name, _, signum = item.partition("=")
        if name == step:
            os.kill(os.getpid(), int(signum) if signum else signal.SIGKILL)


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM or SIGHUP so that cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def terminate_on_signals(signums: Sequence[int] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into :class:`Terminated` in the main thread while the block runs."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    old = {}
    for s in signums:
        with contextlib.suppress(ValueError, OSError):
            old[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
