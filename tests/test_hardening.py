"""Hostile files and paths: nothing outside OUT, all-or-nothing outputs, special files, malformed headers."""

import json
import os
import signal
import socket
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from liedeploy import AdapterFileError, LieError, OutputPathError, merge_files
from liedeploy.cli import main
from liedeploy.io.safetensors_header import read_header
from tests.models import MLP3
from tests.conftest import save_state_dict


def _adapter(model, path, seed=1, name=None):
    from tests.conftest import _write_adapter

    return _write_adapter(model, path, ["a", "b", "c"], seed=seed, name=name)


def _sharded(folder, model, layout=None):
    """Write model's state dict as 3 shards + index in ``folder``; returns the index path."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(sd)
    layout = layout or {f"s{i}.safetensors": keys[i::3] for i in range(3)}
    wm = {}
    for fname, ks in layout.items():
        (folder / fname).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: sd[k] for k in ks}, str(folder / fname))
        wm.update({k: fname for k in ks})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return str(index)


def _read_sharded(index):
    """All tensors an index points at (fails if a shard is missing), and the shard paths."""
    wm = json.load(open(index))["weight_map"]
    folder = os.path.dirname(index)
    out = {}
    for shard in set(wm.values()):
        out.update(load_file(os.path.join(folder, shard)))
    assert set(out) == set(wm)
    return out, {os.path.join(folder, s) for s in wm.values()}


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    model = MLP3()
    base = _sharded(tmp_path / "base", model)
    a = _adapter(model, str(tmp_path / "a.safetensors"), 1)
    b = _adapter(model, str(tmp_path / "b.safetensors"), 2)
    (tmp_path / "out").mkdir()
    return model, base, a, b, str(tmp_path / "out" / "model.safetensors.index.json")


# -- 2. shard paths ----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../evil.safetensors", "/etc/evil.safetensors", "x/../../evil.safetensors"])
def test_shard_paths_leaving_the_index_folder_are_refused(tmp_path, bad):
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": bad}}))
    from liedeploy.io.safetensors_header import resolve_shards

    with pytest.raises(AdapterFileError, match=r"shard .* leaves the index's folder"):
        resolve_shards(str(index))


def test_same_shard_name_in_two_folders_is_refused(tmp_path):
    torch.manual_seed(0)
    model = MLP3()
    keys = sorted(model.state_dict())
    base = _sharded(tmp_path / "base", model, {"x/s.safetensors": keys[:3], "y/s.safetensors": keys[3:]})
    a = _adapter(model, str(tmp_path / "a.safetensors"))
    (tmp_path / "out").mkdir()
    out = str(tmp_path / "out" / "m.safetensors.index.json")
    assert main(["merge", base, a, "-o", out]) == 1
    assert os.listdir(tmp_path / "out") == []


def test_index_naming_a_tensor_its_shard_lacks_is_refused(setup, tmp_path):
    _, base, a, _, out = setup
    idx = json.load(open(base))
    idx["weight_map"]["ghost.weight"] = "s0.safetensors"
    open(base, "w").write(json.dumps(idx))
    with pytest.raises(AdapterFileError, match="names tensor ghost.weight in shard s0.safetensors, which lacks it"):
        merge_files(base, [a], out)
    assert os.listdir(os.path.dirname(out)) == []


def test_out_index_never_points_at_base_shards(setup):
    model, base, a, _, out = setup
    merge_files(base, [a], out)
    _, shards = _read_sharded(out)
    assert all(os.path.dirname(s) == os.path.dirname(out) for s in shards)
    # OUT beside the base: new shards get fresh names, the base's shards are untouched
    before = {f: open(os.path.join(os.path.dirname(base), f), "rb").read() for f in os.listdir(os.path.dirname(base))}
    out2 = os.path.join(os.path.dirname(base), "merged.safetensors.index.json")
    merge_files(base, [a], out2)
    _, shards2 = _read_sharded(out2)
    assert not shards2 & set(os.path.join(os.path.dirname(base), f) for f in before)
    for f, data in before.items():
        assert open(os.path.join(os.path.dirname(base), f), "rb").read() == data


# -- 3/4. all or nothing, kills and full disks ---------------------------------------------------
STEPS = ["tensor:1", "tensor:3", "publish:1", "publish:2", "publish:3", "publish:4", "committed"]


@pytest.mark.slow
def test_sharded_output_is_old_or_new_whatever_the_kill_point(setup):
    model, base, a, b, out = setup
    merge_files(base, [a], out)
    old, _ = _read_sharded(out)
    merge_files(base, [b], out)  # the shards now exist under fresh names once
    new_b, _ = _read_sharded(out)
    for step in STEPS:
        before, _ = _read_sharded(out)
        code = f"import liedeploy; liedeploy.merge_files({base!r}, [{a!r}], {out!r})"
        env = dict(os.environ, LIEDEPLOY_TEST_KILL_AT=step)
        proc = subprocess.run([sys.executable, "-c", code], env=env, timeout=120)
        assert proc.returncode == -signal.SIGKILL, step
        now, _ = _read_sharded(out)  # every shard the index names exists
        for k in now:
            assert torch.equal(now[k], before[k]) or torch.equal(now[k], old[k]), (step, k)
        complete_old = all(torch.equal(now[k], before[k]) for k in now)
        complete_new = all(torch.equal(now[k], old[k]) for k in now)
        assert complete_old or complete_new, step
        assert complete_new == (step == "committed"), step
        merge_files(base, [b], out)  # a rerun cleans the killed run's leftovers
        files = sorted(os.listdir(os.path.dirname(out)))
        _, shards = _read_sharded(out)
        assert files == sorted([os.path.basename(s) for s in shards] + [os.path.basename(out)]), (step, files)
    assert all(torch.equal(v, new_b[k]) for k, v in _read_sharded(out)[0].items())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_clean_up_like_sigint(setup, signum):
    _, base, a, _, out = setup
    env = dict(os.environ, LIEDEPLOY_TEST_KILL_AT=f"tensor:2={int(signum)}")
    proc = subprocess.run([sys.executable, "-m", "liedeploy.cli", "merge", base, a, "-o", out], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + signum, proc.stderr
    assert "stopped by signal" in proc.stderr
    assert os.listdir(os.path.dirname(out)) == []


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_at_any_step_leaves_out_as_it_was(tmp_path, tiny_disk):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32))
    base = _sharded(tmp_path / "base", model)
    a = _adapter_seq(model, str(tmp_path / "a.safetensors"))
    out = str(tiny_disk / "model.safetensors.index.json")
    assert main(["merge", base, a, "-o", out]) == 0  # ~13 KB: fits once, not twice
    before = {f: open(tiny_disk / f, "rb").read() for f in os.listdir(tiny_disk)}
    filler = tiny_disk / "filler"
    for free in (3000, 9000, 12000, 16000, 20000):  # the disk fills at different steps of the next merge
        st = os.statvfs(tiny_disk)
        room = st.f_bavail * st.f_frsize - free
        with open(filler, "wb") as f:
            f.write(b"\0" * max(room, 0))
        code = main(["merge", base, a, "--scale", "0.5", "-o", out])
        os.unlink(filler)
        now = {f: open(tiny_disk / f, "rb").read() for f in os.listdir(tiny_disk)}
        if code == 0:
            assert _read_sharded(out)[0]
            break
        assert code == 1 and now == before, free


def _adapter_seq(model, path):
    from tests.conftest import _write_adapter

    return _write_adapter(model, path, r".*weight")


def test_full_disk_message_is_one_line(tmp_path, tiny_disk, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    base = str(tmp_path / "base.safetensors")
    save_file(model.state_dict(), base)
    a = _adapter_seq(model, str(tmp_path / "a.safetensors"))
    assert main(["merge", base, a, "-o", str(tiny_disk / "out.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err
    assert os.listdir(tiny_disk) == []


# -- 5. OUT is never an input or a special file --------------------------------------------------
def test_out_that_is_an_input_or_special_is_refused_before_writing(tmp_path, capsys):
    torch.manual_seed(0)
    model = MLP3()
    base = str(tmp_path / "base.safetensors")
    save_file(model.state_dict(), base)
    a = _adapter(model, str(tmp_path / "a.safetensors"))
    snap = {p: open(p, "rb").read() for p in (base, a)}
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    (tmp_path / "dir").mkdir()
    os.symlink(a, str(tmp_path / "link-to-adapter"))
    os.symlink("/dev/null", str(tmp_path / "link-to-null"))
    cases = {
        a: "is the input", str(tmp_path / "link-to-adapter"): "is the input", base: "is the input",
        "/dev/null": "is a character device", str(tmp_path / "link-to-null"): "is a character device",
        fifo: "is a FIFO", str(tmp_path / "dir"): "is a directory",
    }
    for out, why in cases.items():
        assert main(["merge", base, a, "-o", out]) == 1, out
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, (out, err)
    for p, data in snap.items():
        assert open(p, "rb").read() == data
    assert sorted(os.listdir(tmp_path)) == sorted(["base.safetensors", "a.safetensors", "fifo", "dir",
                                                   "link-to-adapter", "link-to-null"])
    with pytest.raises(OutputPathError, match="is the input"):
        merge_files(base, [a], a)


# -- 6. inputs that are not regular files ---------------------------------------------------------
def test_special_input_files_are_refused_at_once(tmp_path, capsys):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    sock_path = str(tmp_path / "sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(sock_path)
    try:
        for path, kind in ((fifo, "a FIFO"), (sock_path, "a socket"), ("/dev/zero", "a character device"),
                           (str(tmp_path), "a directory")):
            proc = subprocess.run([sys.executable, "-m", "liedeploy.cli", "inspect", path], capture_output=True,
                                  text=True, timeout=30)
            assert proc.returncode == 1 and kind in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    finally:
        s.close()


def test_base_is_read_from_one_descriptor(tmp_path, monkeypatch):
    """A base replaced by rename while a merge reads it cannot mix two files."""
    import liedeploy.files.file_merge as fm

    torch.manual_seed(0)
    model = MLP3()
    base = str(tmp_path / "base.safetensors")
    save_file(model.state_dict(), base)
    a = _adapter(model, str(tmp_path / "a.safetensors"))
    ref = str(tmp_path / "ref.safetensors")
    merge_files(base, [a], ref)
    other = str(tmp_path / "other.safetensors")
    save_file({k: v + 1 for k, v in model.state_dict().items()}, other)
    orig = fm._Plan.fold
    swapped = []

    def fold(self, *args, **kw):
        if not swapped:
            os.replace(other, base)  # swap the file under the running merge
            swapped.append(1)
        return orig(self, *args, **kw)

    monkeypatch.setattr(fm._Plan, "fold", fold)
    out = str(tmp_path / "out.safetensors")
    merge_files(base, [a], out)
    assert swapped
    got, want = load_file(out), load_file(ref)
    assert all(torch.equal(got[k], want[k]) for k in want)


# -- 7. malformed headers ---------------------------------------------------------------------------
def _raw(path, header, data=b""):
    blob = json.dumps(header).encode() if not isinstance(header, bytes) else header
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)
    return str(path)


MALFORMED = {
    "negative shape": ({"w": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}}, b"\0" * 16, "non-negative integers"),
    "fractional shape": ({"w": {"dtype": "F32", "shape": [2.5, 4], "data_offsets": [0, 40]}}, b"\0" * 40, "non-negative integers"),
    "boolean shape": ({"w": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}}, b"\0" * 16, "non-negative integers"),
    "string offsets": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}}, b"\0" * 16, "data_offsets"),
    "reversed offsets": ({"w": {"dtype": "F32", "shape": [0], "data_offsets": [16, 0]}}, b"\0" * 16, "data_offsets"),
    "overlapping offsets": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                             "v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16, "overlaps"),
    "gap": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16, "gap"),
    "trailing bytes": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 16, "after its last tensor"),
    "nesting bomb": (b"{\"__metadata__\": " + b"[" * 100000 + b"]" * 100000 + b"}", b"", "not a safetensors file"),
    "metadata not strings": ({"__metadata__": {"a": 1}}, b"", "not a map of strings"),
    "extra key": ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, b"\0" * 4, "exactly dtype"),
    "duplicate key": (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4, "duplicate key"),
    "unknown dtype": ({"w": {"dtype": "F8", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "does not handle"),
    "list header": (b"[1, 2]", b"", "not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_headers_are_one_sentence(tmp_path, case, capsys):
    header, data, why = MALFORMED[case]
    path = _raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(AdapterFileError) as e:
        read_header(path)
    assert str(e.value).startswith(path + ": ") and why in str(e.value) and "\n" not in str(e.value)
    from liedeploy import read_adapter

    with pytest.raises(AdapterFileError):
        read_adapter(path)
    assert main(["inspect", path]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_merge_output_is_readable_by_safetensors_whatever_the_base(tmp_path):
    """Bases safetensors itself would refuse are refused here first; a merge output always loads."""
    from safetensors import safe_open

    torch.manual_seed(0)
    model = MLP3()
    base = str(tmp_path / "base.safetensors")
    save_file(model.state_dict(), base, metadata={"k": "v"})
    a = _adapter(model, str(tmp_path / "a.safetensors"))
    out = str(tmp_path / "out.safetensors")
    merge_files(base, [a], out)
    with safe_open(out, framework="pt") as f:
        assert set(f.keys()) == set(model.state_dict()) and f.metadata()["k"] == "v"


# -- 1. names from files are never paths ------------------------------------------------------------
@pytest.mark.parametrize("name", ["/abs/evil", "../../evil", "..", "a/../../b", "\\\\evil"])
def test_task_models_never_write_outside_out(tmp_path, name):
    pytest.importorskip("onnxruntime")
    from liedeploy.exporters.task_models import export_task_models

    torch.manual_seed(0)
    model = MLP3().eval()
    work = tmp_path / "w" / "x"
    work.mkdir(parents=True)
    a = _adapter(model, str(tmp_path / "a.safetensors"), name=name)
    out = work / "out"
    out.mkdir()
    export_task_models(model, torch.randn(2, 8), str(out), [a])
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents]
    assert sorted(p.name for p in outside) == ["a.safetensors"]
    assert any(f.endswith(".onnx") and f != "base.onnx" for f in os.listdir(out))


# -- 8. --model never shadows installed packages ---------------------------------------------------
@pytest.mark.slow
def test_planted_module_in_cwd_does_not_shadow_installed_packages(tmp_path):
    pytest.importorskip("onnx")
    (tmp_path / "onnx.py").write_text("raise SystemExit('planted onnx.py was imported')\n")
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def net():\n    return torch.nn.Sequential(torch.nn.Linear(4, 2))\n"
    )
    torch.manual_seed(0)
    save_state_dict(nn.Sequential(nn.Linear(4, 2)), str(tmp_path / "w.safetensors"))
    proc = subprocess.run([sys.executable, "-m", "liedeploy.cli", "export", "--onnx", "--model", "mymodels:net",
                           "--weights", "w.safetensors", "--input-shape", "1,4", "-o", "m.onnx"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m.onnx").exists()


def test_python_m_entry_point_exists():
    proc = subprocess.run([sys.executable, "-m", "liedeploy.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("liedeploy ")


def test_lie_error_in_merge_names_nan_base(tmp_path):
    torch.manual_seed(0)
    model = MLP3()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["a.weight"][0, 0] = float("nan")
    base = str(tmp_path / "base.safetensors")
    save_file(sd, base)
    a = _adapter(model, str(tmp_path / "a.safetensors"))
    with pytest.raises(LieError, match="base tensor a.weight already holds NaN or inf values: the base is broken"):
        merge_files(base, [a], str(tmp_path / "o.safetensors"), verify_base=False)
