import sys

from slim2deploy.cli import main

sys.exit(main())
