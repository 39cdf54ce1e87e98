"""``python -m vggtransfer``: the same as the ``vggtransfer`` command."""

from vggtransfer._cli import main

if __name__ == "__main__":  # not when a test collector imports the module
    raise SystemExit(main())
