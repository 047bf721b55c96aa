"""``python -m porter``: the same command line as the ``porter`` script."""

from porter.cli import main

if __name__ == "__main__":
    main(prog_name="porter")
