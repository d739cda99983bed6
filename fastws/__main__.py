import sys

from fastws.cli import main

sys.exit(main())
