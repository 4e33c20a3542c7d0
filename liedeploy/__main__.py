from liedeploy.cli import _entry

_entry()
