"""``python -m liedeploy.cli``: the same as the ``liedeploy`` command.

``python -m`` puts the current folder first on ``sys.path``; it is moved last, as for the console
script, so a planted ``onnx.py`` (or ``torch.py``) in the working folder never shadows a package.
"""

import os
import sys

if sys.path and sys.path[0] in ("", os.getcwd()):
    sys.path.append(sys.path.pop(0) or os.getcwd())

from liedeploy.cli import entry  # noqa: E402

entry()
