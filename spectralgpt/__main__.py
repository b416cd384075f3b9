import sys

from spectralgpt.cli import main

sys.exit(main())
