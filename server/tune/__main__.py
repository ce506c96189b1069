import sys

from server.tune.cli import main

sys.exit(main())
