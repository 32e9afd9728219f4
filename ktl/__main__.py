import sys

from ktl.cli import main

sys.exit(main())
