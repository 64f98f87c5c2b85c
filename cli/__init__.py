"""The ``auglocal`` command line (installed as ``auglocal_fx.cli``; entry point ``auglocal_fx.cli.main:main``)."""
