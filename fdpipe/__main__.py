import sys

from fdpipe.cli import main

sys.exit(main())
