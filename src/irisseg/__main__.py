from irisseg.cli import _console_script

_console_script()
