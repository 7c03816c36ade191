import sys

from tr_align.cli import main

sys.exit(main())
