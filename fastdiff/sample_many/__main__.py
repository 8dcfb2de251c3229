"""``torchrun -m fastdiff.sample_many ...``: ``python -m fastdiff sample-many ...`` per rank."""

import sys

from fastdiff.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["sample-many", *sys.argv[1:]]))
