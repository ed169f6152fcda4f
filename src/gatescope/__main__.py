"""``python -m gatescope`` is the ``gatescope`` command."""

from gatescope.cli import main

if __name__ == "__main__":
    main()
