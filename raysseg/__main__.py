import sys

from raysseg.cli import main

sys.exit(main())
