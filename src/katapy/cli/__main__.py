import sys

from katapy.cli import main

sys.exit(main())
