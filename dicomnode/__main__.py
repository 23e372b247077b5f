import sys

from dicomnode.cli import main

if __name__ == "__main__":  # worker processes are spawned: they import this module again
    sys.exit(main())
