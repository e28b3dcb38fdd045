"""``python -m image_gen_async``: the ``image-gen-async`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
