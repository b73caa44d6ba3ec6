"""``python -m autosdpa.cli`` == the ``autosdpa`` command."""
from . import main

if __name__ == "__main__":
    main(prog_name="autosdpa")
