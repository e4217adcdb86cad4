import sys

from chargepath.cli import main

sys.exit(main())
