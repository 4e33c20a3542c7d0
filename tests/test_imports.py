import subprocess
import sys


def test_core_imports_no_exporter_stack_and_no_cuda():
    code = (
        "import sys, liedeploy, liedeploy.cli\n"
        "liedeploy.cli.build_parser()\n"
        "heavy = [m for m in ('onnx', 'onnxruntime', 'onnxscript', 'tensorrt', 'exporters', 'transformers', 'peft')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import torch\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
