import subprocess
import sys


def test_core_imports_no_exporter_stack_and_no_cuda():
    code = (
        "import sys, liedeploy, liedeploy.cli\n"
        "liedeploy.cli.build_parser()\n"
        "heavy = [m for m in ('onnx', 'onnxruntime', 'onnxscript', 'tensorrt', 'liedeploy.exporters', 'transformers', 'peft')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import torch\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_version_help_and_inspect_start_without_torch(tmp_path):
    import json as _json
    import struct

    blob = _json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 16)
    for argv in (["--version"], ["--help"], ["merge", "--help"], ["inspect", str(path)], ["inspect", str(path), "--json"]):
        code = (
            "import sys\n"
            "from liedeploy.cli import main\n"
            "try:\n"
            f"    rc = main({argv!r})\n"
            "except SystemExit as e:\n"
            "    rc = e.code\n"
            "assert 'torch' not in sys.modules, argv\n"
            "sys.stderr.write('rc=%s' % rc)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "rc=0" in out.stderr, (argv, out.stderr)


def test_demo_task_names_match_the_demo():
    from liedeploy.cli.demo_cmd import TASK_NAMES
    from liedeploy.demo.pipeline import TASKS

    assert tuple(TASKS) == TASK_NAMES
