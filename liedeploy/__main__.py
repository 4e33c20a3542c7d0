from liedeploy.cli import entry

entry()
